"""The embedded default database: a private PostgreSQL cluster in a git-ignored folder.

Used only when DATABASE_URL is unset. initdb/pg_ctl refuse to run as root, so as root
they run as the `postgres` system user on a data folder it owns; as anyone else they run
as that user. The cluster listens on 127.0.0.1 only, with a generated password.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from serving.paths import state_dir

DEFAULT_PORT = 55432
DB_NAME = "refund"
DB_USER = "refund"


class PostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: RC_PG_BINDIR, `pg_config --bindir`, or the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if os.environ.get("RC_PG_BINDIR"):
        candidates.append(os.environ["RC_PG_BINDIR"])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0, reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise PostgresError("PostgreSQL server binaries (initdb, pg_ctl) not found: install the server "
                        "(Debian: apt-get install postgresql) or set RC_PG_BINDIR, or point DATABASE_URL at a server")


@dataclass
class Cluster:
    """A private cluster under `root`: root/data (owned by the server's user) and root/password."""

    root: Path | None = None
    port: int | None = None

    def __post_init__(self):
        self.root = Path(self.root or state_dir() / "postgres").resolve()
        self.port = int(self.port or os.environ.get("RC_PG_PORT", DEFAULT_PORT))
        self.data = self.root / "data"
        self.password_file = self.root / "password"

    # -- running the server's tools as a non-root user -------------------------------------
    def _owner(self) -> str | None:
        """The system user that runs the server: `postgres` when we are root, else ourselves (None)."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PostgresError("running as root, and there is no `postgres` system user to run the server as") from exc
        return "postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(find_bindir() / tool), *args]
        owner = self._owner()
        if owner:
            cmd = ["runuser", "-u", owner, "--", *cmd]
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
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the server's user must reach data/ below it
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        self.data.mkdir(mode=0o700, exist_ok=True)
        self._give_to_owner(self.data)
        # initdb reads the password from a file the server's user can read; it lives a moment.
        pwfile = self.root / ".initpw"
        pwfile.write_text(self.password())
        self._give_to_owner(pwfile)
        try:
            self._run("initdb", "-D", str(self.data), "-U", DB_USER, "--pwfile", str(pwfile),
                      "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\n# refund-classifier: private cluster on loopback\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    "unix_socket_directories = ''\nmax_connections = 50\n")

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
            self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(log), "-w", "-t", "60",
                      "-o", f"-p {self.port}")
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


def database_url(*, start: bool = True) -> str:
    """DATABASE_URL when set; else the embedded cluster's URL, starting it when `start`."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    cluster = Cluster()
    if start:
        return cluster.start()
    if not cluster.initialized():
        raise PostgresError("DATABASE_URL is unset and the private cluster does not exist yet: run `python -m serving up`")
    return cluster.url()
