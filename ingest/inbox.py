"""Which inbox files a run takes: settled photos in walk order (`candidates`), each read and hashed
when the job has room for it (`load`; ingest.files does the disk work). A file modified less than
`min_age` ago may still be being written: with `settle` > 0 it gets a second look after `settle`
seconds and is taken if its size, mtime and inode did not change; otherwise it waits for the next
run. Everything left in the inbox is counted in `skipped` by reason (the first word of
files.Skip.reason / files.NotReady.reason).

An upload that stalls for longer than `min_age` looks settled, and TorchServe calls it truncated
(or empty). `incomplete()` tells such an answer apart, so that the job leaves a file modified less
than `--incomplete-grace` ago in the inbox (skipped `incomplete`) instead of quarantining it.
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
from ingest.outcomes import Item
from ingest.settings import Settings

logger = logging.getLogger("ingest")

# Young files waiting for their second look; past this many, the rest wait for the next run.
MAX_DEFERRED = 10_000
# Reasons that are routine, not worth a warning.
_QUIET = ("hidden", "not_settled", "vanished")


def skip(skipped: Counter, relative: str, reason: str) -> None:
    key = reason.split(" ")[0]
    skipped[key] += 1
    level = logging.DEBUG if key in _QUIET else logging.WARNING
    logger.log(level, "%s: left in the inbox (%s)", relative, reason, extra={"event": "skipped", "path": relative, "reason": key})


def candidates(s: Settings, stop: threading.Event, skipped: Counter) -> Iterator[files.Entry]:
    """Settled photos in walk order, not read yet; young ones after a second look. Ends early on `stop`."""
    exclude = (s.processed, s.quarantine)
    deferred: list[tuple[float, files.Entry]] = []
    for found in files.walk(s.inbox, exclude=exclude):
        if stop.is_set():
            return
        if isinstance(found, files.Skip):
            skip(skipped, found.relative, found.reason)
        elif files.settled(found, s.min_age):
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
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (entry.size, entry.mtime_ns, entry.inode):
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
        skip(skipped, entry.relative, exc.reason)
        return None
    return Item(entry, data, sha, size, datetime.now(timezone.utc))


def incomplete(code: str | None, error: str | None) -> bool:
    """Whether the handler's rejection is what a file still being uploaded gets: empty, or cut short
    (handler/refund_preprocess.py answers code "corrupt" with "the image data is truncated: ...")."""
    return code == "empty" or (code == "corrupt" and "truncated" in (error or ""))


def young(entry: files.Entry, grace_s: float, now: float | None = None) -> bool:
    """Modified less than grace_s ago: a stalled upload may still resume."""
    return not files.settled(entry, grace_s, now)
