"""Asking TorchServe, with retries: what the job does with serving.client's answers.

serving.client.ANSWERS says what an answer means. A verdict (a prediction, or the handler's
rejection of the photo) is returned. A Transient answer is asked again, after an exponential
backoff, up to `retries` attempts in all. When they run out: if TorchServe itself was down
(`Transient.down`: no connection, 503, 507...) the run stops (TorchServeDown, exit 3), else only
this photo failed (FileFailed: it stays in the inbox for the next run, never quarantined). Refused
(no such model, no key file) stops the run at once (TorchServeRefused). A stop (SIGTERM, or
another photo's fatal error) wakes a sleeping retry and fails the photo instead of asking again.

`predict_many` asks for several photos in one request, by the same rules photo by photo: a photo
with a verdict is done, and the next attempt asks again for the others alone; what each photo
ends with (its Answer, or the FileFailed / TorchServeDown / TorchServeRefused it would have
raised alone) is returned in its place, so one photo's fate never decides another's.

Isolation. A request answered "Worker died." (the worker crashed on its batch, or TorchServe killed
it for not answering within responseTimeout) may hold a photo that kills every worker it reaches,
so it is not sent again whole. Its photos are sent again in halves, each half the only request
TorchServe holds (`Gate.exclusive`, once TorchServe reports its restarted worker healthy, within
--worker-wait), and a half the worker dies on again is halved again, down to one photo. Every death
counts each photo it held (`in_flight`, ingest.crashes, in PostgreSQL). A photo alone on a worker
that died is tried with a plain test image right after (CANARY): if that goes through, the death
is the photo's (`alone` + 1); at two, the photo's verdict is a rejection with error code
worker_crash or worker_timeout (quarantined like any bad photo). If the test image kills the
worker too, TorchServe itself is broken: TorchServeDown (exit 3), and nothing is decided about
the photo. So the photos beside a bad one are recorded in the same run, and the bad one ends with
its own verdict within the run that reaches it.
"""
from __future__ import annotations

import hashlib
import logging
import random
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Callable

from ingest.crashes import WORKER_CRASH, WORKER_TIMEOUT, CrashLog, NoCrashLog
from ingest.outcomes import FileFailed, IngestError, TorchServeDown, TorchServeRefused
from ingest.settings import Settings, SettingsError
from ingest.store import DatabaseDown
from serving.client import TOKEN_REQUIRED, Answer, Refused, TorchServeClient, Transient

logger = logging.getLogger("ingest")


def build_client(settings: Settings) -> TorchServeClient:
    if not settings.torchserve_url:
        raise SettingsError("no TorchServe address: give --torchserve-url, TORCHSERVE_URL or `torchserve_url:` in the settings file")
    return TorchServeClient(settings.torchserve_url, settings.management_url or settings.torchserve_url,
                            key_file=settings.key_file, pool_size=settings.concurrency, timeout_s=settings.timeout)


def backoff(attempt: int, first: float, longest: float) -> float:
    """Delay before retry `attempt` (1-based): exponential with "equal jitter"
    (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
    d = min(longest, first * 2 ** (attempt - 1))
    return d / 2 + random.uniform(0, d / 2)


# A worker death alone with one photo, this many times, is the photo's verdict.
DEATHS_ALONE_FOR_VERDICT = 2
# A death after at least this share of --response-timeout is TorchServe's timeout kill.
TIMEOUT_SHARE = 0.9


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A plain RGB PNG, built without an imaging library (ingest/ stays free of them)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# The test image sent after a photo's worker died with it alone: any verdict on it (a label or a
# rejection) shows that TorchServe and the model are fine, and the death was the photo's.
CANARY = _png(60, 80, (128, 128, 128))


class Gate:
    """Requests share TorchServe (`shared`); a request of photos a worker died on goes alone
    (`exclusive`): no other request of this job is in flight, so no other photo shares its
    server-side batch. An exclusive waiter goes before new shared ones."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._alone or self._sharing:
                self._cond.wait()
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class Predictor:
    """settings.model's answers for photos, retried; `stop` (shared with the job) cuts retries short.
    crashes: where worker deaths are counted per content (ingest.crashes; in memory without one)."""

    def __init__(self, settings: Settings, client: TorchServeClient, stop: threading.Event,
                 on_retry: Callable[[], None] = lambda: None, crashes: CrashLog | NoCrashLog | None = None,
                 on_worker_died: Callable[[], None] = lambda: None):
        self.s, self.client, self.stop, self.on_retry = settings, client, stop, on_retry
        self.crashes = crashes if crashes is not None else NoCrashLog()
        self.on_worker_died = on_worker_died
        self.gate = Gate()

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, self.s.backoff, self.s.backoff_max)

    def _down(self, reason: str) -> TorchServeDown:
        return TorchServeDown(f"TorchServe at {self.s.torchserve_url} stays unavailable after {self.s.retries} attempts: {reason}")

    def predict(self, data: bytes, name: str) -> Answer:
        """The Answer about one photo (`name` is for the log), or raises FileFailed, TorchServeDown
        or TorchServeRefused."""
        (result,) = self.predict_many([data], [name])
        if isinstance(result, BaseException):
            raise result
        return result

    def _send(self, photos: list[bytes], *, single: bool, alone: bool = False) -> tuple[list[Answer | Transient], str | None]:
        """One request: `single`, the plain single-photo request; else one request of several (its
        retries too, however few photos are left without a verdict). `alone`: the only request in
        flight (Gate.exclusive). Returns the answers and, where the worker died on the request, how
        (WORKER_CRASH, or WORKER_TIMEOUT after about --response-timeout)."""
        timeout = (self.s.connect_timeout, self.s.timeout)
        with self.gate.exclusive() if alone else self.gate.shared():
            started = time.monotonic()  # not the wait for the gate: a timeout is told by the request's own time
            if single:
                try:
                    got: list[Answer | Transient] = [self.client.classify(self.s.model, photos[0], timeout=timeout)]
                except Transient as exc:
                    got = [exc]
            else:
                got = self.client.classify_many(self.s.model, photos, timeout=timeout)
        if not any(isinstance(a, Transient) and a.worker_died for a in got):
            return got, None
        took = time.monotonic() - started
        self.on_worker_died()
        return got, WORKER_TIMEOUT if took >= TIMEOUT_SHARE * self.s.response_timeout else WORKER_CRASH

    def predict_many(self, photos: list[bytes], names: list[str],
                     keys: list[str] | None = None) -> list[Answer | FileFailed | IngestError]:
        """For each photo, in order: its Answer, or the error it ended with (FileFailed, TorchServeDown,
        TorchServeRefused). Photos without a verdict are asked again, with backoff, up to --retries;
        photos of a request the worker died on are isolated (module docstring). keys: each photo's
        content (sha256), under which worker deaths are counted (default: its bytes' own)."""
        results: list[Answer | FileFailed | IngestError | None] = [None] * len(photos)
        keys = keys if keys is not None else [_content_key(p) for p in photos]
        last: dict[int, Transient] = {}
        todo = list(range(len(photos)))
        for attempt in range(1, self.s.retries + 1):
            if self.stop.is_set() and attempt > 1:
                break
            try:
                got, death = self._send([photos[i] for i in todo], single=len(photos) == 1)
            except Refused as exc:
                for i in todo:
                    results[i] = _refused(exc)
                return results  # type: ignore[return-value]
            still = _collect(todo, got, results, last)
            if death is not None:
                died = [(i, answer) for i, answer in zip(todo, got) if isinstance(answer, Transient) and answer.worker_died]
                self._isolate([i for i, _ in died], death, died[0][1].reason, photos, names, keys, results)
            todo = still
            if not todo or attempt == self.s.retries:
                break
            delay = self._backoff(attempt)
            for i in todo:
                self.on_retry()
                logger.warning("%s: %s; retry %d/%d in %.1fs", names[i], last[i].reason, attempt,
                               self.s.retries - 1, delay, extra={"event": "retry", "path": names[i]})
            if self.stop.wait(delay):
                break
        self._give_up(todo, last, results)
        return results  # type: ignore[return-value]

    def _give_up(self, todo: list[int], last: dict[int, Transient], results: list) -> None:
        """The photos still without a verdict after the retries: what each ends with."""
        for i in todo:
            if i not in last:
                results[i] = FileFailed("stopped before an answer" if self.stop.is_set() else
                                        f"the worker died on it; no verdict within --retries {self.s.retries} attempts")
            elif self.stop.is_set():
                results[i] = FileFailed(f"stopped before an answer ({last[i].reason})")
            elif last[i].down:
                results[i] = self._down(last[i].reason)
            else:
                results[i] = FileFailed(last[i].reason)

    # -- isolation -------------------------------------------------------------------------
    def _isolate(self, died: list[int], death: str, reason: str, photos: list[bytes], names: list[str],
                 keys: list[str], results: list) -> None:
        """The worker died (`death`) on a request holding photos `died` (not alone): count them,
        then send them again in halves, each alone (_resolve). A fatal error on the way (TorchServe
        broken, PostgreSQL gone) ends every photo still without a result."""
        try:
            self.crashes.died([keys[i] for i in died], death, alone=False)
            logger.warning("TorchServe's worker died (%s: %s) on a request of %d photos: sending them again in halves, "
                           "each alone", death, reason, len(died), extra={"event": "worker_died"})
            for half in _halves(died):
                self._resolve(half, photos, names, keys, results)
        except (IngestError, DatabaseDown) as exc:
            for i in died:
                if results[i] is None:
                    results[i] = exc if isinstance(exc, IngestError) else FileFailed(str(exc))

    def _resolve(self, group: list[int], photos: list[bytes], names: list[str], keys: list[str], results: list) -> None:
        """Send `group` as the only request TorchServe holds, with retries, until each photo has a
        result: a half the worker dies on again is halved again; a photo the worker died on alone
        is judged by _died_alone."""
        last: dict[int, Transient] = {}
        todo = list(group)
        attempt = 0
        while todo and attempt < self.s.retries and not self.stop.is_set():
            attempt += 1
            self._wait_for_worker()
            try:
                got, death = self._send([photos[i] for i in todo], single=len(todo) == 1, alone=True)
            except Refused as exc:
                for i in todo:
                    results[i] = _refused(exc)
                return
            if death is not None:
                if len(todo) > 1:
                    self.crashes.died([keys[i] for i in todo], death, alone=False)
                    for half in _halves(todo):
                        self._resolve(half, photos, names, keys, results)
                    return
                verdict = self._died_alone(todo[0], death, names, keys)
                if verdict is not None:
                    results[todo[0]] = verdict
                    return
                continue  # once: the photo goes alone again
            todo = _collect(todo, got, results, last)
            if todo and attempt < self.s.retries and self.stop.wait(self._backoff(attempt)):
                break
        self._give_up(todo, last, results)

    def _died_alone(self, i: int, death: str, names: list[str], keys: list[str]) -> Answer | None:
        """The worker died with photo i alone. If a plain test image then goes through, the death
        is the photo's: counted, and at DEATHS_ALONE_FOR_VERDICT the photo's verdict (a rejection);
        None: send it alone once more. If the test image kills the worker too: TorchServeDown."""
        self._wait_for_worker()
        got, canary_death = self._send([CANARY], single=True, alone=True)
        if canary_death is not None or not isinstance(got[0], Answer):
            why = got[0].reason if isinstance(got[0], Transient) else "no verdict"
            raise TorchServeDown(f"TorchServe's worker died on {names[i]} alone, and on a plain test image right after "
                                 f"({why}): TorchServe or the model is failing, not the photo; nothing was decided about it")
        times = self.crashes.died([keys[i]], death, alone=True).get(keys[i], 0)
        logger.warning("%s: TorchServe's worker died (%s) with this photo alone (%d of %d)", names[i], death, times,
                       DEATHS_ALONE_FOR_VERDICT, extra={"event": "worker_died_alone", "path": names[i]})
        if times < DEATHS_ALONE_FOR_VERDICT:
            return None
        if death == WORKER_TIMEOUT:
            error = (f"TorchServe's worker did not answer this photo within its responseTimeout (about "
                     f"{self.s.response_timeout:.0f}s) and was killed, {times} times with this photo alone")
        else:
            error = f"TorchServe's worker died on this photo, {times} times with this photo alone"
        return Answer(False, {"code": death, "error": f"{error}; a plain test image went through right after"})

    def _wait_for_worker(self) -> None:
        """Until TorchServe reports every model's workers up again (/ping Healthy: it restarts a died
        one by itself), at most --worker-wait; then TorchServeDown. A stop returns at once."""
        deadline = time.monotonic() + self.s.worker_wait
        while True:
            p = self.client.ping(timeout=(self.s.connect_timeout, 10))
            if p.healthy or self.stop.is_set():
                return
            if time.monotonic() >= deadline:
                raise TorchServeDown(f"TorchServe at {self.s.torchserve_url} did not bring its worker back within "
                                     f"--worker-wait {self.s.worker_wait:.0f}s: {p.detail}")
            if self.stop.wait(0.25):
                return

    def ping(self) -> None:
        """Wait (with the same retries) until TorchServe answers /ping as healthy, or raise
        TorchServeDown; TorchServeRefused at once when it wants a token and we have no key file."""
        last = None
        for attempt in range(1, self.s.retries + 1):
            p = self.client.ping(timeout=(self.s.connect_timeout, 10))
            if p.healthy:
                return
            if p.invalid_key and self.client.key_file is None:
                raise TorchServeRefused(TOKEN_REQUIRED)
            last = p.detail if p.status_code is None else f"/ping answered HTTP {p.status_code}"
            if attempt < self.s.retries:
                delay = self._backoff(attempt)
                logger.warning("TorchServe at %s not ready (%s); retry %d/%d in %.1fs", self.s.torchserve_url,
                               last, attempt, self.s.retries - 1, delay, extra={"event": "retry"})
                if self.stop.wait(delay):
                    break
        raise self._down(last)


def _collect(todo: list[int], got: list, results: list, last: dict[int, Transient]) -> list[int]:
    """Answers go into `results`; the photos still without a verdict (each with its last Transient)
    are returned, except those the worker died on: isolation decides them."""
    still = []
    for i, answer in zip(todo, got):
        if isinstance(answer, Answer):
            results[i] = answer
        elif not answer.worker_died:
            last[i] = answer
            still.append(i)
    return still


def _halves(group: list[int]) -> list[list[int]]:
    half = (len(group) + 1) // 2
    return [part for part in (group[:half], group[half:]) if part]


def _refused(exc: Refused) -> TorchServeRefused:
    refused = TorchServeRefused(str(exc))
    refused.__cause__ = exc
    return refused


def _content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
