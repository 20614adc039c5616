"""PostgreSQL access: one connection context manager, numbered migrations, named queries.

SQL lives in ingest/sql/*.sql; parameters are always placeholders, never interpolated.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions

MIGRATION_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Any constant: serializes migrations between processes that start at once.
MIGRATION_LOCK = 0x5EF0D
# How long a start waits for another process's migrations (the lock above) before giving up.
MIGRATION_LOCK_TIMEOUT_S = 120.0

# Probe an idle connection after 30 s, every 10 s, 3 times: a silent peer is dead after ~60 s. For a
# session that holds an advisory lock (the ingest run's, a migration's): a client that vanished (a
# killed pod, a network partition) must not keep it for the kernel's default two hours.
KEEPALIVE = {"idle": 30, "interval": 10, "count": 3}
KEEPALIVE_S = KEEPALIVE["idle"] + KEEPALIVE["interval"] * KEEPALIVE["count"]
# libpq's keepalives on our side, and the server's tcp_keepalives_* and tcp_user_timeout for this
# session on PostgreSQL's (any role may set these).
KEEPALIVE_ARGS = {
    "keepalives": 1, "keepalives_idle": KEEPALIVE["idle"], "keepalives_interval": KEEPALIVE["interval"],
    "keepalives_count": KEEPALIVE["count"],
    "options": (f"-c tcp_keepalives_idle={KEEPALIVE['idle']} -c tcp_keepalives_interval={KEEPALIVE['interval']} "
                f"-c tcp_keepalives_count={KEEPALIVE['count']} -c tcp_user_timeout={KEEPALIVE_S * 1000}"),
}


def load_query(name: str, package: str = "ingest.sql") -> str:
    """The named query `name`.sql of `package` (review keeps its own in review.sql)."""
    return resources.files(package).joinpath(f"{name}.sql").read_text()


def migrations() -> list[tuple[int, str, str]]:
    """(number, filename, sql) of every migration, in order."""
    found = []
    for entry in resources.files("ingest.sql").iterdir():
        m = MIGRATION_RE.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def _open(url: str, **extra) -> psycopg2.extensions.connection:
    return psycopg2.connect(url, connect_timeout=10, application_name="refund-classifier", **extra)


class Pool:
    """Connections kept open between uses, for a long-lived server with many short requests (the
    review desk: opening one costs about 6 ms, more than most of its queries). At most `size` kept;
    a use beyond that opens its own connection and closes it after. A kept connection is checked
    (SELECT 1) before each use and replaced if PostgreSQL restarted or dropped it meanwhile."""

    def __init__(self, url: str, size: int):
        self.url, self.size = url, size  # kept connections probe a silent peer (KEEPALIVE_ARGS)
        self._idle: list[psycopg2.extensions.connection] = []
        self._lock = threading.Lock()

    def take(self) -> psycopg2.extensions.connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _open(self.url, **KEEPALIVE_ARGS)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.rollback()
                return conn
            except psycopg2.Error:
                conn.close()  # gone meanwhile: try the next kept one, else a new one

    def give_back(self, conn: psycopg2.extensions.connection) -> None:
        if not conn.closed and conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


_POOLS: dict[str, Pool] = {}


def use_pool(url: str, size: int) -> Pool:
    """From now on, in this process, connect(url) without extra parameters takes its connection
    from a pool of at most `size` kept connections (one made before for it is closed)."""
    old, _POOLS[url] = _POOLS.get(url), Pool(url, size)
    if old is not None:
        old.close()
    return _POOLS[url]


@contextmanager
def connect(url: str, **extra) -> Iterator[psycopg2.extensions.connection]:
    """Commit on success, roll back on error, always close (or give back to the pool `use_pool`
    made for this url). extra: more libpq parameters."""
    pool = None if extra else _POOLS.get(url)
    conn = pool.take() if pool else _open(url, **extra)
    try:
        yield conn
        conn.commit()
    except BaseException:
        try:
            conn.rollback()
        except psycopg2.Error:
            conn.close()  # the connection itself failed: never kept
        raise
    finally:
        if pool:
            pool.give_back(conn)
        else:
            conn.close()


def pending_migrations(url: str) -> list[str]:
    """Names of the migrations this code has that the database lacks; reads only (no DDL)."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = set()
        if cur.fetchone()[0]:
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
    return [name for number, name, _ in migrations() if number not in done]


class MigrationLockTimeout(psycopg2.OperationalError):
    """Another process held the migration lock for longer than the wait (what runs as PostgreSQL
    being unavailable: the job exits 4 and the next run tries again)."""


def migrate(url: str, *, lock_timeout_s: float = MIGRATION_LOCK_TIMEOUT_S) -> list[str]:
    """Apply the migrations not yet applied, in order, each in its own transaction; returns their names.

    One process at a time (an advisory lock), waiting at most lock_timeout_s for it: PostgreSQL's
    lock_timeout, which also bounds each migration's wait for a table lock, so that a migration
    queued behind a long query cannot stall every query queued behind it. The session probes its
    peer (KEEPALIVE_ARGS): a migrating client that vanished frees the lock within ~KEEPALIVE_S s."""
    applied_now = []
    with connect(url, **KEEPALIVE_ARGS) as conn, conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %(ms)s, false)", {"ms": f"{int(lock_timeout_s * 1000)}ms"})
        try:
            cur.execute("SELECT pg_advisory_lock(%(key)s)", {"key": MIGRATION_LOCK})
        except psycopg2.errors.LockNotAvailable as exc:
            raise MigrationLockTimeout(
                f"another process has held the migration lock for over {lock_timeout_s:.0f}s (applying migrations, or "
                f"gone without closing its session): see pg_locks where locktype = 'advisory' and objid = {MIGRATION_LOCK}") from exc
        try:
            cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                               version integer PRIMARY KEY, name text NOT NULL,
                               applied_at timestamptz NOT NULL DEFAULT now())""")
            conn.commit()
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for number, name, sql in migrations():
                if number in done:
                    continue
                cur.execute(sql)
                cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%(v)s, %(n)s)", {"v": number, "n": name})
                conn.commit()
                applied_now.append(name)
        finally:
            conn.rollback()
            cur.execute("SELECT pg_advisory_unlock(%(key)s)", {"key": MIGRATION_LOCK})
            conn.commit()
    return applied_now
