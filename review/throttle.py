"""Login throttling for the review desk: failed logins counted per name and per client address in a
sliding window, and a bound on password checks running at once (each is a 32 MiB scrypt).

Kept in the server's memory: the desk is one process (waitress: one process, a pool of threads), so
the counts are exact there; a restart forgets them. No Flask here.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

# Defaults: a name gets 5 wrong passwords in 15 minutes, an address 20 (an office behind one NAT
# address shares it); then the rest of the window is refused with 429 and Retry-After.
NAME_LIMIT, ADDRESS_LIMIT, WINDOW_S = 5, 20, 15 * 60
# Password checks at once (each needs 32 MiB and a core's 50-100 ms); a login that waits longer
# than CHECK_WAIT_S for one is refused with 429 rather than queued without bound.
CHECKS_AT_ONCE, CHECK_WAIT_S = 2, 5.0
MAX_KEYS = 100_000  # keys remembered; the oldest are forgotten first (a spray of names cannot grow memory without bound)


@dataclass(frozen=True)
class Refusal:
    """Why a login is refused before its password is checked, and for how long."""

    reason: str
    retry_after_s: int


class FailureWindow:
    """Failures per key in the last `window_s` seconds; a key at `limit` is refused until its oldest
    failure leaves the window."""

    def __init__(self, limit: int, window_s: float, *, clock=time.monotonic, max_keys: int = MAX_KEYS):
        self.limit, self.window_s, self.clock, self.max_keys = limit, window_s, clock, max_keys
        self._failures: OrderedDict[str, deque] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque | None:
        times = self._failures.get(key)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str) -> float:
        """0 when `key` may try now, else the seconds until it may."""
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            if times is None or len(times) < self.limit:
                return 0.0
            return times[-self.limit] + self.window_s - now

    def fail(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque(maxlen=self.limit)
                while len(self._failures) > self.max_keys:
                    self._failures.popitem(last=False)
            self._failures.move_to_end(key)
            times.append(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


class LoginThrottle:
    """Per name and per address, and the password checks running at once."""

    def __init__(self, *, name_limit: int = NAME_LIMIT, address_limit: int = ADDRESS_LIMIT, window_s: float = WINDOW_S,
                 checks_at_once: int = CHECKS_AT_ONCE, check_wait_s: float = CHECK_WAIT_S, clock=time.monotonic):
        self.names = FailureWindow(name_limit, window_s, clock=clock)
        self.addresses = FailureWindow(address_limit, window_s, clock=clock)
        self.checks = threading.BoundedSemaphore(checks_at_once)
        self.check_wait_s = check_wait_s

    def refusal(self, name: str, address: str) -> Refusal | None:
        """A login refused before any password check, or None."""
        for window, key, reason in ((self.addresses, address, "too many failed logins from this address"),
                                    (self.names, name.lower(), "too many failed logins for this name")):
            wait = window.retry_after(key)
            if wait > 0:
                return Refusal(reason, max(1, math.ceil(wait)))
        return None

    def failed(self, name: str, address: str) -> None:
        self.names.fail(name.lower())
        self.addresses.fail(address)

    def succeeded(self, name: str) -> None:
        self.names.clear(name.lower())

    def check_slot(self) -> bool:
        """Take one of the password-check slots (release with release_slot()); False: all busy for check_wait_s."""
        return self.checks.acquire(timeout=self.check_wait_s)

    def release_slot(self) -> None:
        self.checks.release()
