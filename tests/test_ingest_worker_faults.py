"""TorchServe's worker fails under the ingestion job, for real: every answer that is not a verdict on
the photo is retried (serving.client.ANSWERS), and a photo is never quarantined for it.

* the backend worker SIGKILLed while the job sends 200 photos: TorchServe answers the batch the
  worker held with "Worker died." (507 or 500, below) and starts a new worker; the job sends those
  photos again in halves, each alone (ingest.predict's isolation); none is judged for it, and all
  are recorded once;
* a handler that raises MemoryError (TorchServe: 507 "Out of resources"): down, the run stops
  (exit 3) touching nothing; a handler answering a bare 400 without its own `code`: the photos stay
  in the inbox (exit 1); the real model then records every one of them.
"""
from __future__ import annotations

import io
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from ingest_helpers import (MODEL, assert_exactly_once, cli, ended, fetch, handler_archive, ingest_env, snapshot, start_cli,
                            summary_of, wait_for)
from serving.archive import archive_name
from serving.torchserve import make_torchserve

pytestmark = pytest.mark.integration


def write_photos(folder: Path, unseen_images: Path, n: int) -> dict[str, str]:
    """n photos of distinct content (the unseen images, each with one pixel set to its number, as
    lossless PNG); {path relative to folder's parent: sha256}."""
    folder.mkdir(parents=True)
    sources = sorted((unseen_images / "images").glob("*.jpg"))
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        img.putpixel((0, 0), (i % 256, i // 256, 77))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (folder / f"p{i:04d}.png").write_bytes(buf.getvalue())
    originals = snapshot(folder.parent)
    assert len(set(originals.values())) == n
    return originals


def workers(ts) -> list[psutil.Process]:
    """TorchServe's backend workers: the python processes under its frontend running model_service_worker."""
    found = []
    for p in psutil.Process(ts.pid()).children(recursive=True):
        try:
            if any("model_service_worker" in part for part in p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_worker_killed_mid_run_is_retried_and_every_photo_recorded_once(start_torchserve, database_url, tmp_path, unseen_images):
    ts = start_torchserve(models=[f"{MODEL}={archive_name('1')}"])
    inbox = tmp_path / "inbox"
    originals = write_photos(inbox / "batch", unseen_images, 200)
    worker, *others = workers(ts)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = ingest_env(ts.inference_url, database_url, INGEST_TEST_HOOK="pause@after_commit", INGEST_TEST_HOOK_DIR=str(hooks))
    # At most 2 requests of 4 photos in flight (2 x --concurrency), so that most photos are still to be
    # sent when the first batch is recorded: with the whole inbox in flight at once, a fast TorchServe
    # could answer every photo before the worker is frozen, and nothing would be retried.
    with ended(start_cli(inbox, env, "--batch-size", "16", "--concurrency", "1", "--photos-per-request", "4",
                         "--retries", "10", "--backoff", "0.2", "--backoff-max", "2")) as proc:
        wait_for(hooks / "paused-after_commit", proc)  # mid-run: one batch recorded, most photos still to send
        # Freeze the worker, let the job send: the frontend hands the worker a batch it will never
        # answer, so the SIGKILL below surely lands with requests in the worker's hands.
        worker.send_signal(signal.SIGSTOP)
        (hooks / "resume-after_commit").touch()
        time.sleep(1.5)
        worker.kill()
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = summary_of(out)
    assert summary["worker_died"] > 0 and summary["failed"] == 0 and summary["quarantined"] == 0, summary
    # TorchServe's answer for the batch the worker held: 500, which WorkerThread turns into 507 only
    # when the JVM has already seen the worker exit with 137 (killed) as it answers -- a race
    assert re.search(r"HTTP 50[07]: Worker died\.", err), err[-3000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["processed"] == set(originals)
    (ok,), = fetch(database_url, "SELECT count(*) FROM predictions WHERE status = 'ok'")
    assert ok == 200
    deadline = time.monotonic() + 120  # TorchServe replaces the dead worker (the others may have finished the run)
    while len(now := workers(ts)) < 1 + len(others) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(now) == 1 + len(others) and worker.pid not in {p.pid for p in now}


# -- a handler that fails in TorchServe's own ways ---------------------------------------------

FAILING_HANDLER = '''
"""A test handler that never classifies: how it fails depends on the model name it is served as."""
from ts.utils.util import PredictionException


class FailingHandler:
    def initialize(self, context):
        self.name = context.model_name

    def handle(self, data, context):
        if self.name == "refund_oom":
            raise MemoryError("the batch does not fit")  # TorchServe answers 507 "Out of resources"
        raise PredictionException("bad request", 400)  # a 400 without the handler's own code
'''


def make_failing_archive(name: str, work: Path, store: Path) -> Path:
    """An archive of FAILING_HANDLER named `name`."""
    return handler_archive(name, FAILING_HANDLER, "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 10\n"
                                                  "responseTimeout: 120\n", work, store)


@pytest.fixture
def failing_torchserve(model_store, tmp_path):
    """A TorchServe serving the real model, refund_oom (MemoryError) and refund_bare400 (a bare 400)."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / archive_name("1"), store)
    for name in ("refund_oom", "refund_bare400"):
        make_failing_archive(name, tmp_path, store)
    ts = make_torchserve(store, tmp_path / "ts-failing")
    ts.start([f"{MODEL}={archive_name('1')}", "refund_oom=refund_oom.mar", "refund_bare400=refund_bare400.mar"])
    yield ts
    ts.stop()


def test_a_handler_out_of_memory_stops_the_run_and_quarantines_nothing(failing_torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = write_photos(inbox / "batch", unseen_images, 12)
    env = ingest_env(failing_torchserve.inference_url, database_url)
    fast_retries = ("--retries", "3", "--backoff", "0.05", "--backoff-max", "0.2")

    oom = cli(inbox, env, "--model", "refund_oom", *fast_retries)
    assert oom.returncode == 3, oom.stderr[-3000:]  # TorchServe unavailable
    summary = summary_of(oom.stdout)
    assert summary["retried"] > 0 and summary["quarantined"] == summary["processed"] == 0
    assert "stays unavailable after 3 attempts: HTTP 507: Out of resources" in summary["error"]
    assert snapshot(inbox) == originals and not (tmp_path / "quarantine").exists()
    assert fetch(database_url, "SELECT count(*) FROM predictions")[0][0] == 0
    assert [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs")] == ["failed"]

    bare = cli(inbox, env, "--model", "refund_bare400", *fast_retries)
    assert bare.returncode == 1, bare.stderr[-3000:]  # left in the inbox, the run went on
    summary = summary_of(bare.stdout)
    assert summary["failed"] == len(originals) and summary["retried"] >= 2 * len(originals)
    assert summary["quarantined"] == summary["processed"] == 0
    assert snapshot(inbox) == originals and not (tmp_path / "quarantine").exists()
    assert fetch(database_url, "SELECT count(*) FROM predictions")[0][0] == 0

    real = cli(inbox, env, "--model", MODEL)
    assert real.returncode == 0, real.stderr[-3000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["processed"] == set(originals)
    rows = fetch(database_url, "SELECT sha256, status, model_name FROM predictions")
    assert sorted(r[0] for r in rows) == sorted(originals.values())
    assert {(r[1], r[2]) for r in rows} == {("ok", MODEL)}
