"""The job's PostgreSQL side: one connection holding the ingest lock, retried across server restarts.

The lock is a session-level advisory lock on the job's one connection: it lasts as long as the
session. So that a client that vanished (a killed pod, a network partition) does not keep it for
the kernel's default two hours, both ends probe the connection: libpq's keepalives on our side, and
the server's `tcp_keepalives_*` and `tcp_user_timeout`, set for this session, on PostgreSQL's side:
a dead client's session, and the lock with it, ends within about KEEPALIVE_S seconds.

If PostgreSQL restarts,
the connection and with it the lock are gone: the store reconnects (with backoff, for up to
`retry_for` seconds), takes the lock again, and only then goes on. If another run took the lock
in between, it raises LockLost and the job stops without touching another file.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

import psycopg2
import psycopg2.extensions

from ingest import db

logger = logging.getLogger("ingest")
T = TypeVar("T")

# (namespace, key) of the advisory lock that one ingest run at a time holds, per database.
LOCK_KEYS = (0x5EF0D, 1)
KEEPALIVE, KEEPALIVE_S = db.KEEPALIVE, db.KEEPALIVE_S


class StoreError(RuntimeError):
    pass


class DatabaseDown(StoreError):
    pass


class LockBusy(StoreError):
    pass


class LockLost(StoreError):
    pass


TRANSIENT = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Store:
    def __init__(self, url: str, *, retry_for: float = 60.0, on_retry: Callable[[], None] | None = None):
        self.url = url
        self.retry_for = retry_for
        self.on_retry = on_retry or (lambda: None)
        self.conn: psycopg2.extensions.connection | None = None
        self.locked = False

    # -- connection and lock ---------------------------------------------------------------
    def _connect(self) -> psycopg2.extensions.connection:
        return psycopg2.connect(self.url, connect_timeout=10, application_name="refund-classifier-ingest",
                                **db.KEEPALIVE_ARGS)

    def acquire(self) -> None:
        """Connect and take the ingest lock, or raise LockBusy at once."""
        self.conn = self._connect()
        if not self._try_lock():
            message = self._who_holds_the_lock()
            self.close()
            raise LockBusy(message)
        self.locked = True

    def _who_holds_the_lock(self) -> str:
        run = self.one(db.load_query("lock_holder"), {})
        session = self.one(db.load_query("lock_session"), {"namespace": LOCK_KEYS[0], "key": LOCK_KEYS[1]})
        who = f"run {run[0]} on {run[1]} (pid {run[2]}, started {run[3]:%Y-%m-%d %H:%M:%S %Z})" if run else "a session with no running run recorded"
        if session is None:
            return f"another ingest run holds the ingest lock: {who}"
        pid, addr, app, since, state, state_change = session
        where = f"from {addr}" if addr else "over a local socket"
        idle = f", {state} since {state_change:%H:%M:%S %Z}" if state_change else ""
        return (f"another ingest run holds the ingest lock: {who}; PostgreSQL session {pid} {where} "
                f"({app or 'no application name'}, connected {since:%Y-%m-%d %H:%M:%S %Z}{idle}). If that client is gone, "
                f"its session ends within ~{KEEPALIVE_S} s; to end it now: SELECT pg_terminate_backend({pid})")

    def _try_lock(self) -> bool:
        with self.conn.cursor() as cur:
            cur.execute(db.load_query("try_ingest_lock"), {"namespace": LOCK_KEYS[0], "key": LOCK_KEYS[1]})
            got = cur.fetchone()[0]
        self.conn.commit()
        return got

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()  # ends the session: the advisory lock goes with it
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self.conn = None
        self.locked = False

    def _reconnect(self) -> None:
        self.close()
        self.conn = self._connect()
        if not self._try_lock():
            self.close()
            raise LockLost("PostgreSQL came back, but another ingest run took the ingest lock meanwhile; stopping this one")
        self.locked = True
        logger.info("reconnected to PostgreSQL and took the ingest lock again")

    # -- transactions ----------------------------------------------------------------------
    def transaction(self, fn: Callable[[psycopg2.extensions.cursor], T], *, hook: Callable[[], None] | None = None) -> T:
        """Run fn(cursor) in one transaction and commit it, retrying the whole transaction on a lost
        connection. fn must be idempotent (ON CONFLICT DO NOTHING): a COMMIT whose acknowledgement
        was lost may have happened, so the retry must be able to find its work already done."""
        deadline = time.monotonic() + self.retry_for
        attempt = 0
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self._reconnect()
                with self.conn.cursor() as cur:
                    result = fn(cur)
                if hook:
                    hook()
                self.conn.commit()
                return result
            except TRANSIENT as exc:
                attempt += 1
                self.close()
                delay = min(10.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0)
                if time.monotonic() + delay > deadline:
                    raise DatabaseDown(f"PostgreSQL unreachable for {self.retry_for:.0f}s: {str(exc).strip()}") from exc
                logger.warning("PostgreSQL connection lost (%s); retrying in %.1fs", str(exc).strip().splitlines()[0], delay)
                self.on_retry()
                time.sleep(delay)
            except BaseException:
                if self.conn is not None and not self.conn.closed:
                    try:
                        self.conn.rollback()
                    except TRANSIENT:
                        self.close()
                raise

    def one(self, sql: str, params: dict):
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
        self.conn.commit()
        return row
