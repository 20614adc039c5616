"""PostgreSQL access: one connection context manager, numbered migrations, named queries.

SQL lives in ingest/sql/*.sql; parameters are always placeholders, never interpolated.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

import psycopg2
import psycopg2.extensions

MIGRATION_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Any constant: serializes migrations between processes that start at once.
MIGRATION_LOCK = 0x5EF0D


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


@contextmanager
def connect(url: str) -> Iterator[psycopg2.extensions.connection]:
    """Commit on success, roll back on error, always close."""
    conn = psycopg2.connect(url, connect_timeout=10, application_name="refund-classifier")
    try:
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
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


def migrate(url: str) -> list[str]:
    """Apply the migrations not yet applied, in order, each in its own transaction; returns their names."""
    applied_now = []
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%(key)s)", {"key": MIGRATION_LOCK})
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
