"""ingest.db's connection pool (what the review desk's server uses), against a real PostgreSQL:
a connection is reused, one PostgreSQL dropped is replaced before use, one left in a failed
transaction is never kept, and no more than `size` are kept."""
from __future__ import annotations

import psycopg2
import pytest

from ingest import db

pytestmark = pytest.mark.integration


def backend(url: str) -> int:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


@pytest.fixture
def pooled(database_url):
    pool = db.use_pool(database_url, 2)
    yield database_url, pool
    pool.close()
    db._POOLS.pop(database_url, None)


def test_a_connection_is_kept_and_reused(pooled):
    url, pool = pooled
    first = backend(url)
    assert backend(url) == first and len(pool._idle) == 1
    with db.connect(url, keepalives=1) as conn, conn.cursor() as cur:  # extra parameters: a connection of its own
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] != first


def test_a_connection_postgresql_dropped_is_replaced_before_use(pooled, database_url):
    url, _ = pooled
    first = backend(url)
    with psycopg2.connect(database_url) as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%(pid)s)", {"pid": first})
    admin.close()
    assert backend(url) != first, "the dead connection was noticed and a new one opened"


def test_a_failed_statement_rolls_back_and_the_connection_is_clean_after(pooled):
    url, pool = pooled
    with pytest.raises(psycopg2.errors.UndefinedTable):
        with db.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def test_at_most_size_connections_are_kept(pooled):
    url, pool = pooled
    with db.connect(url), db.connect(url), db.connect(url):  # three at once: one beyond the size
        pass
    assert len(pool._idle) == 2
