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
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Callable

from ingest.outcomes import FileFailed, IngestError, TorchServeDown, TorchServeRefused
from ingest.settings import Settings, SettingsError
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


class Predictor:
    """settings.model's answers for photos, retried; `stop` (shared with the job) cuts retries short."""

    def __init__(self, settings: Settings, client: TorchServeClient, stop: threading.Event,
                 on_retry: Callable[[], None] = lambda: None):
        self.s, self.client, self.stop, self.on_retry = settings, client, stop, on_retry

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

    def _send(self, photos: list[bytes], *, single: bool) -> list[Answer | Transient]:
        """One request: `single`, the plain single-photo request; else one request of several (its
        retries too, however few photos are left without a verdict)."""
        timeout = (self.s.connect_timeout, self.s.timeout)
        if single:
            try:
                return [self.client.classify(self.s.model, photos[0], timeout=timeout)]
            except Transient as exc:
                return [exc]
        return self.client.classify_many(self.s.model, photos, timeout=timeout)

    def predict_many(self, photos: list[bytes], names: list[str]) -> list[Answer | FileFailed | IngestError]:
        """For each photo, in order: its Answer, or the error it ended with (FileFailed, TorchServeDown,
        TorchServeRefused). Photos without a verdict are asked again, with backoff, up to --retries."""
        results: list[Answer | FileFailed | IngestError | None] = [None] * len(photos)
        last: dict[int, Transient] = {}
        todo = list(range(len(photos)))
        for attempt in range(1, self.s.retries + 1):
            if self.stop.is_set() and attempt > 1:
                break
            try:
                got = self._send([photos[i] for i in todo], single=len(photos) == 1)
            except Refused as exc:
                for i in todo:
                    refused = TorchServeRefused(str(exc))
                    refused.__cause__ = exc
                    results[i] = refused
                return results  # type: ignore[return-value]
            still = []
            for i, answer in zip(todo, got):
                if isinstance(answer, Answer):
                    results[i] = answer
                else:
                    last[i] = answer
                    still.append(i)
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
        for i in todo:
            if self.stop.is_set():
                results[i] = FileFailed(f"stopped before an answer ({last[i].reason if i in last else 'not sent'})")
            elif last[i].down:
                results[i] = self._down(last[i].reason)
            else:
                results[i] = FileFailed(last[i].reason)
        return results  # type: ignore[return-value]

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
