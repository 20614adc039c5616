"""A photo that kills (or hangs) TorchServe's worker every time it is served costs that photo alone,
for real (TorchServe, PostgreSQL, the job's CLI):

* among good photos, one that kills the worker and one that hangs it past responseTimeout: every
  good photo is recorded in the first run; the two end in quarantine with rejected rows
  `worker_crash` and `worker_timeout`, and PostgreSQL counts the deaths per content;
* a model whose worker dies on every photo (a real outage: the plain test image dies too) stops the
  run with exit 3, records nothing, moves nothing, and counts no photo as having died alone.

The handler is a stand-in served like the real one (single photos and multipart requests of several,
batched by TorchServe): it answers every photo with a fixed label, except that a photo holding
KILL_MARK ends the worker process and one holding HANG_MARK never returns.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ingest_helpers import cli, fetch, handler_archive, ingest_env, snapshot, summary_of
from serving.torchserve import make_torchserve

pytestmark = pytest.mark.integration

KILL_MARK = b"KILL-THE-WORKER"
HANG_MARK = b"HANG-THE-WORKER"
RESPONSE_TIMEOUT_S = 4

STANDIN_HANDLER = '''
"""A test handler: answers every photo, except that a marked photo kills or hangs its worker."""
import os
import re
import time

PART = re.compile(r"photos\\[(\\d+)\\]")


def photos_of(row):
    parts = sorted((int(m.group(1)), bytes(v)) for k, v in row.items() if (m := PART.fullmatch(k)))
    if parts:
        return [p for _, p in parts], True
    return [bytes(row.get("body") or row.get("data"))], False


class StandinHandler:
    def initialize(self, context):
        self.name = context.model_name

    def handle(self, data, context):
        out = []
        for row in data:
            photos, several = photos_of(row)
            for photo in photos:
                if self.name == "refund_killall" or %(kill)r in photo:
                    os._exit(9)  # the worker process ends holding the batch
                if %(hang)r in photo:
                    time.sleep(3600)  # until TorchServe kills the worker at responseTimeout
            answers = [{"label": "Tshirts", "confidence": 0.9, "topk": [{"label": "Tshirts", "p": 0.9}],
                        "needs_review": False, "model": self.name, "version": "1"} for _ in photos]
            out.append(answers if several else answers[0])
        return out
''' % {"kill": KILL_MARK, "hang": HANG_MARK}


@pytest.fixture
def standin_torchserve(tmp_path):
    """start(name) -> a TorchServe serving the stand-in handler as model `name` alone."""
    started = []

    def start(name: str):
        store = tmp_path / f"store-{name}"
        store.mkdir()
        handler_archive(name, STANDIN_HANDLER, "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 20\n"
                                               f"responseTimeout: {RESPONSE_TIMEOUT_S}\n", tmp_path, store)
        ts = make_torchserve(store, tmp_path / f"ts-{name}")
        started.append(ts)
        ts.start([f"{name}={name}.mar"])
        return ts

    yield start
    for ts in started:
        ts.stop()


def write_photos(folder: Path, unseen_images: Path, n: int, marks: dict[int, bytes]) -> dict[str, str]:
    """n photos of distinct content as PNG; photo i carries marks[i] after its image data."""
    folder.mkdir(parents=True)
    sources = sorted((unseen_images / "images").glob("*.jpg"))
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        img.putpixel((0, 0), (i % 256, 7, 77))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (folder / f"p{i:03d}.png").write_bytes(buf.getvalue() + marks.get(i, b""))
    return snapshot(folder.parent)


def test_a_photo_that_kills_or_hangs_the_worker_costs_that_photo_alone(standin_torchserve, database_url, tmp_path,
                                                                       unseen_images):
    ts = standin_torchserve("refund_standin")
    inbox = tmp_path / "inbox"
    kill, hang = 9, 27
    originals = write_photos(inbox / "batch", unseen_images, 40, {kill: KILL_MARK, hang: HANG_MARK})
    bad = {f"batch/p{kill:03d}.png": "worker_crash", f"batch/p{hang:03d}.png": "worker_timeout"}
    env = ingest_env(ts.inference_url, database_url)
    run = cli(inbox, env, "--model", "refund_standin", "--photos-per-request", "8", "--concurrency", "2",
              "--batch-size", "16", "--response-timeout", str(RESPONSE_TIMEOUT_S), "--backoff", "0.1",
              "--backoff-max", "0.5", timeout=420)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = summary_of(run.stdout)
    assert summary["processed"] == 38 and summary["quarantined"] == 2 and summary["failed"] == 0, summary
    assert summary["worker_died"] >= 6, summary  # each bad photo: its request, halves, twice alone
    assert snapshot(inbox) == {}
    quarantined = {str(p.relative_to(tmp_path / "quarantine")): p for p in (tmp_path / "quarantine").rglob("*.png")}
    assert sorted(Path(k).name for k in quarantined) == sorted(Path(k).name for k in bad)

    rows = fetch(database_url, "SELECT sha256, status, error_code, error FROM predictions")
    assert len(rows) == 40 and len({r[0] for r in rows}) == 40
    by_sha = {r[0]: r for r in rows}
    for rel, code in bad.items():
        _, status, error_code, error = by_sha[originals[rel]]
        assert (status, error_code) == ("rejected", code), error
        assert "alone" in error and "test image went through" in error
    assert {r[1] for r in rows if r[0] not in {originals[rel] for rel in bad}} == {"ok"}

    counts = {sha: (in_flight, alone, kind) for sha, in_flight, alone, kind in
              fetch(database_url, "SELECT sha256, in_flight, alone, last_kind FROM worker_crashes")}
    for rel, code in bad.items():
        in_flight, alone, kind = counts[originals[rel]]
        assert alone == 2 and in_flight >= 3 and kind == code, counts[originals[rel]]
    assert all(alone == 0 for sha, (_, alone, _) in counts.items() if sha not in {originals[rel] for rel in bad})

    again = cli(inbox, env, "--model", "refund_standin")
    assert again.returncode == 0 and summary_of(again.stdout)["taken"] == 0, again.stderr[-3000:]


def test_a_worker_that_dies_on_every_photo_is_an_outage_that_decides_nothing(standin_torchserve, database_url,
                                                                             tmp_path, unseen_images):
    ts = standin_torchserve("refund_killall")
    inbox = tmp_path / "inbox"
    originals = write_photos(inbox / "batch", unseen_images, 12, {})
    env = ingest_env(ts.inference_url, database_url)
    run = cli(inbox, env, "--model", "refund_killall", "--photos-per-request", "4", "--concurrency", "1",
              "--retries", "3", "--backoff", "0.1", "--backoff-max", "0.5", timeout=300)
    assert run.returncode == 3, run.stderr[-4000:]  # TorchServe unavailable
    summary = summary_of(run.stdout)
    assert "plain test image" in summary["error"] and "not the photo" in summary["error"], summary
    assert summary["processed"] == summary["quarantined"] == 0
    assert snapshot(inbox) == originals and not (tmp_path / "quarantine").exists()
    assert fetch(database_url, "SELECT count(*) FROM predictions")[0][0] == 0
    assert fetch(database_url, "SELECT coalesce(max(alone), 0) FROM worker_crashes")[0][0] == 0
    assert fetch(database_url, "SELECT count(*) FROM worker_crashes")[0][0] > 0  # the deaths were counted in flight
