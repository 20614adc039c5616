"""The embedded default database: a private PostgreSQL cluster in a git-ignored folder.

Used only when DATABASE_URL is unset. initdb/pg_ctl refuse to run as root, so as root
they run as the `postgres` system user on a data folder it owns; as anyone else they run
as that user. The cluster listens on 127.0.0.1 only, with a generated password.

As root, the `postgres` user must be able to reach the data folder. A checkout inside a folder
only root may enter (a root user's home, `mktemp -d`) is out of its reach, so there the data
folder lives in RC_PG_SHARED_DIR (default /var/tmp), named after the checkout so that each
checkout keeps its own cluster across runs: `refund-classifier-pg-<hash of the state folder>`.
The password stays in the checkout, readable by root alone.
"""
from __future__ import annotations

import glob
import hashlib
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
DEFAULT_SHARED_DIR = "/var/tmp"
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
    """A private cluster: root/password, and its data folder (owned by the server's user) at
    root/data, or outside the checkout where the server's user cannot reach root (see above)."""

    root: Path | None = None
    port: int | None = None

    def __post_init__(self):
        self.root = Path(self.root or state_dir() / "postgres").resolve()
        self.port = int(self.port or os.environ.get("RC_PG_PORT", DEFAULT_PORT))
        self.password_file = self.root / "password"
        self.data = self._data_dir()

    def _data_dir(self) -> Path:
        inside = self.root / "data"
        owner = self._owner()
        # root itself is made 0755 by init(); what matters is the folders above it
        if owner is None or (inside / "PG_VERSION").is_file() or self._reachable(owner, self.root.parent):
            return inside
        shared = Path(os.environ.get("RC_PG_SHARED_DIR") or DEFAULT_SHARED_DIR)
        name = "refund-classifier-pg-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return shared / name / "data"

    @staticmethod
    def _reachable(owner: str, folder: Path) -> bool:
        """Can `owner` enter `folder` (or, before it exists, the nearest folder above it that exists)?"""
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        probe = subprocess.run(["runuser", "-u", owner, "--", "test", "-x", str(existing)],
                               capture_output=True, cwd="/")
        return probe.returncode == 0

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
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        home = self.data.parent
        if home == self.root:
            os.chmod(self.root, 0o755)  # the server's user must reach data/ below it
        else:
            self._make_shared_home(home)
        owner = self._owner()
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
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            home.mkdir(mode=0o711, exist_ok=True)
            st = os.lstat(home)
        except OSError as exc:
            raise PostgresError(f"cannot create the private PostgreSQL's folder {home} ({exc.strerror}): "
                                f"set RC_PG_SHARED_DIR to a folder root can write and the `postgres` user can enter, "
                                f"or DATABASE_URL to a server") from exc
        if not os.path.isdir(home) or os.path.islink(home) or st.st_uid != os.geteuid():
            raise PostgresError(f"{home} exists and is not a folder of ours: remove it, or set RC_PG_SHARED_DIR to another folder")
        os.chmod(home, 0o711)

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
