"""Rollouts against a real TorchServe: register, test, promote or refuse, roll back, restart, retire.

Two tiny models that behave differently: `good` is trained on the sample catalogue, `bad` on
the same images with every label shifted to the next class (it is confidently wrong). The store
holds bad as version 1 (the first default), good as version 2, and bad again as version 3.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from serving import rollout
from serving.archive import OTHER_LABEL
from serving.paths import REPO_ROOT
from serving.__main__ import main as serving_main
from serving.rollout import RolloutError
from serving.torchserve import make_torchserve
from support import train_tiny
from training import export as export_mod
from training import make_sample_catalogue

MODEL = "refund_classifier"


# -- archives --------------------------------------------------------------------------------

def add_sample(mar: Path, catalogue: Path) -> None:
    """The layout training.export writes (from the run's test split): sample/styles.csv + sample/images/."""
    with zipfile.ZipFile(mar, "a") as z:
        z.write(catalogue / "styles.csv", "sample/styles.csv")
        for image in sorted((catalogue / "images").glob("*.jpg")):
            z.write(image, f"sample/images/{image.name}")


@pytest.fixture(scope="module")
def shifted_catalogue(tmp_path_factory) -> Path:
    """The sample catalogue's images with every label replaced by the next class's."""
    out = tmp_path_factory.mktemp("shifted")
    rows = make_sample_catalogue.write_catalogue(out, per_class=30, seed=0)
    classes = sorted({r["articleType"] for r in rows})
    shift = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    (out / "styles.csv").write_text("id,articleType\n" + "".join(f"{r['id']},{shift[r['articleType']]}\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def archives_dir(trained_run, shifted_catalogue, unseen_images, tmp_path_factory) -> Path:
    bad_run = train_tiny(shifted_catalogue, tmp_path_factory.mktemp("bad-run"), epochs=3)
    out = tmp_path_factory.mktemp("archives")
    # the unseen images as the sample (not each run's test split), so both versions meet the same one
    export_mod.export(bad_run, "1", model_store=out, sample_per_class=0)
    export_mod.export(trained_run, "2", model_store=out, sample_per_class=0)
    export_mod.export(bad_run, "3", model_store=out, sample_per_class=0)
    for v in ("2", "3"):  # version 1 carries none: --sample is then required
        add_sample(out / f"{MODEL}-{v}.mar", unseen_images)
    return out


@pytest.fixture
def store(archives_dir, tmp_path) -> Path:
    """A fresh model store per test (the state file lives in it)."""
    out = tmp_path / "model_store"
    shutil.copytree(archives_dir, out)
    return out


@pytest.fixture
def server(store, tmp_path):
    ts = make_torchserve(store, tmp_path / "torchserve")
    yield ts
    ts.stop()


def predict_version(ts, data: bytes) -> str:
    r = ts.client.inference("POST", f"predictions/{MODEL}", data=data)
    assert r.status_code == 200, r.text
    return r.json()["version"]


# -- without a server ------------------------------------------------------------------------

def test_archive_manifest_config_and_sample(archives_dir, unseen_images):
    archive = rollout.read_archive(archives_dir / f"{MODEL}-2.mar")
    assert (archive.model, archive.version) == (MODEL, "2")
    assert archive.config["batchSize"] >= 1 and archive.config["minWorkers"] >= 1
    with rollout.archive_sample(archive) as folder:
        sample = rollout.read_sample(folder)
    expected = rollout.read_sample(unseen_images)
    assert [(e.name, e.label, e.data) for e in sample] == [(e.name, e.label, e.data) for e in expected]
    assert len(sample) == 18 and len({e.label for e in sample}) == 6
    with rollout.archive_sample(rollout.read_archive(archives_dir / f"{MODEL}-1.mar")) as folder:
        assert folder is None
    assert len(rollout.read_sample(unseen_images, limit=5)) == 5


def test_labels_from_a_kaggle_styles_csv(tmp_path):
    csv = tmp_path / "styles.csv"
    csv.write_text("id,gender,articleType,productDisplayName\n"
                   "1,Men,Tshirts,Red, round neck, cotton\n"
                   "2,Women,NA,no label\n"
                   "x3,Men,Watches,bad id\n"
                   "4,Women,Watches,\n")
    assert rollout.read_labels(csv) == {"1": "Tshirts", "4": "Watches"}
    csv.write_text("id,label\n1,Tshirts\n")
    with pytest.raises(RolloutError, match="articleType"):
        rollout.read_labels(csv)


def test_archives_are_taken_from_the_model_store_by_their_version(server, store, tmp_path):
    outside = tmp_path / f"{MODEL}-2.mar"
    shutil.copy(store / f"{MODEL}-2.mar", outside)
    with pytest.raises(RolloutError, match="not in the model store"):
        rollout.resolve_archive(server, outside)
    (store / f"{MODEL}-2.mar").rename(store / f"{MODEL}-7.mar")
    with pytest.raises(RolloutError, match="expected refund_classifier-2.mar"):
        rollout.resolve_archive(server, f"{MODEL}-7.mar")
    assert rollout.resolve_archive(server, store / f"{MODEL}-1.mar").version == "1"


def test_state_history_keeps_each_default_once(tmp_path):
    state = rollout.State.load(tmp_path)
    for v in ("1", "2", "1", "3"):
        state.promote(v)
    state.save()
    again = rollout.State.load(tmp_path)
    assert (again.default, again.history) == ("3", ["2", "1", "3"])
    assert set(again.versions) == {"1", "2", "3"} and all("promoted_at" in i for i in again.versions.values())


# -- real TorchServe -------------------------------------------------------------------------

@pytest.fixture
def secured(store, tmp_path, monkeypatch):
    """Token authorization on, allowed_urls shut to everything but the model store; the CLI finds
    TorchServe's key file through RC_STATE_DIR, and runs from the store's parent like from the repository."""
    monkeypatch.setenv("RC_STATE_DIR", str(tmp_path))
    monkeypatch.chdir(store.parent)
    ts = make_torchserve(store, tmp_path / "torchserve", disable_token_authorization="false",
                         allowed_urls=r"https://models\.example\.invalid/.*")
    yield ts
    ts.stop()


@pytest.mark.integration
def test_rollout_refusal_restart_rollback_retire(secured, store, unseen_images, capsys):
    """The whole life of three versions, with token authorization on (the ingestion test below runs with it off)."""
    server = secured
    cli = ["--config", str(server.config)]
    image = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    assert rollout.serve(server, f"{MODEL}-1.mar") == "1"  # as `make demo` does: up --archive
    assert server.key_file.is_file()

    # The better model is promoted, tested on the sample it carries.
    outcome = rollout.rollout(server, f"model_store/{MODEL}-2.mar")  # the form, relative to the repository
    assert outcome.promoted, outcome.report()
    assert (outcome.previous, outcome.sample_from) == ("1", f"the sample inside {MODEL}-2.mar")
    assert outcome.candidate.accuracy >= 0.8 and outcome.default.accuracy <= 0.3, outcome.report()
    assert rollout.current_default(server) == "2" and predict_version(server, image) == "2"
    described = server.describe(MODEL, "2")[0]
    archive_cfg = rollout.read_archive(store / f"{MODEL}-2.mar").config
    assert (described["batchSize"], described["maxBatchDelay"]) == (archive_cfg["batchSize"], archive_cfg["maxBatchDelay"])

    # A worse model is refused, unregistered, and the CLI exits non-zero printing the comparison.
    code = serving_main([*cli, "rollout", f"model_store/{MODEL}-3.mar", "--sample", str(unseen_images)])
    err = capsys.readouterr().err
    assert code == 4
    assert "refused" in err and "candidate" in err and "default" in err and "tolerance 0.020" in err, err
    assert list(rollout.registered(server)) == ["1", "2"] and rollout.current_default(server) == "2"

    # A registered version is not rolled out twice.
    with pytest.raises(RolloutError, match="already registered"):
        rollout.rollout(server, f"{MODEL}-2.mar")

    rows, live = rollout.versions(server)
    assert live and [(r.version, r.default, r.archive) for r in rows] == [("1", False, f"{MODEL}-1.mar"), ("2", True, f"{MODEL}-2.mar")]
    assert all(r.registered_at != "?" for r in rows)
    assert serving_main([*cli, "versions"]) == 0
    listing = capsys.readouterr().out
    assert any(line.startswith("*") and f"{MODEL}-2.mar" in line for line in listing.splitlines()), listing

    # A restart serves the promoted default, and the earlier one is back for a rollback.
    server.stop()
    assert serving_main([*cli, "versions"]) == 0  # while down: from the state file
    listing = capsys.readouterr().out
    assert "down" in listing and any(line.startswith("*") and f"{MODEL}-2.mar" in line for line in listing.splitlines()), listing
    assert rollout.serve(server) == "2"
    assert rollout.current_default(server) == "2" and list(rollout.registered(server)) == ["1", "2"]
    assert predict_version(server, image) == "2"

    assert serving_main([*cli, "rollback"]) == 0
    assert "2 -> 1" in capsys.readouterr().out
    assert rollout.current_default(server) == "1" and predict_version(server, image) == "1"
    assert rollout.State.load(store).default == "1"

    assert serving_main([*cli, "retire", "--keep", "1"]) == 0
    assert "unregistered: 2" in capsys.readouterr().out
    assert list(rollout.registered(server)) == ["1"] and set(rollout.State.load(store).versions) == {"1"}
    assert (store / f"{MODEL}-2.mar").is_file()  # archives are never deleted
    with pytest.raises(RolloutError, match="nothing to roll back to"):
        rollout.rollback(server)


# -- a reviewed export as the sample ---------------------------------------------------------

@pytest.fixture(scope="module")
def other_archive(tmp_path_factory) -> Path:
    """Version 4, with the `other` output: trained on the sample catalogue and products outside it."""
    catalogue = tmp_path_factory.mktemp("catalogue-outside")
    make_sample_catalogue.write_catalogue(catalogue, per_class=30, seed=0, outside_per_class=30)
    run = train_tiny(catalogue, tmp_path_factory.mktemp("other-run"), "--other", "class")
    out = tmp_path_factory.mktemp("other-archive")
    export_mod.export(run, "4", model_store=out, sample_per_class=0)
    return out / f"{MODEL}-4.mar"


@pytest.fixture(scope="module")
def reviewed_export(tmp_path_factory) -> Path:
    """A folder as `python -m review export` writes it (styles.csv with id,articleType + images/):
    new photos of the refund categories, as many of products outside them labelled `other`, and one row
    whose photo is missing."""
    out = tmp_path_factory.mktemp("reviewed")
    rows = make_sample_catalogue.write_catalogue(out, per_class=3, seed=998, first_id=70000, outside_per_class=6)
    labels = [(r["id"], OTHER_LABEL if r["articleType"] in make_sample_catalogue.OUTSIDE_DRAWERS else r["articleType"])
              for r in rows] + [(79999, "Tshirts")]
    (out / "styles.csv").write_text("id,articleType\n" + "".join(f"{i},{label}\n" for i, label in labels))
    return out


def test_sample_notes_name_missing_photos_and_labels_without_an_output(archives_dir, reviewed_export, tmp_path):
    sample = rollout.read_sample(reviewed_export)
    assert len(sample) == 36 and sum(e.label == OTHER_LABEL for e in sample) == 18
    archive = rollout.read_archive(archives_dir / f"{MODEL}-2.mar")
    assert rollout.sample_notes(reviewed_export, sample, archive) == [
        f"1 of the 37 labelled rows of {reviewed_export / 'styles.csv'} have no images/<id>.jpg: left out"]
    renamed = [rollout.Example(e.name, "Tshirt" if e.label == "Tshirts" else e.label, e.data) for e in sample]
    assert rollout.sample_notes(reviewed_export, renamed, archive)[1] == (
        "3 images are labelled with a category version 2 has no output for, so they count as its misses: 'Tshirt' (3)")


@pytest.mark.integration
def test_rollout_judges_a_candidate_on_a_reviewed_export(server, store, trained_run, other_archive, reviewed_export,
                                                         capsys):
    """--sample DIR with photos reviewed as "not a refund category": a candidate that answers them
    `other` gains on the figure over all images; one that lost the `other` output is refused by it."""
    shutil.copy(other_archive, store)
    export_mod.export(trained_run, "5", model_store=store, sample_per_class=0)  # version 2's model again: no `other`
    assert rollout.serve(server, f"{MODEL}-2.mar") == "2"

    # The tolerances leave room for the tiny models' differences on the refund categories.
    outcome = rollout.rollout(server, f"{MODEL}-4.mar", sample_dir=reviewed_export, tolerance=0.3)
    report = outcome.report()
    assert outcome.promoted, report
    assert (outcome.candidate.n, outcome.candidate.outside) == (36, 18)
    assert outcome.candidate.outside_correct >= 12 and outcome.default.outside_correct == 0, report
    assert outcome.default.overall == pytest.approx(outcome.default.correct / 36)
    assert outcome.candidate.overall > outcome.default.overall + 0.25, report
    assert "all, other right" in report and f"{outcome.candidate.correct + outcome.candidate.outside_correct}/36" in report
    assert "note: 1 of the 37 labelled rows" in report, report
    assert rollout.current_default(server) == "4"

    code = serving_main(["--config", str(server.config), "rollout", f"{MODEL}-5.mar", "--sample", str(reviewed_export),
                         "--tolerance", "0.2"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "top-1 over all images ('other' right when answered 'other')" in err and "below the default's" in err, err
    assert rollout.current_default(server) == "4" and list(rollout.registered(server)) == ["2", "4"]


# -- ingestion while versions change ---------------------------------------------------------

def write_chunk(folder: Path, unseen_images: Path, k: int) -> set[str]:
    """The unseen images, each with one pixel set to the chunk's number, so every chunk is new content; their sha256."""
    folder.mkdir(parents=True)
    digests = set()
    for i, src in enumerate(sorted((unseen_images / "images").glob("*.jpg"))):
        img = Image.open(src).convert("RGB")
        img.putpixel((0, 0), (k % 256, (k // 256) % 256, i % 256))
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # lossless: the changed pixel survives, so the content is new
        (folder / f"c{k}-{src.stem}.png").write_bytes(buf.getvalue())
        digests.add(hashlib.sha256(buf.getvalue()).hexdigest())
    return digests


@pytest.mark.integration
def test_ingestion_during_rollout_and_rollback_loses_nothing(server, store, database_url, unseen_images, tmp_path):
    from ingest import db
    from ingest.job import Settings, run

    rollout.serve(server, f"{MODEL}-1.mar")
    sent: set[str] = set()
    summaries = []
    chunks_done = []  # (started, finished) per chunk
    stop = threading.Event()
    errors: list[BaseException] = []

    def ingest_loop():
        k = 0
        try:
            while not stop.is_set():
                inbox = tmp_path / "inboxes" / f"chunk-{k}"
                sent.update(write_chunk(inbox, unseen_images, k))
                started = datetime.now(timezone.utc)
                summaries.append(run(Settings(inbox=inbox, database_url=database_url, torchserve_url=server.inference_url,
                                              batch_size=8, concurrency=4)))
                chunks_done.append((started, datetime.now(timezone.utc)))
                k += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    def wait_for_a_chunk_started_after(t: datetime) -> None:
        deadline = time.monotonic() + 120
        while not any(s > t for s, _ in chunks_done):
            assert not errors and time.monotonic() < deadline, errors
            time.sleep(0.05)

    thread = threading.Thread(target=ingest_loop, daemon=True)
    thread.start()
    try:
        wait_for_a_chunk_started_after(datetime.now(timezone.utc))
        t_rollout = datetime.now(timezone.utc)
        assert rollout.rollout(server, f"{MODEL}-2.mar", log=lambda *_: None).promoted
        t_promoted = datetime.now(timezone.utc)
        wait_for_a_chunk_started_after(t_promoted)
        t_rollback = datetime.now(timezone.utc)
        assert rollout.rollback(server, log=lambda *_: None) == ("2", "1")
        t_rolled_back = datetime.now(timezone.utc)
        wait_for_a_chunk_started_after(t_rolled_back)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not errors, errors

    assert all(s.failed == 0 and s.quarantined == 0 for s in summaries), summaries
    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT sha256, model_version, received_at, status FROM predictions")
        rows = cur.fetchall()
    assert {r[0] for r in rows} == sent and len(rows) == len(sent)  # every image, once
    assert all(r[3] == "ok" for r in rows)
    by_time = [(received, version) for _, version, received, _ in rows]
    assert {v for _, v in by_time} == {"1", "2"}
    # The version recorded is the one that served: 1 before the rollout, 2 between the
    # promotion and the rollback, 1 again after it (requests sent during a switch may get either).
    assert all(v == "1" for t, v in by_time if t < t_rollout)
    assert all(v == "2" for t, v in by_time if t_promoted < t < t_rollback)
    assert all(v == "1" for t, v in by_time if t > t_rolled_back)
    assert sum(t > t_rolled_back for t, _ in by_time) > 0 and sum(t_promoted < t < t_rollback for t, _ in by_time) > 0


# -- a crash between set-default and the state file ------------------------------------------

def serving_cli(server, *args: str, hook: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SERVING_TEST_HOOK": hook, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "serving", "--config", str(server.config), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_sigkill_between_set_default_and_the_state_file_then_serving_up(server, store, unseen_images):
    """rollout and rollback killed right after TorchServe switched, before the state file says so:
    the next `serving up` serves what the switch decided, never the version switched away from."""
    image = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    assert rollout.serve(server, f"{MODEL}-1.mar") == "1"

    killed = serving_cli(server, "rollout", f"{MODEL}-2.mar", hook="crash@after_set_default_rollout")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = rollout.State.load(store)
    assert state.default == "1" and state.switching["to"] == "2"  # the intent, on disk before the switch
    server.stop()  # the machine restarts
    assert rollout.serve(server) == "2"
    assert predict_version(server, image) == "2" and rollout.current_default(server) == "2"
    state = rollout.State.load(store)
    assert (state.default, state.history, state.switching) == ("2", ["1", "2"], None)

    killed = serving_cli(server, "rollback", hook="crash@after_set_default_rollback")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert rollout.State.load(store).default == "2"
    server.stop()
    assert rollout.serve(server) == "1"  # the rolled-back version is not served again after the restart
    assert predict_version(server, image) == "1"
    state = rollout.State.load(store)
    assert (state.default, state.history, state.switching) == ("1", ["1"], None)

    # Without a restart, the next command finishes an interrupted switch first.
    assert rollout.retire(server, 1, log=lambda *_: None) == ["2"]
    killed = serving_cli(server, "rollout", f"{MODEL}-2.mar", hook="crash@after_set_default_rollout")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert rollout.rollback(server, log=lambda *_: None) == ("2", "1")
    assert rollout.current_default(server) == "1" and rollout.State.load(store).switching is None
