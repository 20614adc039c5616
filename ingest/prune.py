"""python -m ingest prune --older-than 90d: retention for processed/ and quarantine/.

Removes the photos moved there longer ago than the retention, and keeps every row: the file's
ingest_files row gets `pruned_at`, so reports, the review desk and `review export` can say that the
photo was pruned instead of failing on a missing file. Never removed: a photo whose review item is
open, or whose current decision was never exported (`review export` stamps what it wrote). A file
is removed only if it still holds the content its row records (sha256): a path that now holds
another file is left alone and named. `--prune-after` on `ingest run` / `schedule` applies the same
retention at the end of every run.
"""
from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

from ingest import db, files
from ingest.journal import path_from_row

logger = logging.getLogger("ingest")

CHUNK = 1000  # rows read and marked at a time


@dataclass
class PruneSummary:
    older_than_s: float
    dry_run: bool = False
    removed: Counter = field(default_factory=Counter)  # destination -> files
    removed_bytes: int = 0
    already_gone: int = 0
    other_content: int = 0  # the path holds a file that is not the recorded photo: left alone
    failed: int = 0  # the unlink failed (permissions, a read-only mount): tried again next time
    kept_open: int = 0  # older than the retention, kept: its review item waits, or a gold photo
    kept_unexported: int = 0  # older than the retention, kept: decision not exported yet

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.removed.items())) or "none"
        return (f"{verb} {sum(self.removed.values())} photos ({self.removed_bytes / 1048576:.1f} MiB; {where}) moved more than "
                f"{self.older_than_s / 86400:g} days ago; kept {self.kept_open} waiting for review or kept as gold and "
                f"{self.kept_unexported} whose decision is not exported yet; {self.already_gone} already gone, "
                f"{self.other_content} left because their path holds other content, {self.failed} could not be removed")


def prune(database_url: str, older_than_s: float, *, dry_run: bool = False) -> PruneSummary:
    if older_than_s <= 0:
        raise ValueError(f"the retention must be positive, got {older_than_s}s")
    summary = PruneSummary(older_than_s, dry_run)
    params = {"older_than_s": older_than_s, "limit": CHUNK}
    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(db.load_query("prune_kept"), params)
        summary.kept_open, summary.kept_unexported = cur.fetchone()
    after = 0
    while True:
        with db.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(db.load_query("prune_candidates"), {**params, "after": after})
            rows = cur.fetchall()
        if not rows:
            break
        after = rows[-1][0]
        removed, gone = [], []
        for file_id, sha, destination, dest_path, dest_bytes, size in rows:
            path = path_from_row(dest_path, dest_bytes)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                gone.append(file_id)
                continue
            except OSError as exc:
                summary.failed += 1
                logger.warning("%s: cannot be checked for pruning (%s); kept", path, exc, extra={"event": "prune_failed"})
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != size or files.sha256_of(path) != sha:
                summary.other_content += 1
                logger.warning("%s: holds other content than its row %s records; not pruned", path, file_id,
                               extra={"event": "prune_other_content", "path": str(path)})
                continue
            if not dry_run:
                try:
                    os.unlink(path)
                except OSError as exc:
                    summary.failed += 1
                    logger.warning("%s: cannot be removed (%s); kept", path, exc, extra={"event": "prune_failed"})
                    continue
            removed.append(file_id)
            summary.removed[destination] += 1
            summary.removed_bytes += size
        summary.already_gone += len(gone)
        if dry_run:
            continue
        marks = [(ids, note) for ids, note in ((removed, f"pruned: moved more than {older_than_s / 86400:g} days ago"),
                                               (gone, "pruned: the file was already gone")) if ids]
        if marks:
            with db.connect(database_url) as conn, conn.cursor() as cur:
                for ids, note in marks:
                    cur.execute(db.load_query("mark_pruned"), {"ids": ids, "note": note})
    logger.info("prune: %s", summary.line(), extra={"event": "pruned"})
    return summary
