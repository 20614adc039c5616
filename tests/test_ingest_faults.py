"""Faults mid-run, each followed by a rerun that must leave the inbox exactly-once:
SIGKILL of the job at named points, TorchServe stopped and restarted, PostgreSQL restarted.

The job runs as a subprocess (`python -m ingest run`); INGEST_TEST_HOOK makes it SIGKILL itself,
or pause until the test has done its damage, at a named point (see ingest.hooks).
"""
from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from ingest_helpers import assert_exactly_once, cli, fetch, fill_inbox, ingest_env, snapshot, start_cli, summary_of, wait_for
from serving.postgres import Cluster
from serving.torchserve import free_port

pytestmark = pytest.mark.integration


def bad_and_duplicate(inbox: Path) -> None:
    photos = sorted((inbox / "batch-a").iterdir())
    (inbox / "batch-a" / "zz copy.jpg").write_bytes(photos[0].read_bytes())  # same content, later in the walk
    (inbox / "batch-a" / "zz broken.jpg").write_bytes(photos[1].read_bytes()[:300])


# per_request None: the default --photos-per-request (several photos to a request); 1: one photo per request.
@pytest.mark.parametrize("point, per_request", [
    *((point, None) for point in ["after_read", "before_commit", "after_commit#2", "mid_move#2", "mid_link#2", "after_moves", "before_finish"]),
    ("before_commit", "1"), ("mid_move#2", "1"),
])
def test_sigkill_then_rerun_is_exactly_once(point, per_request, torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=10)
    bad_and_duplicate(inbox)
    originals = snapshot(inbox)
    env = ingest_env(torchserve.inference_url, database_url, **({"INGEST_PHOTOS_PER_REQUEST": per_request} if per_request else {}))

    killed = cli(inbox, {**env, "INGEST_TEST_HOOK": f"crash@{point}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if point.startswith(("mid_link", "mid_move")):  # photos under both names (hard links) until the rerun
        assert fetch(database_url, "SELECT count(*) FROM ingest_files WHERE state = 'pending'")[0][0] > 0
        after_crash = {"inbox": set(snapshot(inbox))}
    else:
        after_crash = assert_exactly_once(database_url, inbox, originals, final=False)
    if point.startswith(("after_commit", "mid_move", "after_moves")):
        assert fetch(database_url, "SELECT count(*) FROM ingest_files WHERE state = 'pending'")[0][0] > 0

    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert not where["inbox"] and where["quarantine"] == {"batch-a/zz broken.jpg"}
    summary = summary_of(rerun.stdout)
    if point.startswith(("after_commit", "mid_move", "mid_link", "after_moves")):
        assert summary["recovered"] > 0
    assert summary["processed"] + summary["duplicates"] + summary["quarantined"] + summary["recovered"] >= len(after_crash["inbox"])
    statuses = [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs ORDER BY id")]
    assert statuses == ["interrupted", "succeeded"]
    (dups,), = fetch(database_url, "SELECT count(*) FROM ingest_files WHERE duplicate")
    assert dups == 1  # "zz copy.jpg", whichever run moved it


def restart_while_paused(proc, hooks, *, stop, start) -> tuple[str, str]:
    """With the job paused after a commit: stop the service, let the job meet it dead, start it again;
    returns the job's (stdout, stderr). The job is killed if it outlives the test."""
    try:
        wait_for(hooks / "paused-after_commit", proc)
        stop()
        (hooks / "resume-after_commit").touch()
        time.sleep(1.0)  # the job now meets a dead service
        start()
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_torchserve_restart_mid_run(secured_torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = ingest_env(secured_torchserve.inference_url, database_url, TORCHSERVE_KEY_FILE=str(secured_torchserve.key_file),
                     TORCHSERVE_MANAGEMENT_URL=secured_torchserve.management_url,
                     INGEST_TEST_HOOK="pause@after_commit", INGEST_TEST_HOOK_DIR=str(hooks))
    # 2 requests of 2 photos in flight: most photos are still to be sent when TorchServe goes away
    proc = start_cli(inbox, env, "--retries", "40", "--backoff", "0.2", "--backoff-max", "2",
                     "--concurrency", "1", "--photos-per-request", "2")
    out, err = restart_while_paused(proc, hooks, stop=secured_torchserve.stop,
                                    start=lambda: secured_torchserve.start(["refund_classifier=refund_classifier-1.mar"]))  # new keys
    assert proc.returncode == 0, err[-3000:]
    summary = summary_of(out)
    assert summary["retried"] > 0 and summary["failed"] == 0
    assert_exactly_once(database_url, inbox, originals)

    env.pop("INGEST_TEST_HOOK")
    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert not where["inbox"] and len(where["processed"]) == len(originals)


def test_wrong_token_is_not_a_rejected_photo(secured_torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=3)
    env = ingest_env(secured_torchserve.inference_url, database_url)
    r = cli(inbox, env, "--retries", "2", "--backoff", "0.05")  # no key file given
    assert r.returncode == 3 and "requires a token" in r.stdout
    assert snapshot(inbox) == originals and not (tmp_path / "quarantine").exists()


@pytest.fixture
def private_cluster():
    root = Path(tempfile.mkdtemp(prefix="rc-test-pg-restart-"))
    cluster = Cluster(root=root, port=free_port())
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_postgres_restart_mid_run(private_cluster, torchserve, tmp_path, unseen_images):
    url = private_cluster.url()
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images)
    bad_and_duplicate(inbox)
    originals = snapshot(inbox)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = ingest_env(torchserve.inference_url, url, INGEST_TEST_HOOK="pause@after_commit", INGEST_TEST_HOOK_DIR=str(hooks))
    proc = start_cli(inbox, env)
    out, err = restart_while_paused(proc, hooks, stop=private_cluster.stop, start=private_cluster.start)
    assert proc.returncode == 0, err[-3000:]
    assert "reconnected to PostgreSQL" in err
    assert_exactly_once(url, inbox, originals)

    env.pop("INGEST_TEST_HOOK")
    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    where = assert_exactly_once(url, inbox, originals)
    assert not where["inbox"]


def test_sigkill_during_recovery_then_rerun(torchserve, database_url, tmp_path, unseen_images):
    """Killed once after a commit, then killed again while the next run finishes those moves."""
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=10)
    bad_and_duplicate(inbox)
    originals = snapshot(inbox)
    env = ingest_env(torchserve.inference_url, database_url)
    assert cli(inbox, {**env, "INGEST_TEST_HOOK": "crash@after_commit#2"}).returncode == -signal.SIGKILL
    assert cli(inbox, {**env, "INGEST_TEST_HOOK": "crash@recovery_mid_move"}).returncode == -signal.SIGKILL
    assert_exactly_once(database_url, inbox, originals, final=False)
    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert summary_of(rerun.stdout)["recovered"] > 0
    where = assert_exactly_once(database_url, inbox, originals)
    assert not where["inbox"]
    assert [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs ORDER BY id")] == ["interrupted", "interrupted", "succeeded"]
