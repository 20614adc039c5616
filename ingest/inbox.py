"""Which inbox files a run takes: settled photos in walk order (`candidates`), each read and hashed
when the job has room for it (`load`; ingest.files does the disk work). A file modified less than
`min_age` ago may still be being written: with `settle` > 0 it gets a second look after `settle`
seconds and is taken if its size, mtime and inode did not change; otherwise it waits for the next
run. Everything left in the inbox is counted in `skipped` by reason (the first word of
files.Skip.reason / files.NotReady.reason).

An upload that stalls for longer than `min_age` looks settled, and TorchServe calls it truncated
(or empty). `incomplete()` tells such an answer apart, so that the job leaves a file modified less
than `--incomplete-grace` ago in the inbox (skipped `incomplete`) instead of quarantining it. Any
photo that fails to decode (`undecoded()`) and was modified less than `min_age` ago stays too: on a
network share a file can stay unchanged through the settle and still be growing.

Ages are measured on the inbox's own clock (`Clock`): a file server's mtimes come from its clock,
not the job's, and the two can be minutes apart.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Iterator

from ingest import files
from ingest.outcomes import Item, Skipped
from ingest.settings import Settings

logger = logging.getLogger("ingest")

# Young files waiting for their second look; past this many, the rest wait for the next run.
MAX_DEFERRED = 10_000
# Reasons that are routine, not worth a warning.
_QUIET = ("hidden", "not_settled", "vanished")
# Reasons that do not pass by themselves: a person has to act (Skipped.lasting, --stuck-after).
LASTING = ("unreadable", "symlink", "not_a_file", "unsupported")
# Lasting skips remembered by name in a run (the count has them all).
MAX_NAMED = 1000


def skip(skipped: Counter, relative: str, reason: str, mtime: float | None = None) -> None:
    key = reason.split(" ")[0]
    skipped[key] += 1
    if key in LASTING and isinstance(skipped, Skipped) and len(skipped.lasting) < MAX_NAMED:
        skipped.lasting.append((relative, key, mtime))
    level = logging.DEBUG if key in _QUIET else logging.WARNING
    logger.log(level, "%s: left in the inbox (%s)", relative, reason, extra={"event": "skipped", "path": relative, "reason": key})


def waited_too_long(skipped: Counter, longer_than_s: float, now: float | None = None) -> list[tuple[str, str, float | None]]:
    """The lasting skips modified more than longer_than_s ago (or of unknown age: the inbox root
    unreadable), as (relative path, reason, age in seconds or None)."""
    now = time.time() if now is None else now
    out = []
    for relative, reason, mtime in getattr(skipped, "lasting", []):
        age = None if mtime is None else now - mtime
        if age is None or age > longer_than_s:
            out.append((relative, reason, age))
    return out


class Clock:
    """The inbox's clock: this machine's, shifted by how far the inbox's file server stamps ahead
    (`probe`: the mtime of a hidden file the job writes there, against this machine's time)."""

    PROBE = ".ingest-clock"

    def __init__(self, offset_s: float = 0.0):
        self.offset_s = offset_s

    def now(self) -> float:
        return time.time() + self.offset_s

    @classmethod
    def probe(cls, inbox_dir, *, warn_from_s: float = 2.0) -> "Clock":
        """Write and remove INBOX/.ingest-clock-<pid>; its mtime, stamped by the file server, against
        the midpoint of our clock around the write. An inbox that cannot be written: offset 0."""
        path = os.path.join(os.fspath(inbox_dir), f"{cls.PROBE}-{os.getpid()}")
        try:
            before = time.time()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.write(fd, b"clock")
                stamped = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(path)
            after = time.time()
        except OSError as exc:
            logger.warning("cannot write a clock probe in the inbox (%s): ages are measured on this machine's clock", exc)
            return cls(0.0)
        offset = stamped - (before + after) / 2
        if abs(offset) > warn_from_s:
            logger.warning("the inbox's file server stamps %.1fs %s this machine's clock: ages in the inbox are measured "
                           "on its clock", abs(offset), "ahead of" if offset > 0 else "behind",
                           extra={"event": "clock_skew"})
        return cls(offset)


def candidates(s: Settings, stop: threading.Event, skipped: Counter, clock: Clock | None = None) -> Iterator[files.Entry]:
    """Settled photos in walk order, not read yet; young ones after a second look. Ends early on `stop`.
    Ages by `clock` (the inbox's; default this machine's)."""
    clock = clock or Clock()
    exclude = (s.processed, s.quarantine)
    deferred: list[tuple[float, files.Entry]] = []
    for found in files.walk(s.inbox, exclude=exclude):
        if stop.is_set():
            return
        if isinstance(found, files.Skip):
            skip(skipped, found.relative, found.reason, found.mtime)
        elif files.settled(found, s.min_age, clock.now()):
            yield found
        elif s.settle > 0 and len(deferred) < MAX_DEFERRED:
            deferred.append((time.monotonic(), found))
        else:
            skip(skipped, found.relative, "not_settled")
    for seen_at, entry in deferred:
        if stop.wait(max(0.0, seen_at + s.settle - time.monotonic())):
            return
        try:
            st = os.lstat(entry.path)
        except OSError:
            skip(skipped, entry.relative, "vanished")
            continue
        if files.identity_of(st) != entry.identity:
            skip(skipped, entry.relative, "not_settled")
            continue
        yield entry


def cost(entry: files.Entry, max_bytes: int) -> int:
    """The bytes `load` will hold in memory for entry: none when it is over max_bytes (only hashed)."""
    return entry.size if entry.size <= max_bytes else 0


def load(entry: files.Entry, max_bytes: int, skipped: Counter) -> Item | None:
    """The Item, read and hashed (data None when over max_bytes: it is quarantined unsent), or None
    after counting it as skipped (it changed, vanished or cannot be read)."""
    try:
        data, sha, size = files.read(entry, max_bytes=max_bytes)
    except files.NotReady as exc:
        skip(skipped, entry.relative, exc.reason, entry.mtime_ns / 1e9)
        return None
    return Item(entry, data, sha, size, datetime.now(timezone.utc))


# The handler's codes for a photo it could not decode: what a file still being written gets too.
UNDECODED = ("empty", "corrupt", "not_an_image")


def undecoded(code: str | None) -> bool:
    return code in UNDECODED


def incomplete(code: str | None, error: str | None) -> bool:
    """Whether the handler's rejection is what a file still being uploaded gets: empty, or cut short
    (handler/refund_preprocess.py answers code "corrupt" with "the image data is truncated: ...")."""
    return code == "empty" or (code == "corrupt" and "truncated" in (error or ""))


def young(entry: files.Entry, grace_s: float, now: float | None = None) -> bool:
    """Modified less than grace_s ago: a stalled upload may still resume."""
    return not files.settled(entry, grace_s, now)
