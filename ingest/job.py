"""The ingestion job: every photo in the inbox -> TorchServe -> one row in PostgreSQL -> out of the inbox.

Exactly once, crash-safe. For each batch of answers:
  1. one transaction inserts the prediction rows (ON CONFLICT DO NOTHING on sha256+model+version)
     and one `ingest_files` row per file naming the folder it will be moved to;
  2. only after that commit, the batch's files are moved (ingest.files.move_many: each linked at its
     destination, those folders fsynced, then the inbox names unlinked: never a moment without it);
  3. a second transaction marks those files moved.
A kill between 1 and 3 leaves `ingest_files` rows 'pending': the next run finishes those moves
before anything else. A kill before 1 leaves the files in the inbox with no row: the next run
classifies them. A file whose content already has a row for the model is not sent again: it is
moved, and noted as a duplicate. So every file ends in processed/ with its row, in quarantine/
with its error row, or still in the inbox -- whatever is killed, and when.

Overlapping runs: the whole run holds a PostgreSQL advisory lock; a second run exits at once.

Unattended: whatever one file does (an odd name, an answer PostgreSQL cannot hold, a move the
filesystem refuses) costs that file alone; any other unexpected error ends the run `failed` with
the error recorded, never with its row left 'running'. Memory: the photos read and not yet answered
stay under --max-in-flight-bytes (a single larger photo goes alone).

This module only orchestrates; each concern has its own module:
  ingest.inbox     which files are taken (settled photos, read and hashed)
  ingest.predict   asking TorchServe, with retries, isolating a photo that kills the worker (serving.client reads its answers)
  ingest.crashes   how often a worker died holding each content, in PostgreSQL
  ingest.journal   the rows, the planned moves (steps 1 and 3) and finishing an earlier run's moves
  ingest.files     reading and moving files on disk (step 2)
  ingest.outcomes  Item, Outcome, Summary, the errors that stop a run, and the exit codes
  ingest.hooks     the fault-injection points the tests use (INGEST_TEST_HOOK)
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ingest import db, files, inbox
from ingest import prune as prune_mod
from ingest.crashes import CrashLog
from ingest.hooks import Hooks
from ingest.journal import Journal
from ingest.outcomes import FileFailed, IngestError, Item, Outcome, RunFailed, Summary
from ingest.predict import Predictor, build_client
from ingest.settings import Settings
from ingest.store import TRANSIENT, DatabaseDown, LockLost, Store
from serving.client import MULTIPART_PART_OVERHEAD

logger = logging.getLogger("ingest")


class Job:
    def __init__(self, settings: Settings):
        self.s = settings
        self.stop = threading.Event()  # set on SIGTERM or a fatal error: take no new file, wake sleeping retries
        self.stop_requested = False
        self.summary = Summary()
        self.hook = Hooks.from_env()
        self._lock = threading.Lock()
        self.predictor = Predictor(settings, build_client(settings), self.stop, on_retry=lambda: self._count("retried"),
                                   crashes=CrashLog(settings.database_url, settings.model_name, lambda: self.summary.run_id),
                                   on_worker_died=lambda: self._count("worker_died"))
        self.store = Store(settings.database_url, retry_for=settings.db_retry_for)
        self.journal = Journal(self.store, settings, hook=self.hook)
        self.fatal: BaseException | None = None  # IngestError, DatabaseDown or LockLost: ends the run
        self.buffer: list[Outcome] = []
        self.held = 0  # bytes of photos read and not yet answered (or dropped unsent)
        self.most_held = 0
        self.clock = inbox.Clock()  # the inbox's, probed when the run starts reading it

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): finish what is in flight, commit, move, and end the run."""
        self.stop_requested = True
        self.stop.set()

    def _count(self, what: str) -> None:
        """summary.<what> + 1, from the request threads."""
        with self._lock:
            setattr(self.summary, what, getattr(self.summary, what) + 1)

    # -- run -----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            db.migrate(self.s.database_url)
            self.store.acquire()  # LockBusy: another run; raised before anything is touched
        except TRANSIENT as exc:
            raise DatabaseDown(f"PostgreSQL unavailable: {str(exc).strip()}") from exc
        run_id = self.summary.run_id = self.journal.start_run()
        logger.info("run %d: %s -> %s (model %s)", run_id, self.s.inbox, self.s.torchserve_url, self.s.model,
                    extra={"event": "start", "run_id": run_id})

    def run(self) -> Summary:
        started = time.monotonic()
        try:
            self.start()
            try:
                self.journal.recover(self.summary)
                self.predictor.ping()
                self._loop()
                self._prune()
            except (IngestError, DatabaseDown, LockLost) as exc:
                self.fatal = self.fatal or exc
            except Exception as exc:  # noqa: BLE001 - a bug or a surprise: record it, never leave the run 'running'
                logger.exception("the run failed unexpectedly: %s: %s", type(exc).__name__, exc, extra={"event": "run_failed"})
                self.fatal = self.fatal or RunFailed(f"unexpected {type(exc).__name__}: {exc}")
            self.summary.elapsed_s = time.monotonic() - started
            self.hook("before_finish")
            self._finish()
        finally:
            self.store.close()
        return self.summary

    def _prune(self) -> None:
        """--prune-after: retention, under the ingest lock (no run moves files meanwhile); its failure
        is logged and never fails the run."""
        if not self.s.prune_after or self.fatal is not None or self.stop.is_set():
            return
        try:
            self.summary.pruned = sum(prune_mod.prune(self.s.database_url, self.s.prune_after).removed.values())
        except Exception as exc:  # noqa: BLE001 - the photos stay; the next run tries again
            logger.exception("retention (--prune-after) failed: %s: %s", type(exc).__name__, exc, extra={"event": "prune_failed"})

    def _finish(self) -> None:
        s = self.summary
        s.waited_too_long = inbox.waited_too_long(s.skipped, self.s.stuck_after, self.clock.now())
        for relative, reason, age in s.waited_too_long:
            logger.error("%s: left in the inbox (%s) for %s: a person has to act on it", relative, reason,
                         "an unknown time" if age is None else f"{age / 3600:.1f} h",
                         extra={"event": "stuck", "path": relative, "reason": reason})
        s.conclude(self.fatal, stopped=self.stop_requested)
        if isinstance(self.fatal, (DatabaseDown, LockLost)):
            return  # nothing more can be written; the next run marks this one interrupted
        try:
            self.journal.finish_run(s.status, s.counts(), s.error)
        except (DatabaseDown, LockLost) as exc:
            s.conclude(exc, stopped=False)
        except Exception as exc:  # noqa: BLE001 - the next run marks this one interrupted
            logger.exception("recording the end of run %s failed", s.run_id, extra={"event": "finish_failed"})
            s.conclude(RunFailed(f"recording the run's end failed: {type(exc).__name__}: {exc}"), stopped=False)

    def _loop(self) -> None:
        progress = _progress(self.s.progress)
        with ThreadPoolExecutor(max_workers=self.s.concurrency, thread_name_prefix="ingest") as pool:
            try:
                self._pump(pool, progress)
            except BaseException:
                self.stop.set()  # don't let the pool's shutdown wait out sleeping retries
                raise
        progress.close()

    def _predict(self, items: list[Item]):
        """One request's photos -> one result per photo (see Predictor.predict_many)."""
        return self.predictor.predict_many([item.data for item in items], [item.entry.relative for item in items],
                                           [item.sha256 for item in items])

    def _requests(self, outcomes: list[Outcome]) -> list[list[Outcome]]:
        """Photos to send -> requests of up to --photos-per-request photos and --max-request-bytes
        (framing included); a photo that fills a request alone goes alone, as today's single request."""
        out: list[list[Outcome]] = []
        size = 0
        for o in outcomes:
            cost = len(o.item.data) + MULTIPART_PART_OVERHEAD
            if out and len(out[-1]) < self.s.photos_per_request and size + cost <= self.s.max_request_bytes:
                out[-1].append(o)
                size += cost
            else:
                out.append([o])
                size = cost
        return out

    def _take(self, item: Item) -> None:
        self.held += len(item.data) if item.data is not None else 0
        self.most_held = max(self.most_held, self.held)

    def _release(self, item: Item) -> None:
        """The photo's bytes are not needed any more (answered, or not to be sent)."""
        if item.data is not None:
            self.held -= len(item.data)
            item.data = None

    def _fits(self, entry) -> bool:
        """Whether reading entry keeps the bytes held under --max-in-flight-bytes; a photo larger
        than the bound still goes, once nothing else is held."""
        cost = inbox.cost(entry, self.s.max_bytes)
        return cost == 0 or self.held == 0 or self.held + cost <= self.s.max_in_flight_bytes

    def _incomplete(self, item: Item, code: str | None, error: str | None) -> bool:
        """A rejection that a file still being written gets: it stays in the inbox (skipped
        `incomplete`) instead of going to quarantine. A stalled upload (empty, truncated) modified
        within --incomplete-grace; any photo that failed to decode modified within --min-age (it
        passed the settle check, but a share can keep a growing file's size and mtime for seconds).
        Ages on the inbox's clock."""
        now = self.clock.now()
        if self.s.incomplete_grace > 0 and inbox.incomplete(code, error) and inbox.young(item.entry, self.s.incomplete_grace, now):
            why = (f"modified less than --incomplete-grace {self.s.incomplete_grace:.0f}s ago by the inbox's clock: "
                   f"an upload may still resume")
        elif inbox.undecoded(code) and inbox.young(item.entry, self.s.min_age, now):
            why = f"modified less than --min-age {self.s.min_age:.0f}s ago by the inbox's clock: it may still be being written"
        else:
            return False
        inbox.skip(self.summary.skipped, item.entry.relative, f"incomplete (TorchServe: {code}; {why})")
        return True

    def _pump(self, pool: ThreadPoolExecutor, progress) -> None:
        """Keep up to 2 x concurrency requests of up to --photos-per-request photos in flight (and the
        photos read under --max-in-flight-bytes), and record their answers in batches."""
        window = 2 * self.s.concurrency  # one server-side batch being computed while the next fills
        self.clock = inbox.Clock.probe(self.s.inbox)
        source = inbox.candidates(self.s, self.stop, self.summary.skipped, self.clock)
        pending: dict[Future, list[Outcome]] = {}  # a request in flight -> its photos
        waiting: dict[str, list[Item]] = defaultdict(list)  # same content as a request in flight
        in_flight: dict[str, Outcome] = {}
        exhausted = False
        upcoming = None  # the next settled file, not read until there is room for it
        last_flush = time.monotonic()
        first_read = True
        while True:
            # keep the window full
            while (not exhausted and not self.stop.is_set() and self.fatal is None and len(pending) < window
                   and len(self.buffer) < self.s.batch_size and (upcoming is None or self._fits(upcoming))):
                group = []
                while len(group) < (window - len(pending)) * self.s.photos_per_request:
                    entry, upcoming = upcoming or next(source, None), None
                    if entry is None:
                        exhausted = True
                        break
                    if str(entry.path) in self.journal.stuck:
                        inbox.skip(self.summary.skipped, entry.relative,
                                   "pending_move (an earlier run's move of it could not be finished; see its ingest_files note)")
                        continue
                    if not self._fits(entry):
                        upcoming = entry  # read once answers have freed memory
                        break
                    item = inbox.load(entry, self.s.max_bytes, self.summary.skipped)
                    if item is None:
                        continue
                    self._take(item)
                    group.append(item)
                    self.summary.taken += 1
                    if self.s.limit and self.summary.taken >= self.s.limit:
                        exhausted = True
                        break
                if first_read and group:
                    first_read = False
                    self.hook("after_read")
                known = self.journal.known(group)
                fresh: list[Outcome] = []
                for item in group:
                    if item.sha256 in known:
                        self._release(item)
                        row = known[item.sha256]
                        if row.status == "rejected" and self._incomplete(item, row.error_code, row.error):
                            continue
                        self.buffer.append(Outcome(item, known=row))
                        progress.update(1)
                    elif item.sha256 in in_flight:
                        self._release(item)  # never sent: it takes its leader's answer
                        waiting[item.sha256].append(item)
                    elif item.data is None:  # over --max-bytes: TorchServe would refuse it unread
                        self.buffer.append(Outcome(item, ok=False, body={
                            "code": "too_large", "error": f"the file is {item.size} bytes; the limit is {self.s.max_bytes}"}))
                        progress.update(1)
                    else:
                        o = Outcome(item)
                        in_flight[item.sha256] = o
                        fresh.append(o)
                for request in self._requests(fresh):
                    pending[pool.submit(self._predict, [o.item for o in request])] = request
            done = set()
            if pending:
                done, _ = wait(pending, timeout=self.s.flush_every, return_when=FIRST_COMPLETED)
            for fut in done:
                request = pending.pop(fut)
                try:
                    results = fut.result()
                except Exception as exc:  # noqa: BLE001 - a surprise about one request costs its photos alone
                    logger.exception("a request of %d photos failed unexpectedly: %s: %s", len(request),
                                     type(exc).__name__, exc, extra={"event": "failed"})
                    results = [exc] * len(request)
                for o, result in zip(request, results):
                    self._answered(o, result, waiting.pop(o.item.sha256, []), in_flight, progress)
            if (len(self.buffer) >= self.s.batch_size or not pending
                    or (self.buffer and time.monotonic() - last_flush >= self.s.flush_every)):
                self.flush()
                last_flush = time.monotonic()
            if not pending and (exhausted or self.stop.is_set() or self.fatal is not None):
                break
        for items in waiting.values():  # their leader never answered
            self.summary.failed += len(items)

    def _answered(self, o: Outcome, result, followers: list[Item], in_flight: dict[str, Outcome], progress) -> None:
        """A photo's result (an Answer, or the error it ended with) -> the buffer, or the counts and log."""
        self._release(o.item)
        del in_flight[o.item.sha256]
        if isinstance(result, IngestError):
            self.summary.failed += 1 + len(followers)
            if self.fatal is None:
                self.fatal = result
                logger.error("stopping: %s", result, extra={"event": "stopping"})
                self.stop.set()  # wakes retries that are sleeping
            return
        if isinstance(result, BaseException):  # FileFailed, or a surprise about one request: its photos alone
            self.summary.failed += 1 + len(followers)
            why = result if isinstance(result, FileFailed) else f"unexpected {type(result).__name__}: {result}"
            logger.error("%s: not classified, left in the inbox: %s", o.item.entry.relative, why,
                         extra={"event": "failed", "path": o.item.entry.relative})
            return
        answer = result
        body = answer.body if isinstance(answer.body, dict) else {}
        if not answer.ok and self._incomplete(o.item, body.get("code"), body.get("error")):
            for f in followers:
                inbox.skip(self.summary.skipped, f.entry.relative, "incomplete (the same content as a younger upload)")
            return
        o.ok, o.body = answer.ok, answer.body
        self.buffer.append(o)
        self.buffer.extend(Outcome(f, leader=o) for f in followers)
        progress.update(1 + len(followers))

    def flush(self) -> None:
        """Steps 1-3 of the module docstring for what the buffer holds, --batch-size rows at a time
        (one request's answers may bring several photos at once)."""
        while self.buffer:
            outs, self.buffer = self.buffer[:self.s.batch_size], self.buffer[self.s.batch_size:]
            self._record(outs)

    def _record(self, outs: list[Outcome]) -> None:
        """Steps 1-3 for these outcomes: commit, move, mark moved."""
        written = self.journal.record(outs, before_commit=lambda: self.hook("before_commit"))
        self.hook("after_commit")
        for o, reason in written.left:
            self.summary.failed += 1
            logger.error("%s: its row could not be recorded (%s); left in the inbox for the next run",
                         o.item.entry.relative, reason, extra={"event": "unrecorded", "path": o.item.entry.relative})
        errors = files.move_many([(o.item.entry.path, dest) for o, dest, _, _ in written.plan],
                                 linked=lambda: self.hook("mid_link"), moved_one=lambda: self.hook("mid_move"),
                                 expect=[o.item.entry.identity for o, _, _, _ in written.plan])
        moved, replaced = [], []
        for (o, dest, destination, file_id), exc in zip(written.plan, errors):
            if isinstance(exc, files.Replaced):
                replaced.append(file_id)
                inbox.skip(self.summary.skipped, o.item.entry.relative,
                           "replaced (the file changed after it was read; not moved, read again by the next run)")
                continue
            if exc is not None:
                self.summary.move_failed += 1
                logger.error("%s: recorded, but moving it to %s failed (%s); the next run retries the move",
                             o.item.entry.relative, dest, exc, extra={"event": "move_failed", "path": o.item.entry.relative})
                continue
            moved.append(file_id)
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
        self.journal.mark(moved, "moved")
        if replaced:
            self.journal.mark(replaced, "superseded", "the file under this name changed after it was read; left in the "
                                                      "inbox for the next run")


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
