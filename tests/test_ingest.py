"""Ingestion into a real PostgreSQL from a real TorchServe."""
from __future__ import annotations

import shutil

import pytest

from ingest import db
from ingest.job import Settings, run
from training.catalogue import read_styles

pytestmark = pytest.mark.integration


@pytest.fixture
def inbox(tmp_path, unseen_images):
    box = tmp_path / "inbox"
    shutil.copytree(unseen_images / "images", box / "batch-a")
    (box / "notes.txt").write_text("not an image: skipped by extension")
    good = sorted((unseen_images / "images").glob("*.jpg"))[0].read_bytes()
    (box / "broken.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG
    return box


def fetch(url: str, sql: str) -> list[tuple]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_ingest_records_one_row_per_image(torchserve, database_url, inbox, unseen_images):
    settings = Settings(inbox=inbox, database_url=database_url, torchserve_url=torchserve.inference_url, batch_size=5, concurrency=4)
    summary = run(settings)
    n_images = len(list((inbox / "batch-a").glob("*.jpg")))
    assert (summary.seen, summary.recorded, summary.rejected, summary.failed) == (n_images + 1, n_images + 1, 1, 0)

    truth = {f"{r['id']}.jpg": r["articleType"] for r in read_styles(unseen_images / "styles.csv")[0]}
    rows = fetch(database_url, "SELECT filename, sha256, label, confidence, model_name, model_version, status, error, run_id FROM predictions ORDER BY filename")
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == set(truth) | {"broken.jpg"}
    bad = by_name.pop("broken.jpg")
    assert bad[6] == "rejected" and bad[2] is None and bad[7].startswith("corrupt")
    assert all(r[6] == "ok" and r[4] == "refund_classifier" and r[5] == "1" and len(r[1]) == 64 for r in by_name.values())
    assert sum(r[2] == truth[name] for name, r in by_name.items()) / len(by_name) >= 0.8

    (status, counts), = fetch(database_url, "SELECT status, counts FROM ingest_runs")
    assert status == "succeeded" and counts["recorded"] == n_images + 1


def test_rerun_records_nothing_twice(torchserve, database_url, inbox):
    settings = Settings(inbox=inbox, database_url=database_url, torchserve_url=torchserve.inference_url)
    first = run(settings)
    second = run(settings)
    assert second.recorded == 0 and second.duplicates == first.recorded
    (count,), = fetch(database_url, "SELECT count(*) FROM predictions")
    assert count == first.recorded


def test_migrations_are_recorded_once(database_url):
    assert db.migrate(database_url) == []  # the template already has them all
    names = [r[0] for r in fetch(database_url, "SELECT name FROM schema_migrations ORDER BY version")]
    assert names == [name for _, name, _ in db.migrations()]
