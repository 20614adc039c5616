"""Retention against a real PostgreSQL: `python -m ingest prune` removes old photos from processed/
and quarantine/, keeps every row and marks it, never removes a photo whose review item is open or
whose decision was not exported, leaves a path that holds other content alone, and the review
export and desk say that a photo was pruned instead of failing."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import psycopg2
import pytest

from ingest import prune as prune_mod
from ingest import report
from review import queue
from review.export import export
from review_support import Rows, fetch
from serving.paths import REPO_ROOT

pytestmark = pytest.mark.integration

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DAY = 86400.0


def age(url: str, days: float) -> None:
    """Every move recorded so far happened `days` ago."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE ingest_files SET moved_at = now() - make_interval(days => %(d)s)", {"d": days})
    conn.close()


def test_prune_removes_old_photos_keeps_their_rows_and_what_review_still_needs(database_url, tmp_path):
    rows = Rows(database_url, tmp_path / "processed")
    alice = queue.add_reviewer(database_url, "alice", "alice-password")[0]
    accepted = rows.add(1, needs_review=False, confidence=0.99)  # no review item (its content is not in the audit sample)
    exported = rows.add(2)
    unexported = rows.add(3)
    unusable = rows.add(4)
    still_open = rows.add(5)
    swapped = rows.add(6, needs_review=False, confidence=0.99)
    for seed, label in ((2, "Tshirts"), (3, "Shirts"), (4, None)):  # items are claimed oldest first: 2, 3, 4
        queue.decide(database_url, queue.claim(database_url, alice), alice, label)
    first = export(database_url, tmp_path / "export-1", since=EPOCH)
    assert first.written == 2  # 2 and 3 (4 is "unusable": never exported)
    item = fetch(database_url, "SELECT id FROM review_items WHERE sha256 = %(s)s", {"s": unexported["sha256"]})[0][0]
    current = fetch(database_url, "SELECT decision_id FROM review_items WHERE id = %(i)s", {"i": item})[0][0]
    queue.decide(database_url, item, alice, "Jeans", replaces=current)  # 3's decision changed since its export: the new one is not exported
    swapped["path"].write_bytes(b"another photo under the recorded name")
    recent = rows.add(7, needs_review=False, confidence=0.99)

    age(database_url, 100)
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:  # 7 moved yesterday
        cur.execute("UPDATE ingest_files SET moved_at = now() - interval '1 day' WHERE sha256 = %(s)s", {"s": recent["sha256"]})
    conn.close()

    dry = prune_mod.prune(database_url, 90 * DAY, dry_run=True)
    assert sum(dry.removed.values()) == 3 and all(p["path"].exists() for p in (accepted, exported, unusable))

    summary = prune_mod.prune(database_url, 90 * DAY)
    assert dict(summary.removed) == {"processed": 3} and summary.other_content == 1
    assert (summary.kept_open, summary.kept_unexported) == (1, 1)
    assert "removed 3 photos" in summary.line()
    for gone in (accepted, exported, unusable):
        assert not gone["path"].exists()
    for kept in (unexported, still_open, swapped, recent):
        assert kept["path"].exists()
    pruned = dict(fetch(database_url, "SELECT sha256, pruned_at IS NOT NULL FROM ingest_files"))
    assert pruned == {accepted["sha256"]: True, exported["sha256"]: True, unusable["sha256"]: True,
                      unexported["sha256"]: False, still_open["sha256"]: False, swapped["sha256"]: False,
                      recent["sha256"]: False}
    assert fetch(database_url, "SELECT count(*) FROM predictions")[0][0] == 7  # every row kept

    # the export and the desk say so; the report shows what the folders hold
    again = export(database_url, tmp_path / "export-2", since=EPOCH)
    assert again.skipped.get("pruned") == 1 and again.written == 1  # 2 pruned, 3 (changed) written
    disk = report.collect(database_url, since=EPOCH, limit=10, sections=["disk"])["disk"]
    (folder, files, _mib, pruned_files, _pruned_mib, _oldest), = disk["rows"]
    assert (folder, files, pruned_files) == ("processed", 4, 3)
    item2 = fetch(database_url, "SELECT id FROM review_items WHERE sha256 = %(s)s", {"s": exported["sha256"]})[0][0]
    assert queue.photo_path(database_url, item2) is None and queue.photo_pruned(database_url, item2) is not None

    # the second export wrote 3's changed decision: now its photo may go too (from the command line)
    cli = subprocess.run([sys.executable, "-m", "ingest", "prune", "--older-than", "90d", "--database-url", database_url],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "removed 1 photos" in cli.stdout, cli.stdout + cli.stderr
    assert not unexported["path"].exists() and still_open["path"].exists() and swapped["path"].exists()


def test_prune_keeps_gold_photos_and_photos_waiting_for_an_opinion(database_url, tmp_path):
    import hashlib

    from review_support import image_bytes

    def point(seed: int) -> float:  # where the photo's content falls for the audit sample
        return int(hashlib.sha256(image_bytes(seed)).hexdigest()[:8], 16) / 2**32

    accepted = [seed for seed in range(1, 200) if point(seed) >= 0.02][:2]
    audited = next(seed for seed in range(1, 10000) if point(seed) < 0.02)
    rows = Rows(database_url, tmp_path / "processed")
    alice = queue.add_reviewer(database_url, "alice", "alice-password")[0]
    gold = rows.add(accepted[0], needs_review=False, confidence=0.99)
    assert queue.add_gold(database_url, gold["sha256"], "Tshirts") == "added"
    waiting = rows.add(audited, needs_review=False, confidence=0.99)
    queue.decide(database_url, queue.claim(database_url, alice, draw=0.99), alice, "Tshirts")
    assert fetch(database_url, "SELECT stage FROM review_items WHERE reason = 'audit'") == [("second",)]
    plain = rows.add(accepted[1], needs_review=False, confidence=0.99)
    age(database_url, 100)
    summary = prune_mod.prune(database_url, 90 * DAY)
    assert dict(summary.removed) == {"processed": 1} and summary.kept_open == 2 and summary.other_content == 0
    assert gold["path"].exists() and waiting["path"].exists() and not plain["path"].exists()
