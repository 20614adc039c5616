"""Photos a TorchServe worker died on, counted per content and model in PostgreSQL
(`worker_crashes`), so that the count survives runs and pods: see ingest.predict's isolation.

Called from the job's request threads, each call on a connection of its own (the job's Store
connection belongs to its main thread); a worker death is rare, so the connection is not kept.
"""
from __future__ import annotations

from typing import Callable

from ingest import db
from ingest.store import TRANSIENT, DatabaseDown

WORKER_CRASH = "worker_crash"  # the worker process died on the request
WORKER_TIMEOUT = "worker_timeout"  # TorchServe killed it for not answering within responseTimeout
KINDS = (WORKER_CRASH, WORKER_TIMEOUT)


class CrashLog:
    def __init__(self, database_url: str, model_name: str, run_id: Callable[[], int | None]):
        self.url, self.model, self.run_id = database_url, model_name, run_id

    def died(self, shas: list[str], kind: str, *, alone: bool) -> dict[str, int]:
        """A worker died (`kind`) holding these contents: each one's in_flight + 1, and alone + 1 where
        `alone`. Returns {sha256: its alone count now}."""
        if kind not in KINDS:
            raise ValueError(f"unknown worker death {kind!r}")
        try:
            with db.connect(self.url) as conn, conn.cursor() as cur:
                cur.execute(db.load_query("worker_crashed"), {"shas": sorted(set(shas)), "model": self.model,
                                                               "alone": int(alone), "kind": kind, "run_id": self.run_id()})
                return {sha: n_alone for sha, _, n_alone in cur.fetchall()}
        except TRANSIENT as exc:
            raise DatabaseDown(f"PostgreSQL unavailable while counting a worker death: {str(exc).strip()}") from exc


class NoCrashLog:
    """For a Predictor without a database (counts in memory, this process only)."""

    def __init__(self):
        self.alone: dict[str, int] = {}

    def died(self, shas: list[str], kind: str, *, alone: bool) -> dict[str, int]:
        for sha in set(shas):
            self.alone[sha] = self.alone.get(sha, 0) + int(alone)
        return {sha: self.alone[sha] for sha in set(shas)}
