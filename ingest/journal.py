"""The job's journal in PostgreSQL: the rows it records, the moves it plans, and its runs.

`predictions` holds one row per content and model version (the unique key makes a retried
transaction harmless); `ingest_files` holds one row per file of a run: where it goes, and whether
the move happened ('pending' -> 'moved' | 'superseded' | 'missing'). A move is planned in the same
transaction as its row, and done only after that commit (see ingest.job), so after a kill the
'pending' rows say exactly which moves to finish: `recover()`.

Whatever one file brings, it costs that file alone. Its name need not be UTF-8: the text columns
hold a display form and `*_bytes` columns the exact bytes (`stored_path`). An answer PostgreSQL
cannot hold (NaN, a confidence outside [0, 1], no label) is recorded as rejected, `bad_answer`
(`answer_problem`). Should a batch's insert still fail, its files are written one by one, each in
its own savepoint, and a file whose rows cannot be written is left in the inbox (`Written.left`).

Every statement is a named query in ingest/sql/ (`db.load_query`).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json, execute_values

from ingest import db, files
from ingest.outcomes import Item, KnownRow, Outcome, Summary
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
    original_path_bytes: bytes | None  # original_path's exact bytes when it is not valid UTF-8


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
    source_path_bytes: bytes | None  # exact bytes of source_path / dest_path when not valid UTF-8
    dest_path_bytes: bytes | None


class PlannedMove(NamedTuple):
    outcome: Outcome
    dest: Path
    destination: str  # processed | quarantine
    file_id: int


class Written(NamedTuple):
    """What Journal.record committed: the moves to make, and the files whose rows could not be
    written (outcome, reason): those stay in the inbox for the next run."""

    plan: list[PlannedMove]
    left: list[tuple[Outcome, str]]


# A row that PostgreSQL or psycopg2 refuses because of its values: it costs its own file alone.
# (ProgramLimitExceeded, e.g. an index row too large, is an OperationalError: caught here before
# Store.transaction would take it for a lost connection.)
ROW_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.errors.ProgramLimitExceeded,
              ValueError, TypeError, OSError)


def stored_path(path: str | os.PathLike) -> tuple[str, bytes | None]:
    """(text, exact bytes or None): how a path is stored. A name that is not valid UTF-8 (Latin-1
    written by an SMB share, say) cannot be PostgreSQL text (psycopg2 raises UnicodeEncodeError on
    the surrogates Python decodes it to): its text is a display form, each undecodable byte as
    \\xNN, and its exact bytes go beside it."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def path_from_row(text: str, raw: bytes | memoryview | None) -> Path:
    """The exact path a row stored with stored_path()."""
    return Path(os.fsdecode(bytes(raw))) if raw is not None else Path(text)


def _text(value: Any) -> str:
    """value as text PostgreSQL accepts: NUL and lone surrogates escaped."""
    return str(value).replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def answer_problem(ok: bool, body: Any) -> str | None:
    """What makes TorchServe's answer unfit to record as it is, or None. A prediction needs a label,
    a confidence in [0, 1] (or none), top-k that is JSON without NaN/Infinity and a boolean (or no)
    needs_review; a rejection needs a code."""
    if not isinstance(body, dict):
        return f"the answer is not a JSON object: {str(body)[:200]!r}"
    if not ok:
        code = body.get("code")
        return None if isinstance(code, str) and code and _text(code) == code else f"the rejection has no usable code: {code!r}"
    label, confidence, review = body.get("label"), body.get("confidence"), body.get("needs_review")
    if not isinstance(label, str) or not label.strip() or _text(label) != label:
        return f"the label is missing or not text: {label!r}"
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            return f"the confidence is not a number: {confidence!r}"
        if not math.isfinite(confidence) or not 0 <= confidence <= 1:
            return f"the confidence {confidence!r} is not a number in [0, 1]"
    if review is not None and not isinstance(review, bool):
        return f"needs_review is not a boolean: {review!r}"
    try:
        # jsonb takes neither NaN/Infinity nor \u0000 nor a lone surrogate
        text = json.dumps(body.get("topk"), allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, TypeError) as exc:
        return f"the top-k cannot be stored as JSON: {exc}"
    if "\\u0000" in text:
        return "the top-k holds a NUL character"
    return None


def vet(o: Outcome) -> str | None:
    """Turn an answer that cannot be recorded as it is into a rejection, code `bad_answer`; returns
    what was wrong, or None when the answer is fine as it is."""
    problem = answer_problem(o.ok, o.body)
    if problem is None:
        return None
    version = o.body.get("version") if isinstance(o.body, dict) else None
    o.ok = False
    o.body = {"code": "bad_answer", "error": f"TorchServe's answer cannot be recorded: {problem}",
              **({"version": _text(version)} if version is not None else {})}
    return problem


def prediction_row(o: Outcome, s: Settings, run_id: int) -> PredictionRow:
    """The row that records o.body, the answer (a prediction or a rejection) about o's photo;
    o has been through vet()."""
    b, e = o.body, o.item.entry
    version = _text(b.get("version") or s.model_version or "unknown")
    # Recorded under the name we asked for, whatever the answer says: the unique key depends on it.
    model = s.model_name
    original_path, original_bytes = stored_path(e.relative)
    common = dict(sha256=o.item.sha256, original_path=original_path, filename=stored_path(e.path.name)[0],
                  size_bytes=o.item.size, model_name=model, model_version=version, run_id=run_id,
                  received_at=o.item.received_at, original_path_bytes=original_bytes)
    if o.ok:
        return PredictionRow(**common, label=b["label"], confidence=b.get("confidence"), topk=Json(b.get("topk")),
                             needs_review=b.get("needs_review"), status="ok", error=None, error_code=None)
    code = _text(b.get("code"))
    return PredictionRow(**common, label=None, confidence=None, topk=None, needs_review=None, status="rejected",
                         error=f"{code}: {_text(b.get('error'))}", error_code=code)


class NameTaken(ValueError):
    """Two files of one run whose names have the same display form (one of them not UTF-8)."""


def ambiguous(text: str) -> bool:
    """Whether another path could be stored as the same text: a name that is not UTF-8 is stored
    with each odd byte as \\xNN (stored_path), which a UTF-8 name may spell out literally. Texts
    without a backslash-x come from one path alone."""
    return "\\x" in text


class Journal:
    def __init__(self, store: Store, settings: Settings, hook: Callable[[str], None] = lambda point: None):
        self.store, self.s, self.hook = store, settings, hook
        self.run_id: int | None = None
        # source_path as stored -> the path it stands for, this run; only texts that two names can share
        # (see ambiguous()), so that the run's memory does not grow with its files.
        self._sources: dict[str, str] = {}
        self.stuck: set[str] = set()  # inbox paths whose earlier move recover() could not finish: not taken again

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
    def known(self, items: list[Item]) -> dict[str, KnownRow]:
        """{sha256: KnownRow} of the contents already recorded for
        the model (the pinned version, or any version when none is pinned): those are not sent again."""
        shas = sorted({i.sha256 for i in items})
        if not shas:
            return {}

        def q(cur):
            cur.execute(db.load_query("find_predictions"), {"model": self.s.model_name, "shas": shas, "version": self.s.model_version})
            return {sha: KnownRow(pid, status, code, error) for sha, pid, status, _ver, code, error in cur.fetchall()}
        return self.store.transaction(q)

    def record(self, outs: list[Outcome], *, before_commit: Callable[[], None] | None = None) -> Written:
        """Transaction 1 of a batch: the new rows and where each file goes, committed together."""
        return self.store.transaction(lambda cur: self._write(cur, outs), hook=before_commit)

    def _write(self, cur, outs: list[Outcome]) -> Written:
        """The batch in one statement per table; if one of its rows is refused, file by file, each
        in a savepoint, so that the refused file alone is left out. Idempotent (see
        Store.transaction): a retry after a lost COMMIT acknowledgement finds its rows."""
        for o in outs:
            if o.body is not None and (problem := vet(o)):
                logger.warning("%s: %s; recorded as rejected (bad_answer)", o.item.entry.relative, problem,
                               extra={"event": "bad_answer", "path": o.item.entry.relative})
        cur.execute("SAVEPOINT batch")
        try:
            plan = self._write_rows(cur, outs)
            cur.execute("RELEASE SAVEPOINT batch")
            return Written(plan, [])
        except ROW_ERRORS as exc:
            cur.execute("ROLLBACK TO SAVEPOINT batch")
            logger.warning("recording a batch of %d failed (%s: %s); recording its files one by one", len(outs),
                           type(exc).__name__, str(exc).strip()[:300], extra={"event": "batch_fallback"})
        for o in outs:  # what the failed attempt set is void
            if o.body is not None:
                o.prediction_id = None
        plan, left = [], []
        for o in outs:
            if o.leader is not None and o.leader.prediction_id is None:
                left.append((o, "the row of the same content in this run could not be written"))
                continue
            cur.execute("SAVEPOINT one")
            try:
                plan += self._write_rows(cur, [o])
                cur.execute("RELEASE SAVEPOINT one")
            except ROW_ERRORS as exc:
                cur.execute("ROLLBACK TO SAVEPOINT one")
                o.prediction_id = None
                left.append((o, f"{type(exc).__name__}: {str(exc).strip()[:300]}"))
        return Written(plan, left)

    def _write_rows(self, cur, outs: list[Outcome]) -> list[PlannedMove]:
        sources = {}
        for o in outs:
            text = stored_path(o.item.entry.path)[0]
            if not ambiguous(text):
                continue
            if self._sources.get(text, str(o.item.entry.path)) != str(o.item.entry.path):
                raise NameTaken(f"{text!r} stands for another file already recorded in this run; this one waits for the next run")
            sources[text] = str(o.item.entry.path)
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
                    o.duplicate = not (rid == self.run_id and path == r.original_path)
        for o in outs:
            if o.known is not None:
                o.prediction_id, o.status, o.duplicate = o.known.prediction_id, o.known.status, True
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
        rows = []
        for o, dest, destination in plan:
            (source, source_bytes), (dest_text, dest_bytes) = stored_path(o.item.entry.path), stored_path(dest)
            rows.append(FileRow(run_id=self.run_id, prediction_id=o.prediction_id, sha256=o.item.sha256,
                                source_path=source, relative_path=stored_path(o.item.entry.relative)[0],
                                dest_path=dest_text, destination=destination, duplicate=o.duplicate,
                                source_path_bytes=source_bytes, dest_path_bytes=dest_bytes))
        execute_values(cur, db.load_query("insert_files"), rows)
        cur.execute(db.load_query("planned_files"), {"run_id": self.run_id, "sources": [r.source_path for r in rows]})
        ids = dict(cur.fetchall())
        self._sources.update(sources)
        return [PlannedMove(o, dest, destination, ids[r.source_path]) for (o, dest, destination), r in zip(plan, rows)]

    def mark(self, ids: list[int], state: str, note: str | None = None) -> None:
        """Transaction 2: the planned moves `ids` are done ('moved') or given up ('superseded', 'missing')."""
        if ids:
            self.store.transaction(lambda cur: cur.execute(db.load_query("mark_files"), {"ids": ids, "state": state, "note": note}))

    def note(self, ids: list[int], note: str) -> None:
        """Pending moves `ids` that could not be finished now: they stay pending, with the reason."""
        if ids:
            self.store.transaction(lambda cur: cur.execute(db.load_query("note_files"), {"ids": ids, "note": note}))

    # -- recovery ------------------------------------------------------------------------
    def recover(self, summary: Summary) -> None:
        """Finish the moves an earlier run of this inbox committed but did not complete (it was
        killed); each one moved counts in summary.recovered as it happens. A move that cannot be
        finished now (the filesystem refuses) stays pending, with a note, and counts in
        summary.recovery_failed; the run goes on. Moves of another inbox or other destinations
        (another job on this database) are left to their own job."""
        rows = self.store.transaction(lambda cur: (cur.execute(db.load_query("pending_moves")), cur.fetchall())[1])
        mine = []
        for file_id, sha, source, dest, destination, source_bytes, dest_bytes in rows:
            src, dst = path_from_row(source, source_bytes), path_from_row(dest, dest_bytes)
            root = self.s.processed if destination == "processed" else self.s.quarantine
            if _under(src, self.s.inbox) and _under(dst, root):
                mine.append((file_id, sha, src, dst))
        if len(rows) > len(mine):
            logger.info("%d pending move(s) belong to another inbox or other destinations; left to their job",
                        len(rows) - len(mine), extra={"event": "recovery_others"})
        if mine:
            logger.info("finishing %d move(s) an earlier run left pending", len(mine), extra={"event": "recovery"})
        for file_id, sha, src, dst in mine:
            try:
                state, note = self._finish_move(sha, src, dst)
            except OSError as exc:
                state, note = None, f"could not be finished now: {exc}"
            if state is None:
                summary.recovery_failed += 1
                self.stuck.add(str(src))  # taken again, it would get a second row and a second copy
                logger.error("%s: its pending move to %s %s; left pending for the next run", src, dst, note,
                             extra={"event": "recovery_failed", "path": str(src)})
                self.note([file_id], note)
                continue
            if state != "moved":
                logger.warning("%s: %s", src, note, extra={"event": f"recovery_{state}", "path": str(src)})
            self.mark([file_id], state, note)
            summary.recovered += state == "moved"

    def _finish_move(self, sha: str, src: Path, dst: Path) -> tuple[str | None, str | None]:
        """(state, note) for a pending move of content `sha` from src to dst, after finishing it if it
        can be; state None: it cannot be decided or finished now (it stays pending). Raises OSError
        when the filesystem refuses. dst counts as done only if it holds `sha`."""
        src_there, dst_there = _there(src), _there(dst)
        src_sha = files.sha256_of(src) if src_there else None
        if src_there and src_sha is None:
            return None, "could not be finished now: the inbox file cannot be read to check its content"
        if dst_there:
            dst_sha = files.sha256_of(dst)
            if dst_sha is None:
                return None, "could not be finished now: the destination cannot be read to check its content"
            if dst_sha != sha:
                if src_sha == sha:  # the photo is still in the inbox; let the next run move it afresh
                    return "superseded", ("its destination holds other content; the photo stays in the inbox, "
                                          "to be taken again and moved under a free name")
                return "missing", "the photo is not in the inbox, and its destination holds other content"
            if src_sha == sha:  # killed between link and unlink: the photo is at dest; finish the move
                (error,) = files.unlink_sources([(src, dst)])
                if error is not None:
                    raise error
                return "moved", None
            if src_there:
                return "moved", "the inbox has a new file under the same name; left for the next run"
            return "moved", None  # moved; only the bookkeeping was lost
        if src_there:
            if src_sha != sha:
                return "superseded", "the file under this name changed since its row was recorded; left in the inbox"
            # our own unfinished copy (cross-filesystem move), never a photo of record
            files.partial_name(dst).unlink(missing_ok=True)
            files.move(src, dst)
            self.hook("recovery_mid_move")
            return "moved", None
        return "missing", "the file was neither in the inbox nor at its destination"


def _there(path: Path) -> bool:
    """Whether something is at path (a link counts; it is not followed); OSError if that cannot be told."""
    try:
        os.lstat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True


def _under(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)
