"""The ingestion job: every photo in the inbox -> TorchServe -> one row in PostgreSQL -> out of the inbox.

Exactly once, crash-safe. For each batch of answers:
  1. one transaction inserts the prediction rows (ON CONFLICT DO NOTHING on sha256+model+version)
     and one `ingest_files` row per file naming the folder it will be moved to;
  2. only after that commit, each file is moved (link+unlink or rename: never a moment without it);
  3. a second transaction marks those files moved.
A kill between 1 and 3 leaves `ingest_files` rows 'pending': the next run finishes those moves
before anything else. A kill before 1 leaves the files in the inbox with no row: the next run
classifies them. A file whose content already has a row for the model is not sent again: it is
moved, and noted as a duplicate. So every file ends in processed/ with its row, in quarantine/
with its error row, or still in the inbox -- whatever is killed, and when.

Overlapping runs: the whole run holds a PostgreSQL advisory lock; a second run exits at once.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests
from psycopg2.extras import Json, execute_values

from ingest import db, files
from ingest.settings import Settings
from ingest.store import TRANSIENT, DatabaseDown, LockLost, Store
from serving.client import AuthError, TorchServeClient, is_invalid_key

logger = logging.getLogger("ingest")


# -- errors ----------------------------------------------------------------------------------

class IngestError(RuntimeError):
    exit_code = 1


class TorchServeDown(IngestError):
    exit_code = 3


class TorchServeRefused(IngestError):
    """Not about one photo: the model is missing, or the token is refused. Stops the run."""
    exit_code = 3


class FileFailed(Exception):
    """TorchServe could not classify this one photo (after retries); it stays in the inbox."""


class _Transient(Exception):
    def __init__(self, reason: str, down: bool):
        super().__init__(reason)
        self.reason, self.down = reason, down


# -- results ---------------------------------------------------------------------------------

@dataclass
class Item:
    entry: files.Entry
    data: bytes | None
    sha256: str
    size: int
    received_at: datetime


@dataclass
class Outcome:
    """What becomes of one file: a new row (`body`), or a reference to an existing one (`known`/`leader`)."""

    item: Item
    body: dict | None = None  # the answer to record (200 or a rejection)
    ok: bool = False
    known: tuple | None = None  # (id, status) of a row that already existed before this run asked
    leader: "Outcome | None" = None  # same content earlier in this run
    prediction_id: int | None = None
    status: str | None = None  # ok | rejected, once known
    duplicate: bool = False


@dataclass
class Summary:
    run_id: int | None = None
    status: str = "running"
    taken: int = 0
    processed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    failed: int = 0
    retried: int = 0
    recovered: int = 0
    move_failed: int = 0
    skipped: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    error: str | None = None
    exit_code: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.processed + self.duplicates + self.quarantined
        return done / self.elapsed_s if self.elapsed_s else 0.0

    def counts(self) -> dict:
        return {"taken": self.taken, "processed": self.processed, "duplicates": self.duplicates,
                "quarantined": self.quarantined, "failed": self.failed, "retried": self.retried,
                "recovered": self.recovered, "move_failed": self.move_failed, "skipped": dict(self.skipped),
                "elapsed_s": round(self.elapsed_s, 3), "images_per_s": round(self.images_per_s, 2)}

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "0"
        return (f"run {self.run_id} {self.status}: {self.processed} processed, {self.duplicates} duplicates, "
                f"{self.quarantined} quarantined, {self.failed} failed (left in the inbox), {self.retried} retried, "
                f"{self.recovered} recovered from an earlier run; skipped: {skipped}; "
                f"{self.elapsed_s:.1f}s, {self.images_per_s:.1f} images/s")


# -- test hooks ------------------------------------------------------------------------------

class Hooks:
    """INGEST_TEST_HOOK="crash@after_commit#2,pause@mid_move": SIGKILL ourselves, or wait for the test,
    at the n-th (default first) time the job reaches a named point. Only tests set it."""

    POINTS = ("after_read", "before_commit", "after_commit", "mid_move", "mid_link", "after_moves", "recovery_mid_move", "before_finish")

    def __init__(self, spec: str | None, folder: str | None):
        self.actions: dict[str, tuple[str, int]] = {}
        self.seen: Counter = Counter()
        self.folder = Path(folder) if folder else None
        for part in filter(None, (spec or "").split(",")):
            action, _, rest = part.partition("@")
            point, _, n = rest.partition("#")
            if action not in ("crash", "pause") or point not in self.POINTS:
                raise ValueError(f"Invalid INGEST_TEST_HOOK part {part!r}; use crash|pause@POINT[#N], POINT one of: {', '.join(self.POINTS)}")
            self.actions[point] = (action, int(n or 1))

    def __call__(self, point: str) -> None:
        if point not in self.actions:
            return
        self.seen[point] += 1
        action, n = self.actions[point]
        if self.seen[point] != n:
            return
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        (self.folder / f"paused-{point}").touch()
        deadline = time.monotonic() + 300
        while not (self.folder / f"resume-{point}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


# -- the job ---------------------------------------------------------------------------------

def build_client(settings: Settings) -> TorchServeClient:
    return TorchServeClient(settings.torchserve_url, settings.management_url or settings.torchserve_url,
                            key_file=settings.key_file, pool_size=settings.concurrency, timeout_s=settings.timeout)


class Job:
    def __init__(self, settings: Settings):
        self.s = settings
        self.stop = threading.Event()  # set on SIGTERM or a fatal error: take no new file, wake sleeping retries
        self.stop_requested = False
        self.summary = Summary()
        self.hook = Hooks(os.environ.get("INGEST_TEST_HOOK"), os.environ.get("INGEST_TEST_HOOK_DIR"))
        self.client = build_client(settings)
        self.path = f"predictions/{settings.model}"
        self.store = Store(settings.database_url, retry_for=settings.db_retry_for)
        self.fatal: IngestError | None = None
        self._lock = threading.Lock()
        self.buffer: list[Outcome] = []
        self.run_id: int | None = None

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): finish what is in flight, commit, move, and end the run."""
        self.stop_requested = True
        self.stop.set()

    # -- TorchServe ----------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        # Exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter").
        d = min(self.s.backoff_max, self.s.backoff * 2 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)

    def _count_retry(self) -> None:
        with self._lock:
            self.summary.retried += 1

    def _attempt(self, item: Item) -> tuple[bool, dict]:
        try:
            r = self.client.inference("POST", self.path, data=item.data,
                                      headers={"Content-Type": "application/octet-stream"},
                                      timeout=(self.s.connect_timeout, self.s.timeout))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}", down=True) from exc
        except AuthError as exc:  # e.g. the key file is rewritten while TorchServe restarts
            raise _Transient(f"authorization: {exc}", down=True) from exc
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:500]}
        if not isinstance(body, dict):
            body = {"error": str(body)[:500]}
        code = r.status_code
        if code == 200 and "label" in body:
            return True, body
        if is_invalid_key(r):
            # The client already re-read the key file and renewed the key: this is not about the photo.
            if self.s.key_file is None:
                raise TorchServeRefused("TorchServe requires a token (400 InvalidKeyException): "
                                        "give its key_file.json with --key-file or TORCHSERVE_KEY_FILE")
            raise _Transient(f"token refused: {body.get('message', body)}", down=True)
        if code in (503, 507) or code >= 500:
            raise _Transient(f"HTTP {code}: {body.get('message') or body.get('error') or body}", down=code in (503, 507))
        if code == 404:
            raise TorchServeRefused(f"TorchServe has no model {self.s.model!r}: {body.get('message', body)}")
        if code in (408, 429):
            raise _Transient(f"HTTP {code}", down=True)
        if 400 <= code < 500 and isinstance(body.get("code"), str) and "error" in body:
            return False, body  # the handler's answer about this photo
        if code == 413:
            return False, {"code": "too_large", "error": f"TorchServe refused the request as too large: {body.get('message', body)}"}
        raise FileFailed(f"unexpected answer HTTP {code}: {str(body)[:300]}")

    def predict(self, item: Item) -> tuple[bool, dict]:
        last: _Transient | None = None
        for attempt in range(1, self.s.retries + 1):
            if self.stop.is_set() and attempt > 1:
                break
            try:
                return self._attempt(item)
            except _Transient as exc:
                last = exc
                if attempt == self.s.retries:
                    break
                delay = self._backoff(attempt)
                self._count_retry()
                logger.warning("%s: %s; retry %d/%d in %.1fs", item.entry.relative, exc.reason, attempt,
                               self.s.retries - 1, delay, extra={"event": "retry", "path": item.entry.relative})
                if self.stop.wait(delay):
                    break
        if self.stop.is_set():
            raise FileFailed(f"stopped before an answer ({last.reason if last else 'not sent'})")
        if last is not None and last.down:
            raise TorchServeDown(f"TorchServe at {self.s.torchserve_url} stays unavailable after {self.s.retries} attempts: {last.reason}")
        raise FileFailed(last.reason if last else "no answer")

    def ping(self) -> None:
        last = None
        for attempt in range(1, self.s.retries + 1):
            try:
                r = self.client.inference("GET", "ping", timeout=(self.s.connect_timeout, 10))
                if r.status_code == 200:
                    return
                if is_invalid_key(r) and self.s.key_file is None:
                    raise TorchServeRefused("TorchServe requires a token (400 InvalidKeyException): "
                                            "give its key_file.json with --key-file or TORCHSERVE_KEY_FILE")
                last = f"/ping answered HTTP {r.status_code}"
            except (requests.ConnectionError, requests.Timeout, AuthError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < self.s.retries:
                delay = self._backoff(attempt)
                logger.warning("TorchServe at %s not ready (%s); retry %d/%d in %.1fs", self.s.torchserve_url,
                               last, attempt, self.s.retries - 1, delay, extra={"event": "retry"})
                if self.stop.wait(delay):
                    break
        raise TorchServeDown(f"TorchServe at {self.s.torchserve_url} stays unavailable after {self.s.retries} attempts: {last}")

    # -- database ------------------------------------------------------------------------
    def _row(self, o: Outcome) -> tuple:
        b, e = o.body, o.item.entry
        version = str(b.get("version") or self.s.model_version or "unknown")
        model = b.get("model") or self.s.model_name
        if model != self.s.model_name:
            model = self.s.model_name  # record under the name we asked for; the unique key depends on it
        if o.ok:
            return (o.item.sha256, e.relative, e.path.name, o.item.size, b["label"], b.get("confidence"),
                    Json(b.get("topk")), b.get("needs_review"), model, version, self.run_id, o.item.received_at,
                    "ok", None, None)
        return (o.item.sha256, e.relative, e.path.name, o.item.size, None, None, None, None, model, version,
                self.run_id, o.item.received_at, "rejected", f"{b.get('code')}: {b.get('error')}", str(b.get("code")))

    def _write(self, cur, outs: list[Outcome]) -> list[tuple[Outcome, Path, str]]:
        """Transaction 1 of a batch: rows + where each file goes. Idempotent (see Store.transaction)."""
        new = [o for o in outs if o.body is not None]
        if new:
            rows = [self._row(o) for o in new]
            inserted = execute_values(cur, db.load_query("insert_predictions"), rows, fetch=True)
            got = {(sha, ver): pid for pid, sha, ver in inserted}
            missing = [(o, r) for o, r in zip(new, rows) if (o.item.sha256, r[9]) not in got]
            if missing:  # recorded before (another version's precheck missed it, or our own lost COMMIT ack)
                cur.execute("SELECT id, sha256, model_version, run_id, original_path FROM predictions "
                            "WHERE model_name = %(m)s AND sha256 = ANY(%(s)s)",
                            {"m": self.s.model_name, "s": [o.item.sha256 for o, _ in missing]})
                existing = {(sha, ver): (pid, rid, path) for pid, sha, ver, rid, path in cur.fetchall()}
            for o, r in zip(new, rows):
                o.status = "ok" if o.ok else "rejected"
                if (o.item.sha256, r[9]) in got:
                    o.prediction_id = got[(o.item.sha256, r[9])]
                else:
                    pid, rid, path = existing[(o.item.sha256, r[9])]
                    o.prediction_id = pid
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
            (self.run_id, o.prediction_id, o.item.sha256, str(o.item.entry.path), o.item.entry.relative, str(dest), destination, o.duplicate)
            for o, dest, destination in plan])
        cur.execute("SELECT source_path, id FROM ingest_files WHERE run_id = %(r)s AND source_path = ANY(%(p)s)",
                    {"r": self.run_id, "p": [str(o.item.entry.path) for o, _, _ in plan]})
        ids = dict(cur.fetchall())
        return [(o, dest, destination, ids[str(o.item.entry.path)]) for o, dest, destination in plan]

    def _mark(self, ids: list[int], state: str, note: str | None = None) -> None:
        if ids:
            self.store.transaction(lambda cur: cur.execute(db.load_query("mark_files"), {"ids": ids, "state": state, "note": note}))

    def flush(self) -> None:
        if not self.buffer:
            return
        outs, self.buffer = self.buffer, []
        plan = self.store.transaction(lambda cur: self._write(cur, outs), hook=lambda: self.hook("before_commit"))
        self.hook("after_commit")
        moved = []
        for n, (o, dest, destination, file_id) in enumerate(plan):
            try:
                files.move(o.item.entry.path, dest, linked=(lambda: self.hook("mid_link")) if n == 1 else None)
            except OSError as exc:
                self.summary.move_failed += 1
                logger.error("%s: recorded, but moving it to %s failed (%s); the next run retries the move",
                             o.item.entry.relative, dest, exc, extra={"event": "move_failed", "path": o.item.entry.relative})
                continue
            moved.append(file_id)
            if n == 0:
                self.hook("mid_move")
            if o.duplicate:
                self.summary.duplicates += 1
                logger.info("%s: duplicate of an already recorded photo (row %s) -> %s", o.item.entry.relative,
                            o.prediction_id, dest, extra={"event": "duplicate", "path": o.item.entry.relative, "prediction_id": o.prediction_id})
            elif destination == "processed":
                self.summary.processed += 1
            else:
                self.summary.quarantined += 1
                logger.warning("%s: rejected (%s) -> %s", o.item.entry.relative, o.body.get("error") if o.body else "",
                               dest, extra={"event": "quarantined", "path": o.item.entry.relative})
        self.hook("after_moves")
        self._mark(moved, "moved")

    def recover(self) -> None:
        """Finish the moves an earlier run committed but did not complete (it was killed)."""
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
            self._mark([file_id], state, note)
            self.summary.recovered += state == "moved"

    # -- the inbox -----------------------------------------------------------------------
    def _skip(self, relative: str, reason: str) -> None:
        key = reason.split(" ")[0]
        self.summary.skipped[key] += 1
        level = logging.DEBUG if key in ("hidden", "not_settled", "vanished") else logging.WARNING
        logger.log(level, "%s: left in the inbox (%s)", relative, reason, extra={"event": "skipped", "path": relative, "reason": key})

    # Young files waiting for their second look; past this many, the rest wait for the next run.
    MAX_DEFERRED = 10_000

    def candidates(self):
        """Settled photos, read and hashed, in walk order; young ones after a second look."""
        exclude = (self.s.processed, self.s.quarantine)
        deferred: list[tuple[float, files.Entry]] = []
        for found in files.walk(self.s.inbox, exclude=exclude):
            if self.stop.is_set():
                return
            if isinstance(found, files.Skip):
                self._skip(found.relative, found.reason)
            elif files.settled(found, self.s.min_age):
                yield from self._read(found)
            elif self.s.settle > 0 and len(deferred) < self.MAX_DEFERRED:
                deferred.append((time.monotonic(), found))
            else:
                self._skip(found.relative, "not_settled")
        for seen_at, entry in deferred:
            if self.stop.wait(max(0.0, seen_at + self.s.settle - time.monotonic())):
                return
            try:
                st = os.lstat(entry.path)
            except OSError:
                self._skip(entry.relative, "vanished")
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (entry.size, entry.mtime_ns, entry.inode):
                self._skip(entry.relative, "not_settled")
                continue
            yield from self._read(entry)

    def _read(self, entry: files.Entry):
        try:
            data, sha, size = files.read(entry, max_bytes=self.s.max_bytes)
        except files.NotReady as exc:
            self._skip(entry.relative, exc.reason)
            return
        yield Item(entry, data, sha, size, datetime.now(timezone.utc))

    def _known(self, items: list[Item]) -> dict[str, tuple]:
        shas = sorted({i.sha256 for i in items})
        if not shas:
            return {}

        def q(cur):
            cur.execute(db.load_query("find_predictions"), {"model": self.s.model_name, "shas": shas, "version": self.s.model_version})
            return {sha: (pid, status) for sha, pid, status, _ver in cur.fetchall()}
        return self.store.transaction(q)

    # -- run -----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            db.migrate(self.s.database_url)
            self.store.acquire()  # LockBusy: another run; raised before anything is touched
        except TRANSIENT as exc:
            raise DatabaseDown(f"PostgreSQL unavailable: {str(exc).strip()}") from exc
        stale = self.store.transaction(lambda cur: (cur.execute(db.load_query("interrupted_runs"), {"current": -1}), cur.fetchall())[1])
        if stale:
            logger.warning("marked run(s) %s as interrupted", ", ".join(str(r[0]) for r in stale))
        self.run_id = self.store.transaction(lambda cur: (cur.execute(db.load_query("start_run"), {
            "host": socket.gethostname(), "pid": os.getpid(), "settings": Json(self.s.public())}), cur.fetchone()[0])[1])
        self.summary.run_id = self.run_id
        logger.info("run %d: %s -> %s (model %s)", self.run_id, self.s.inbox, self.s.torchserve_url, self.s.model,
                    extra={"event": "start", "run_id": self.run_id})

    def run(self) -> Summary:
        started = time.monotonic()
        try:
            self.start()
            try:
                self.recover()
                self.ping()
                self._loop()
            except (IngestError, DatabaseDown, LockLost) as exc:
                self.fatal = self.fatal or exc
            self.summary.elapsed_s = time.monotonic() - started
            self.hook("before_finish")
            self._finish()
        finally:
            self.store.close()
        return self.summary

    def _finish(self) -> None:
        s = self.summary
        if self.fatal is not None:
            s.status, s.error = "failed", str(self.fatal)
            s.exit_code = getattr(self.fatal, "exit_code", 4)
        elif self.stop_requested:
            s.status, s.exit_code = "stopped", 0
        else:
            s.status = "succeeded"
            s.exit_code = 1 if (s.failed or s.move_failed) else 0
        if isinstance(self.fatal, (DatabaseDown, LockLost)):
            return  # nothing more can be written; the next run marks this one interrupted
        try:
            self.store.transaction(lambda cur: cur.execute(db.load_query("finish_run"), {
                "id": self.run_id, "status": s.status, "counts": Json(s.counts()), "error": s.error}))
        except (DatabaseDown, LockLost) as exc:
            s.status, s.error, s.exit_code = "failed", str(exc), 4

    def _loop(self) -> None:
        progress = _progress(self.s.progress)
        with ThreadPoolExecutor(max_workers=self.s.concurrency, thread_name_prefix="ingest") as pool:
            try:
                self._pump(pool, progress)
            except BaseException:
                self.stop.set()  # don't let the pool's shutdown wait out sleeping retries
                raise
        progress.close()

    def _pump(self, pool: ThreadPoolExecutor, progress) -> None:
        window = 2 * self.s.concurrency  # one server-side batch being computed while the next fills
        source = self.candidates()
        pending: dict[Future, Outcome] = {}
        waiting: dict[str, list[Item]] = defaultdict(list)  # same content as a request in flight
        in_flight: dict[str, Outcome] = {}
        exhausted = False
        last_flush = time.monotonic()
        first_read = True
        while True:
            # keep the window full
            while (not exhausted and not self.stop.is_set() and self.fatal is None and len(pending) < window
                   and len(self.buffer) < self.s.batch_size):
                group = []
                for item in source:
                    group.append(item)
                    self.summary.taken += 1
                    if self.s.limit and self.summary.taken >= self.s.limit:
                        exhausted = True
                        break
                    if len(group) >= window - len(pending):
                        break
                else:
                    exhausted = True
                if first_read and group:
                    first_read = False
                    self.hook("after_read")
                known = self._known(group)
                for item in group:
                    if item.sha256 in known:
                        item.data = None
                        self.buffer.append(Outcome(item, known=known[item.sha256]))
                        progress.update(1)
                    elif item.sha256 in in_flight:
                        item.data = None  # never sent: it takes its leader's answer
                        waiting[item.sha256].append(item)
                    elif item.data is None:  # over --max-bytes: TorchServe would refuse it unread
                        self.buffer.append(Outcome(item, ok=False, body={
                            "code": "too_large", "error": f"the file is {item.size} bytes; the limit is {self.s.max_bytes}"}))
                        progress.update(1)
                    else:
                        o = Outcome(item)
                        in_flight[item.sha256] = o
                        pending[pool.submit(self.predict, item)] = o
            done = set()
            if pending:
                done, _ = wait(pending, timeout=self.s.flush_every, return_when=FIRST_COMPLETED)
            for fut in done:
                o = pending.pop(fut)
                del in_flight[o.item.sha256]
                followers = waiting.pop(o.item.sha256, [])
                try:
                    o.ok, o.body = fut.result()
                except FileFailed as exc:
                    self.summary.failed += 1 + len(followers)
                    logger.error("%s: not classified, left in the inbox: %s", o.item.entry.relative, exc,
                                 extra={"event": "failed", "path": o.item.entry.relative})
                    continue
                except IngestError as exc:
                    self.summary.failed += 1 + len(followers)
                    if self.fatal is None:
                        self.fatal = exc
                        logger.error("stopping: %s", exc, extra={"event": "stopping"})
                        self.stop.set()  # wakes retries that are sleeping
                    continue
                o.item.data = None  # the bytes are not needed any more
                self.buffer.append(o)
                self.buffer.extend(Outcome(f, leader=o) for f in followers)
                progress.update(1 + len(followers))
            if (len(self.buffer) >= self.s.batch_size or not pending
                    or (self.buffer and time.monotonic() - last_flush >= self.s.flush_every)):
                self.flush()
                last_flush = time.monotonic()
            if not pending and (exhausted or self.stop.is_set() or self.fatal is not None):
                break
        for items in waiting.values():  # their leader never answered
            self.summary.failed += len(items)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(unit="img", desc="ingest", file=sys.stderr, dynamic_ncols=True)


def run(settings: Settings) -> Summary:
    return Job(settings).run()
