"""The ingest lock against a real PostgreSQL: it does not outlive a dead client, and who holds it is said."""
from __future__ import annotations

import re
import threading

import psycopg2
import pytest

from ingest.store import KEEPALIVE, LOCK_KEYS, LockBusy, Store

pytestmark = pytest.mark.integration


def test_the_server_probes_the_lock_holders_connection(database_url):
    store = Store(database_url)
    store.acquire()
    try:
        # PostgreSQL's end of the connection: a vanished client is noticed in about a minute, not ~2 h
        assert store.one("SHOW tcp_keepalives_idle", {}) == (str(KEEPALIVE["idle"]),)
        assert store.one("SHOW tcp_keepalives_interval", {}) == (str(KEEPALIVE["interval"]),)
        assert store.one("SHOW tcp_keepalives_count", {}) == (str(KEEPALIVE["count"]),)
        assert store.one("SHOW tcp_user_timeout", {}) != ("0",)
    finally:
        store.close()


def test_lock_busy_names_the_session_that_holds_it_and_how_to_end_it(database_url):
    holder = psycopg2.connect(database_url, application_name="a-client-that-went-away")
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%(a)s, %(b)s)", {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]})
    pid = holder.get_backend_pid()
    try:
        with pytest.raises(LockBusy) as err:
            Store(database_url).acquire()
        message = str(err.value)
        assert f"PostgreSQL session {pid} from 127.0.0.1" in message and "a-client-that-went-away" in message
        terminate = re.search(r"SELECT pg_terminate_backend\(\d+\)", message).group(0)
        # what the message says to do frees the lock
        with psycopg2.connect(database_url) as admin, admin.cursor() as cur:
            cur.execute(terminate)
        store = Store(database_url)
        store.acquire()
        assert store.locked
        store.close()
    finally:
        holder.close()


def test_migrations_wait_for_the_migration_lock_a_bounded_time_on_a_probed_session(database_url):
    from ingest import db

    holder = psycopg2.connect(database_url, application_name="a-migration-that-hangs")
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%(key)s)", {"key": db.MIGRATION_LOCK})
    errors = []

    def attempt():
        try:
            db.migrate(database_url, lock_timeout_s=1)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
    try:
        waiting = threading.Thread(target=attempt, daemon=True)
        waiting.start()
        waiting.join(30)
        assert not waiting.is_alive(), "migrate waits for the migration lock without a bound"
        assert isinstance(errors[0], db.MigrationLockTimeout) and "held the migration lock for over 1s" in str(errors[0])
    finally:
        holder.close()
    assert db.migrate(database_url, lock_timeout_s=1) == []  # free again: nothing left to apply
    with db.connect(database_url, **db.KEEPALIVE_ARGS) as conn, conn.cursor() as cur:
        cur.execute("SHOW tcp_keepalives_idle")
        assert cur.fetchone() == (str(KEEPALIVE["idle"]),)
