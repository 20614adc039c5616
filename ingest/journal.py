"""The job's journal in PostgreSQL: the rows it records, the moves it plans, and its runs.

`predictions` holds one row per content and model version (the unique key makes a retried
transaction harmless); `ingest_files` holds one row per file of a run: where it goes, and whether
the move happened ('pending' -> 'moved' | 'superseded' | 'missing'). A move is planned in the same
transaction as its row, and done only after that commit (see ingest.job), so after a kill the
'pending' rows say exactly which moves to finish: `recover()`.

Every statement is a named query in ingest/sql/ (`db.load_query`).
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

from psycopg2.extras import Json, execute_values

from ingest import db, files
from ingest.outcomes import Item, Outcome, Summary
from ingest.settings import Settings
from ingest.store import Store

logger = logging.getLogger("ingest")


class PredictionRow(NamedTuple):
    """A new `predictions` row. The fields are in the column order of insert_predictions.sql, whose
    `VALUES %s` execute_values fills by position."""

    sha256: str
    original_path: str
    filename: str
    size_bytes: int
    label: str | None
    confidence: float | None
    topk: Any  # Json(list) when ok
    needs_review: bool | None
    model_name: str
    model_version: str
    run_id: int
    received_at: datetime
    status: str  # ok | rejected
    error: str | None
    error_code: str | None


class FileRow(NamedTuple):
    """A new `ingest_files` row (a planned move), in the column order of insert_files.sql."""

    run_id: int
    prediction_id: int
    sha256: str
    source_path: str
    relative_path: str
    dest_path: str
    destination: str  # processed | quarantine
    duplicate: bool


class PlannedMove(NamedTuple):
    outcome: Outcome
    dest: Path
    destination: str  # processed | quarantine
    file_id: int


def prediction_row(o: Outcome, s: Settings, run_id: int) -> PredictionRow:
    """The row that records o.body, the answer (a prediction or a rejection) about o's photo."""
    b, e = o.body, o.item.entry
    version = str(b.get("version") or s.model_version or "unknown")
    # Recorded under the name we asked for, whatever the answer says: the unique key depends on it.
    model = s.model_name
    common = dict(sha256=o.item.sha256, original_path=e.relative, filename=e.path.name, size_bytes=o.item.size,
                  model_name=model, model_version=version, run_id=run_id, received_at=o.item.received_at)
    if o.ok:
        return PredictionRow(**common, label=b["label"], confidence=b.get("confidence"), topk=Json(b.get("topk")),
                             needs_review=b.get("needs_review"), status="ok", error=None, error_code=None)
    return PredictionRow(**common, label=None, confidence=None, topk=None, needs_review=None, status="rejected",
                         error=f"{b.get('code')}: {b.get('error')}", error_code=str(b.get("code")))


class Journal:
    def __init__(self, store: Store, settings: Settings, hook: Callable[[str], None] = lambda point: None):
        self.store, self.s, self.hook = store, settings, hook
        self.run_id: int | None = None

    # -- runs ----------------------------------------------------------------------------
    def start_run(self) -> int:
        """Mark runs that died without recording their end as interrupted, then record this one.
        Called while holding the ingest lock."""
        stale = self.store.transaction(lambda cur: (cur.execute(db.load_query("interrupted_runs"), {"current": -1}), cur.fetchall())[1])
        if stale:
            logger.warning("marked run(s) %s as interrupted", ", ".join(str(r[0]) for r in stale))
        self.run_id = self.store.transaction(lambda cur: (cur.execute(db.load_query("start_run"), {
            "host": socket.gethostname(), "pid": os.getpid(), "settings": Json(self.s.public())}), cur.fetchone()[0])[1])
        return self.run_id

    def finish_run(self, status: str, counts: dict, error: str | None) -> None:
        self.store.transaction(lambda cur: cur.execute(db.load_query("finish_run"), {
            "id": self.run_id, "status": status, "counts": Json(counts), "error": error}))

    # -- rows ----------------------------------------------------------------------------
    def known(self, items: list[Item]) -> dict[str, tuple]:
        """{sha256: (prediction id, status)} of the contents already recorded for the model
        (the pinned version, or any version when none is pinned): those are not sent again."""
        shas = sorted({i.sha256 for i in items})
        if not shas:
            return {}

        def q(cur):
            cur.execute(db.load_query("find_predictions"), {"model": self.s.model_name, "shas": shas, "version": self.s.model_version})
            return {sha: (pid, status) for sha, pid, status, _ver in cur.fetchall()}
        return self.store.transaction(q)

    def record(self, outs: list[Outcome], *, before_commit: Callable[[], None] | None = None) -> list[PlannedMove]:
        """Transaction 1 of a batch: the new rows and where each file goes, committed together."""
        return self.store.transaction(lambda cur: self._write(cur, outs), hook=before_commit)

    def _write(self, cur, outs: list[Outcome]) -> list[PlannedMove]:
        """Idempotent (see Store.transaction): a retry after a lost COMMIT acknowledgement finds its rows."""
        new = [o for o in outs if o.body is not None]
        if new:
            rows = [prediction_row(o, self.s, self.run_id) for o in new]
            inserted = execute_values(cur, db.load_query("insert_predictions"), rows, fetch=True)
            got = {(sha, ver): pid for pid, sha, ver in inserted}
            missing = [o for o, r in zip(new, rows) if (r.sha256, r.model_version) not in got]
            if missing:  # recorded before (another version's precheck missed it, or our own lost COMMIT ack)
                cur.execute(db.load_query("existing_predictions"),
                            {"model": self.s.model_name, "shas": [o.item.sha256 for o in missing]})
                existing = {(sha, ver): (pid, rid, path) for pid, sha, ver, rid, path in cur.fetchall()}
            for o, r in zip(new, rows):
                o.status = r.status
                if (r.sha256, r.model_version) in got:
                    o.prediction_id = got[(r.sha256, r.model_version)]
                else:
                    pid, rid, path = existing[(r.sha256, r.model_version)]
                    o.prediction_id = pid
                    # Our own row (the retried transaction's first try) is no duplicate.
                    o.duplicate = not (rid == self.run_id and path == o.item.entry.relative)
        for o in outs:
            if o.known is not None:
                o.prediction_id, o.status, o.duplicate = o.known[0], o.known[1], True
            elif o.leader is not None:
                o.prediction_id, o.status, o.duplicate = o.leader.prediction_id, o.leader.status, True
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        plan, taken = [], set()
        for o in outs:
            destination = "processed" if o.status == "ok" else "quarantine"
            root = self.s.processed if destination == "processed" else self.s.quarantine
            dest = files.choose_dest(root, day, o.item.entry.relative, o.item.sha256, taken)
            taken.add(dest)
            plan.append((o, dest, destination))
        execute_values(cur, db.load_query("insert_files"), [
            FileRow(self.run_id, o.prediction_id, o.item.sha256, str(o.item.entry.path), o.item.entry.relative,
                    str(dest), destination, o.duplicate)
            for o, dest, destination in plan])
        cur.execute(db.load_query("planned_files"), {"run_id": self.run_id, "sources": [str(o.item.entry.path) for o, _, _ in plan]})
        ids = dict(cur.fetchall())
        return [PlannedMove(o, dest, destination, ids[str(o.item.entry.path)]) for o, dest, destination in plan]

    def mark(self, ids: list[int], state: str, note: str | None = None) -> None:
        """Transaction 2: the planned moves `ids` are done ('moved') or given up ('superseded', 'missing')."""
        if ids:
            self.store.transaction(lambda cur: cur.execute(db.load_query("mark_files"), {"ids": ids, "state": state, "note": note}))

    # -- recovery ------------------------------------------------------------------------
    def recover(self, summary: Summary) -> None:
        """Finish the moves an earlier run committed but did not complete (it was killed);
        each one moved counts in summary.recovered as it happens."""
        rows = self.store.transaction(lambda cur: (cur.execute(db.load_query("pending_moves")), cur.fetchall())[1])
        if rows:
            logger.info("finishing %d move(s) an earlier run left pending", len(rows), extra={"event": "recovery"})
        for file_id, sha, source, dest, _destination in rows:
            src, dst = Path(source), Path(dest)
            src_there, dst_there = src.exists() or src.is_symlink(), dst.exists()
            state, note = "moved", None
            if dst_there and not src_there:
                pass  # moved; only the bookkeeping was lost
            elif dst_there and src_there:
                if files.sha256_of(src) == sha and files.sha256_of(dst) == sha:
                    os.unlink(src)  # killed between link and unlink: the photo is safe at dest
                else:
                    note = "the inbox has a new file under the same name; left for the next run"
            elif src_there:
                if files.sha256_of(src) == sha:
                    tmp = files.partial_name(dst)
                    if tmp.exists():  # our own unfinished copy (cross-filesystem move), never a photo of record
                        tmp.unlink()
                    try:
                        files.move(src, dst)
                    except OSError as exc:
                        logger.error("%s: could not finish its move to %s (%s)", source, dest, exc)
                        continue
                    self.hook("recovery_mid_move")
                else:
                    state, note = "superseded", "the file under this name changed since its row was recorded; left in the inbox"
            else:
                state, note = "missing", "the file was neither in the inbox nor at its destination"
                logger.warning("%s: %s", source, note)
            self.mark([file_id], state, note)
            summary.recovered += state == "moved"
