"""Fault injection for the tests: INGEST_TEST_HOOK="crash@after_commit#2,pause@mid_move" makes the
job SIGKILL itself, or wait for the test, at the n-th (default first) time it reaches a named point.
Only tests set it; unset, every hook point is a no-op.

The points, in the order a run reaches them (see ingest.job for what each one separates):
after_read, before_commit, after_commit, mid_link (the batch's photos linked at their destination,
none unlinked yet), mid_move (one unlinked), after_moves, before_finish, and
recovery_mid_move (while finishing an earlier run's moves). `pause` touches
INGEST_TEST_HOOK_DIR/paused-POINT and waits (up to 300 s) for INGEST_TEST_HOOK_DIR/resume-POINT.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path


class Hooks:
    POINTS = ("after_read", "before_commit", "after_commit", "mid_link", "mid_move", "after_moves", "recovery_mid_move", "before_finish")

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

    @classmethod
    def from_env(cls) -> "Hooks":
        return cls(os.environ.get("INGEST_TEST_HOOK"), os.environ.get("INGEST_TEST_HOOK_DIR"))

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
