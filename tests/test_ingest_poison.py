"""Unattended runs: whatever one file does, it costs that file alone, and no run is left 'running'.

Odd names (not UTF-8, 250 bytes and colliding), answers PostgreSQL cannot hold (NaN), a move or
a recovery the filesystem refuses, two inboxes on one database, memory held in bytes, and an
upload that stalls. Services are real (PostgreSQL, TorchServe); faults are injected in-process.
"""
from __future__ import annotations

import errno
import io
import math
import os
import shutil
import time
import weakref
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from ingest import files, inbox as inbox_mod, journal as journal_mod
from ingest.job import Job
from ingest.journal import Journal, answer_problem, prediction_row, stored_path, vet
from ingest.outcomes import EXIT_DONE, EXIT_LEFT, Item, Outcome
from ingest.settings import Settings
from ingest.store import Store
from ingest_helpers import MODEL, assert_exactly_once, cli, fetch, fill_inbox, ingest_env, sha, snapshot, summary_of
from serving.client import Answer

def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def settings_for(inbox: Path, url: str, ts_url: str, **kw) -> Settings:
    base = dict(inbox=inbox, database_url=url, torchserve_url=ts_url, min_age=0, settle=0, batch_size=5,
                concurrency=4, incomplete_grace=0, progress=False)
    return Settings(**{**base, **kw})


def photos(unseen_images: Path, n: int) -> list[bytes]:
    """n distinct JPEGs: the unseen photos, then crops of them (the catalogue has fewer than 30)."""
    sources = sorted((unseen_images / "images").glob("*.jpg"))
    out = []
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as img:
            crop = i // len(sources)
            buf = io.BytesIO()
            img.convert("RGB").crop((crop, crop, img.width - crop, img.height - crop)).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def make_file(folder: Path, name: bytes, data: bytes) -> bytes:
    """Write data under a name given as bytes (not necessarily UTF-8); returns the exact path."""
    path = os.path.join(os.fsencode(folder), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def exact_snapshot(root: Path) -> dict[bytes, str]:
    """{exact path bytes relative to root: sha256} of the regular files under root."""
    out = {}
    for folder, _dirs, names in os.walk(os.fsencode(root)):
        for name in names:
            p = os.path.join(folder, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, os.fsencode(root))] = sha(f.read())
    return out


def assert_each_content_once(url: str, inbox: Path, originals: dict[bytes, str]) -> dict[bytes, bytes]:
    """assert_exactly_once for inboxes with odd names, on exact bytes: every original content is
    either still in the inbox or at the exact destination of one 'moved' row, with one predictions
    row; no move is pending; every moved row's exact destination holds its content.
    Returns {original relative path: exact destination path} of the moved ones."""
    rows = fetch(url, "SELECT sha256, dest_path, dest_path_bytes, state, source_path, source_path_bytes FROM ingest_files")
    assert not [r for r in rows if r[3] == "pending"], "moves still pending after a clean run"
    moved = {}
    for digest, dest, dest_raw, state, source, source_raw in rows:
        if state != "moved":
            continue
        exact_dest = bytes(dest_raw) if dest_raw is not None else os.fsencode(dest)
        with open(exact_dest, "rb") as f:
            assert sha(f.read()) == digest, f"{exact_dest!r} does not hold the content its row says"
        exact_source = bytes(source_raw) if source_raw is not None else os.fsencode(source)
        assert exact_source not in moved, f"{exact_source!r} moved twice"
        moved[exact_source] = exact_dest
    left = exact_snapshot(inbox)
    per_sha = Counter(r[0] for r in fetch(url, "SELECT sha256 FROM predictions WHERE model_name = %(m)s", {"m": MODEL}))
    where = {}
    for rel, digest in originals.items():
        source = os.path.join(os.fsencode(inbox), rel)
        places = (rel in left) + (source in moved)
        assert places == 1, f"{rel!r} is {'nowhere' if not places else 'in the inbox and moved'}"
        if source in moved:
            assert per_sha[digest] == 1, f"{rel!r}: {per_sha[digest]} rows for its content"
            where[rel] = moved[source]
    return where


# -- odd names, three runs in a row ------------------------------------------------------------

@pytest.mark.integration
def test_odd_names_cost_nothing_to_the_good_photos(torchserve, database_url, tmp_path, unseen_images):
    """A Latin-1 name (as SMB shares write it) and a 250-byte name whose destination is taken, beside
    30 good photos: every photo is recorded once, the odd ones found again by their exact bytes."""
    inbox = tmp_path / "inbox"
    (inbox / "batch-a").mkdir(parents=True)
    made = photos(unseen_images, 32)
    for i, data in enumerate(made[:30]):
        (inbox / "batch-a" / f"{i:02}.jpg").write_bytes(data)
    latin1 = make_file(inbox, b"caf\xe9 photo.jpg", made[30])
    long_name = "x" * 246 + ".jpg"  # 250 bytes: with a ~sha8 tag it would pass NAME_MAX
    (inbox / long_name).write_bytes(made[31])
    taken = tmp_path / "processed" / today() / long_name  # someone else's file at its destination
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"not ours")
    originals = exact_snapshot(inbox)
    assert len(originals) == 32
    env = ingest_env(torchserve.inference_url, database_url)

    for n in range(3):
        r = cli(inbox, env)
        assert r.returncode == EXIT_DONE, r.stderr[-3000:]
        summary = summary_of(r.stdout)
        assert summary["status"] == "succeeded" and summary["failed"] == 0
        assert summary["processed"] == (32 if n == 0 else 0)
        where = assert_each_content_once(database_url, inbox, originals)
        assert set(where) == set(originals), "every photo leaves the inbox in the first run"

    processed = os.fsencode(tmp_path / "processed" / today())
    # The Latin-1 name: recorded and moved under its exact bytes; its text is a display form.
    assert where[b"caf\xe9 photo.jpg"] == os.path.join(processed, b"caf\xe9 photo.jpg")
    (text, raw, filename, status), = fetch(database_url, "SELECT original_path, original_path_bytes, filename, status "
                                                         "FROM predictions WHERE original_path_bytes IS NOT NULL")
    assert (text, bytes(raw), filename, status) == ("caf\\xe9 photo.jpg", b"caf\xe9 photo.jpg", "caf\\xe9 photo.jpg", "ok")
    (source, source_raw), = fetch(database_url, "SELECT source_path, source_path_bytes FROM ingest_files WHERE source_path_bytes IS NOT NULL")
    assert bytes(source_raw) == latin1 and source == stored_path(latin1)[0]
    # The long name: a free, legal name beside the file that was there, which is untouched.
    dest = where[long_name.encode()]
    assert os.path.basename(dest) == (long_name[:-4][: 255 - len("~12345678.jpg")] + f"~{sha(made[31])[:8]}.jpg").encode()
    assert taken.read_bytes() == b"not ours"
    statuses = [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs ORDER BY id")]
    assert statuses == ["succeeded"] * 3


def test_a_long_destination_name_moves_across_filesystems(tmp_path, monkeypatch):
    """The cross-filesystem copy of a 255-byte destination is written under a short partial name."""
    src = tmp_path / "inbox" / ("y" * 250 + ".jpg")
    src.parent.mkdir()
    src.write_bytes(b"photo")
    root = tmp_path / "processed"
    (root / "2026-01-01").mkdir(parents=True)
    (root / "2026-01-01" / src.name).write_bytes(b"other")
    dest = files.choose_dest(root, "2026-01-01", src.name, sha(b"photo"), set())
    assert len(os.fsencode(dest.name)) == 255 and dest.name.endswith(f"~{sha(b'photo')[:8]}.jpg")
    real_link = os.link

    def link(a, b, **kw):
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")  # as between two mounts
        return real_link(a, b, **kw)
    monkeypatch.setattr(os, "link", link)
    files.move(src, dest)
    assert dest.read_bytes() == b"photo" and not src.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, src.name])  # no partial left


@pytest.mark.parametrize("path", ["link", "copy"])
@pytest.mark.parametrize("change", ["replaced", "written to"])
def test_a_file_that_is_not_the_one_read_is_not_moved(path, change, tmp_path, monkeypatch):
    """Right before a move the inbox file's identity (inode, size, mtime) is checked against the one
    read: a file replaced under its name, or written to since, stays where it is, and nothing of it
    is left at the destination -- on the link path and on the copy path (EXDEV, as between mounts)."""
    src = tmp_path / "inbox" / "a.jpg"
    src.parent.mkdir()
    src.write_bytes(b"what was read")
    read_as = files.identity_of(os.lstat(src))
    dest = tmp_path / "processed" / "2026-01-01" / "a.jpg"
    if change == "replaced":  # a new file renamed over the name (a new inode)
        (src.parent / ".upload").write_bytes(b"what came after")
        os.replace(src.parent / ".upload", src)
    else:  # the same inode, appended to
        with open(src, "ab") as f:
            f.write(b" and more")
        os.utime(src, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    if path == "copy":
        real_link = os.link

        def link(a, b, **kw):
            if Path(a) == src:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_link(a, b, **kw)
        monkeypatch.setattr(os, "link", link)
    (error,) = files.move_many([(src, dest)], expect=[read_as])
    assert isinstance(error, files.Replaced), error
    assert src.exists() and not dest.exists() and not list(dest.parent.iterdir())  # no partial copy either
    unchanged = tmp_path / "inbox" / "b.jpg"
    unchanged.write_bytes(b"still as read")
    (error,) = files.move_many([(unchanged, dest)], expect=[files.identity_of(os.lstat(unchanged))])
    assert error is None and dest.read_bytes() == b"still as read" and not unchanged.exists()


# -- answers PostgreSQL cannot hold ----------------------------------------------------------

GOOD = {"label": "Tshirts", "confidence": 0.9, "topk": [{"label": "Tshirts", "p": 0.9}], "needs_review": False,
        "model": "refund_classifier", "version": "1"}


@pytest.mark.parametrize("body, problem", [
    (GOOD, None),
    ({**GOOD, "confidence": None}, None),
    ({**GOOD, "confidence": math.nan}, "not a number in [0, 1]"),
    ({**GOOD, "confidence": math.inf}, "not a number in [0, 1]"),
    ({**GOOD, "confidence": 1.5}, "not a number in [0, 1]"),
    ({**GOOD, "confidence": "0.9"}, "not a number"),
    ({**GOOD, "topk": [{"label": "Tshirts", "p": math.nan}]}, "cannot be stored as JSON"),
    ({**GOOD, "topk": [{"label": "a\x00b"}]}, "NUL"),
    ({k: v for k, v in GOOD.items() if k != "label"}, "label is missing"),
    ({**GOOD, "label": ""}, "label is missing"),
    ({**GOOD, "needs_review": "no"}, "not a boolean"),
])
def test_answer_problem(body, problem):
    found = answer_problem(True, body)
    assert (found is None) if problem is None else (problem in found), found


def _outcome(tmp_path: Path, name: str | bytes, data: bytes, body: dict, ok: bool = True) -> Outcome:
    name = os.fsdecode(name)
    path = tmp_path / "inbox" / name
    entry = files.Entry(path, name, len(data), 0, 0)
    return Outcome(Item(entry, None, sha(data), len(data), datetime.now(timezone.utc)), body=dict(body), ok=ok)


def test_a_nan_answer_becomes_a_bad_answer_rejection(tmp_path):
    o = _outcome(tmp_path, "a.jpg", b"a", {**GOOD, "confidence": math.nan})
    assert "not a number" in vet(o)
    row = prediction_row(o, Settings(inbox=tmp_path / "inbox", database_url="x"), run_id=1)
    assert (row.status, row.error_code, row.label, row.confidence, row.model_version) == ("rejected", "bad_answer", None, None, "1")
    assert row.error.startswith("bad_answer: TorchServe's answer cannot be recorded: the confidence nan")


@pytest.mark.integration
def test_journal_records_a_batch_with_bad_answers_and_an_odd_name(tmp_path, database_url, monkeypatch):
    """Against the real PostgreSQL: the NaN answers become bad_answer rows, the rest of the batch is
    recorded as it is; and with the answer check off, the batch falls back to one file at a time and
    the file PostgreSQL refuses is left alone out."""
    s = Settings(inbox=tmp_path / "inbox", database_url=database_url)
    journal = Journal(Store(database_url), s)
    journal.start_run()
    batch = [_outcome(tmp_path, "good.jpg", b"good", GOOD),
             _outcome(tmp_path, "nan.jpg", b"nan", {**GOOD, "confidence": math.nan}),
             _outcome(tmp_path, "nan-topk.jpg", b"nan-topk", {**GOOD, "topk": [{"p": math.nan}]}),
             _outcome(tmp_path, b"caf\xe9.jpg", b"latin-1", GOOD),
             _outcome(tmp_path, "broken.jpg", b"broken", {"code": "corrupt", "error": "the image data is corrupt: \x00"}, ok=False)]
    written = journal.record(batch)
    assert not written.left and len(written.plan) == 5
    rows = {r[0]: r[1:] for r in fetch(database_url, "SELECT original_path, status, error_code, confidence, original_path_bytes FROM predictions")}
    assert {k: v[:2] for k, v in rows.items()} == {
        "good.jpg": ("ok", None), "nan.jpg": ("rejected", "bad_answer"), "nan-topk.jpg": ("rejected", "bad_answer"),
        "caf\\xe9.jpg": ("ok", None), "broken.jpg": ("rejected", "corrupt")}
    assert bytes(rows["caf\\xe9.jpg"][3]) == b"caf\xe9.jpg"
    assert {p.outcome.item.entry.relative: p.destination for p in written.plan}["nan.jpg"] == "quarantine"

    # Something the checks did not foresee: the batch insert fails, each file is tried alone.
    monkeypatch.setattr(journal_mod, "vet", lambda o: None)
    more = [_outcome(tmp_path, "good2.jpg", b"good2", GOOD),
            _outcome(tmp_path, "nan2.jpg", b"nan2", {**GOOD, "confidence": math.nan}),
            _outcome(tmp_path, "good3.jpg", b"good3", GOOD)]
    written = journal.record(more)
    assert [o.item.entry.relative for o, _reason in written.left] == ["nan2.jpg"]
    assert [p.outcome.item.entry.relative for p in written.plan] == ["good2.jpg", "good3.jpg"]
    names = {r[0] for r in fetch(database_url, "SELECT original_path FROM predictions")}
    assert {"good2.jpg", "good3.jpg"} <= names and "nan2.jpg" not in names
    planned = {r[0] for r in fetch(database_url, "SELECT relative_path FROM ingest_files")}
    assert "nan2.jpg" not in planned and "good3.jpg" in planned


@pytest.mark.integration
def test_journal_keeps_no_state_per_file_yet_tells_two_names_of_one_display_form_apart(tmp_path, database_url):
    """A run of many plain names leaves the journal holding nothing per file (its memory stays flat as
    the inbox grows); a Latin-1 name and a UTF-8 name that spells out its display form still cannot
    both be recorded under that one text in a run: the second waits for the next run."""
    s = Settings(inbox=tmp_path / "inbox", database_url=database_url)
    journal = Journal(Store(database_url), s)
    journal.start_run()
    for b in range(6):
        written = journal.record([_outcome(tmp_path, f"{b}-{i:03}.jpg", f"{b}-{i}".encode(), GOOD) for i in range(50)])
        assert not written.left and len(written.plan) == 50
    assert journal._sources == {}
    latin1 = _outcome(tmp_path, b"caf\xe9.jpg", b"latin-1", GOOD)
    spelled = _outcome(tmp_path, "caf\\xe9.jpg", b"spelled out", GOOD)  # the 11 characters c a f \ x e 9 . j p g
    assert stored_path(latin1.item.entry.path)[0] == stored_path(spelled.item.entry.path)[0]
    assert not journal.record([latin1]).left
    written = journal.record([spelled])
    assert [(o.item.entry.relative, "stands for another file" in why) for o, why in written.left] == [("caf\\xe9.jpg", True)]
    assert len(journal._sources) == 1


# -- recovery ---------------------------------------------------------------------------------

def _failing_unlink(monkeypatch, victim: Path):
    real = os.unlink

    def unlink(path, *a, **kw):
        if Path(os.fsdecode(path)) == victim:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.integration
def test_recovery_that_cannot_unlink_leaves_the_move_pending_and_goes_on(torchserve, database_url, tmp_path, unseen_images, monkeypatch):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=6)
    victim = sorted((inbox / "batch-a").iterdir())[2]
    s = settings_for(inbox, database_url, torchserve.inference_url)

    _failing_unlink(monkeypatch, victim)  # the link to processed/ works, the unlink of the inbox name does not
    first = Job(s).run()
    assert (first.processed, first.move_failed, first.exit_code) == (5, 1, EXIT_LEFT)

    for i, data in enumerate(photos(unseen_images, 21)[18:]):  # new photos: the run must not die in recovery before reading them
        (inbox / f"new-{i}.jpg").write_bytes(data)
        originals[f"new-{i}.jpg"] = sha(data)
    second = Job(s).run()
    assert (second.recovery_failed, second.recovered, second.processed, second.exit_code) == (1, 0, 3, EXIT_LEFT)
    assert second.skipped["pending_move"] == 1  # not taken again: no second row, no second copy
    (state, note), = fetch(database_url, "SELECT state, note FROM ingest_files WHERE source_path = %(p)s", {"p": str(victim)})
    assert state == "pending" and "Permission denied" in note
    assert [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs ORDER BY id")] == ["succeeded", "succeeded"]

    monkeypatch.undo()
    third = Job(s).run()
    assert (third.recovered, third.recovery_failed, third.exit_code) == (1, 0, EXIT_DONE)
    where = assert_exactly_once(database_url, inbox, originals)
    assert not where["inbox"]


@pytest.mark.integration
def test_recovery_never_marks_a_destination_with_other_content_moved(torchserve, database_url, tmp_path, unseen_images, monkeypatch):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=4)
    originals = snapshot(inbox)
    s = settings_for(inbox, database_url, torchserve.inference_url)

    def refuse(src, dest, expect=None):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(files, "_link", refuse)
    assert Job(s).run().move_failed == 4  # recorded, every move pending
    monkeypatch.undo()

    pending = dict(fetch(database_url, "SELECT relative_path, dest_path FROM ingest_files WHERE state = 'pending'"))
    gone, stays = sorted(pending)[:2]
    for rel in (gone, stays):  # someone else's file at the destination
        Path(pending[rel]).parent.mkdir(parents=True, exist_ok=True)
        Path(pending[rel]).write_bytes(b"someone else's file")
    aside = tmp_path / "aside.jpg"
    shutil.move(inbox / gone, aside)  # and this photo is no longer in the inbox

    summary = Job(s).run()
    states = dict(fetch(database_url, "SELECT relative_path, state FROM ingest_files WHERE run_id = 1"))
    assert states[gone] == "missing" and states[stays] == "superseded"
    assert summary.recovered == 2 and summary.duplicates == 1  # `stays` moved afresh, under a free name
    for rel in (gone, stays):
        assert Path(pending[rel]).read_bytes() == b"someone else's file"
    (dest,), = fetch(database_url, "SELECT dest_path FROM ingest_files WHERE state = 'moved' AND relative_path = %(r)s", {"r": stays})
    assert sha(Path(dest).read_bytes()) == originals[stays] and f"~{originals[stays][:8]}" in dest
    assert not (inbox / stays).exists() and not fetch(database_url, "SELECT 1 FROM ingest_files WHERE state = 'pending'")


@pytest.mark.integration
def test_a_job_recovers_only_its_own_inbox(torchserve, database_url, tmp_path, unseen_images, monkeypatch):
    a_inbox, b_inbox = tmp_path / "a" / "inbox", tmp_path / "b" / "inbox"
    a_originals = fill_inbox(a_inbox, unseen_images, n=3)
    b_inbox.mkdir(parents=True)
    (b_inbox / "b.jpg").write_bytes(photos(unseen_images, 19)[18])
    b_originals = snapshot(b_inbox)
    a = settings_for(a_inbox, database_url, torchserve.inference_url)
    b = settings_for(b_inbox, database_url, torchserve.inference_url)

    monkeypatch.setattr(files, "_link", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    assert Job(a).run().move_failed == 3
    monkeypatch.undo()
    a_pending = fetch(database_url, "SELECT id FROM ingest_files WHERE state = 'pending' ORDER BY id")

    job_b = Job(b).run()
    assert (job_b.recovered, job_b.processed, job_b.exit_code) == (0, 1, EXIT_DONE)
    assert fetch(database_url, "SELECT id FROM ingest_files WHERE state = 'pending' ORDER BY id") == a_pending
    assert snapshot(a_inbox) == a_originals  # B touched none of A's files
    assert not assert_exactly_once(database_url, b_inbox, b_originals)["inbox"]

    job_a = Job(a).run()
    assert job_a.recovered == 3
    assert not assert_exactly_once(database_url, a_inbox, a_originals)["inbox"]


# -- a run never stays 'running' ----------------------------------------------------------------

@pytest.mark.integration
def test_an_unexpected_error_ends_the_run_failed(torchserve, database_url, tmp_path, unseen_images, monkeypatch):
    inbox = tmp_path / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=2)

    def broken(*a, **kw):
        raise RuntimeError("something nobody foresaw")
    monkeypatch.setattr(inbox_mod, "candidates", broken)
    summary = Job(settings_for(inbox, database_url, torchserve.inference_url)).run()
    assert (summary.status, summary.exit_code) == ("failed", EXIT_LEFT)
    (status, error), = fetch(database_url, "SELECT status, error FROM ingest_runs")
    assert status == "failed" and "RuntimeError: something nobody foresaw" in error
    assert snapshot(inbox) == originals


# -- memory -----------------------------------------------------------------------------------

class Blob(bytearray):
    """A photo's bytes that can be watched (bytes takes no weak reference)."""


@pytest.mark.parametrize("per_request", [1, 4])
def test_photos_held_in_memory_stay_under_the_byte_bound(per_request, tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    mib = 1 << 20
    for i in range(20):
        (inbox / f"{i:02}.jpg").write_bytes(os.urandom(mib))
    (inbox / "10-large.jpg").write_bytes(os.urandom(5 * mib))  # larger than the bound: goes alone
    bound = 3 * mib + mib // 2
    s = Settings(inbox=inbox, database_url="postgresql://unused.invalid/x", torchserve_url="http://unused.invalid",
                 min_age=0, settle=0, concurrency=8, batch_size=64, max_in_flight_bytes=bound, progress=False,
                 photos_per_request=per_request)
    job = Job(s)

    live: list[weakref.ref] = []
    seen = []
    real_read = files.read

    def read(entry, *, max_bytes):
        data, digest, size = real_read(entry, max_bytes=max_bytes)
        held = sum(len(b) for b in (r() for r in live) if b is not None)
        seen.append((size, held))
        blob = Blob(data)
        live.append(weakref.ref(blob))
        return blob, digest, size
    monkeypatch.setattr(files, "read", read)

    requests = []

    class Predictor:
        def predict_many(self, photos, names, keys):
            requests.append(len(photos))
            time.sleep(0.02)
            return [Answer(True, {**GOOD}) for _ in photos]
    recorded = []
    job.predictor = Predictor()
    job.journal.known = lambda group: {}
    job.flush = lambda: (recorded.extend(job.buffer), job.buffer.clear())
    job._loop()

    assert len(recorded) == 21 and len(seen) == 21
    for size, held in seen:
        assert held == 0 if size > bound else held + size <= bound, (size, held)
    assert max(held + size for size, held in seen if size <= bound) > 2 * mib  # the bound, not a crawl, set the pace
    assert job.held == 0
    assert max(requests) == min(per_request, 3) and sum(requests) == 21  # 3 photos of 1 MiB fill the bound


# -- an upload that stalls ------------------------------------------------------------------------

@pytest.mark.integration
def test_a_stalled_upload_waits_then_is_quarantined(torchserve, database_url, tmp_path, unseen_images):
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=2)
    good = sorted((inbox / "batch-a").iterdir())[0].read_bytes()
    stalled, empty = inbox / "stalled.jpg", inbox / "empty.jpg"
    stalled.write_bytes(good[: len(good) // 2])  # the upload stopped half way, 5 minutes ago
    empty.write_bytes(b"")  # created, nothing written yet
    five_min_ago = time.time() - 300
    for p in (stalled, empty):
        os.utime(p, (five_min_ago, five_min_ago))
    s = settings_for(inbox, database_url, torchserve.inference_url, min_age=10, incomplete_grace=3600)

    first = Job(s).run()
    assert first.skipped["incomplete"] == 2 and (first.processed, first.quarantined, first.exit_code) == (0, 0, EXIT_DONE)
    assert stalled.exists() and empty.exists()
    assert not fetch(database_url, "SELECT 1 FROM predictions WHERE status = 'rejected'")

    two_hours_ago = time.time() - 7200  # past the grace: it is not coming
    for p in (stalled, empty):
        os.utime(p, (two_hours_ago, two_hours_ago))
    second = Job(s).run()
    assert (second.quarantined, second.skipped["incomplete"]) == (2, 0)
    codes = dict(fetch(database_url, "SELECT filename, error_code FROM predictions WHERE status = 'rejected'"))
    assert codes == {"stalled.jpg": "corrupt", "empty.jpg": "empty"}
    assert not stalled.exists() and not empty.exists()


def test_a_photo_that_fails_to_decode_while_younger_than_min_age_waits(torchserve, database_url, tmp_path, unseen_images):
    """It stayed unchanged through --settle, but a network share can keep a growing file's size and
    mtime that long: a decode failure within --min-age leaves it for the next run."""
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, unseen_images, n=2)
    growing = inbox / "growing.jpg"
    growing.write_bytes(b"the first bytes of an upload, not yet an image")
    s = settings_for(inbox, database_url, torchserve.inference_url, min_age=60, settle=0.2, incomplete_grace=0)
    first = Job(s).run()
    assert (first.processed, first.quarantined, first.skipped["incomplete"], first.exit_code) == (2, 0, 1, EXIT_DONE)
    assert growing.exists() and not fetch(database_url, "SELECT 1 FROM predictions WHERE status = 'rejected'")
    two_minutes_ago = time.time() - 120  # older than --min-age now: judged
    os.utime(growing, (two_minutes_ago, two_minutes_ago))
    second = Job(s).run()
    assert (second.quarantined, second.skipped["incomplete"]) == (1, 0) and not growing.exists()
    assert fetch(database_url, "SELECT error_code FROM predictions WHERE status = 'rejected'") == [("not_an_image",)]


def test_ages_in_the_inbox_are_measured_on_the_inbox_s_clock(tmp_path):
    """A file server whose clock is 5 minutes behind stamps a file written just now 5 minutes old:
    on this machine's clock it would look settled at once."""
    written_now_by_a_late_server = files.Entry(Path("x.jpg"), "x.jpg", 1, int((time.time() - 300) * 1e9), 1)
    assert files.settled(written_now_by_a_late_server, 60, inbox_mod.Clock(0.0).now())
    assert not files.settled(written_now_by_a_late_server, 60, inbox_mod.Clock(-300.0).now())
    clock = inbox_mod.Clock.probe(tmp_path)  # a local folder: the same clock, and no probe file left behind
    assert abs(clock.offset_s) < 2 and list(tmp_path.iterdir()) == []


def test_incomplete_answers_are_truncated_or_empty():
    assert inbox_mod.incomplete("empty", "the file is empty")
    assert inbox_mod.incomplete("corrupt", "the image data is truncated: image file is truncated (3 bytes not processed)")
    assert not inbox_mod.incomplete("corrupt", "the image data is corrupt: broken data stream")
    assert not inbox_mod.incomplete("not_an_image", "the bytes are not an image")
    entry = files.Entry(Path("x.jpg"), "x.jpg", 1, int((time.time() - 60) * 1e9), 1)
    assert inbox_mod.young(entry, 3600) and not inbox_mod.young(entry, 30)
