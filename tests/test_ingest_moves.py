"""Moves on the path production takes: processed/ and quarantine/ on filesystems of their own.

Compose binds inbox, processed and quarantine separately, and Kubernetes mounts them as three
subPaths: separate mounts, even of one filesystem, so link(2) fails with EXDEV and every move is
ingest.files' copy path (copy to a hidden partial name, fsync, link it as dest, fsync dest's folder,
unlink the source). Here each of processed/ and quarantine/ is a tmpfs of its own, mounted as root,
and the SIGKILL scenarios of test_ingest_faults run again on it; then a file that appears at the
destination, and a processed/ that is full (ENOSPC) until it is remounted bigger.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from ingest import files
from ingest_helpers import (assert_exactly_once, cli, ended, fetch, fill_inbox, ingest_env, sha, snapshot, start_cli,
                            summary_of, wait_for)

PARTIAL = ".ingest-partial"


def mount_tmpfs(where: Path, size: str = "64m") -> None:
    """Mount a tmpfs of `size` at `where`, or skip the test: it needs root (CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where} (needs root; this runs as uid {os.getuid()}): "
                    f"{(r.stderr or r.stdout).strip()}; the cross-filesystem moves are not tested here")


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


def assert_exdev(a: Path, b: Path) -> None:
    """A hard link from folder a into folder b fails with EXDEV: a move between them is a copy."""
    probe = a / f".probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    try:
        with pytest.raises(OSError) as info:
            os.link(probe, b / probe.name)
        assert info.value.errno == errno.EXDEV
    finally:
        probe.unlink()


@pytest.fixture
def split(tmp_path):
    """tmp_path/{inbox, processed, quarantine}, processed/ and quarantine/ each a tmpfs of its own
    (compose's three binds): every move out of the inbox takes the copy path."""
    stack = ExitStack()
    try:
        for name in ("processed", "quarantine"):
            mount_tmpfs(tmp_path / name)
            stack.callback(umount, tmp_path / name)
        (tmp_path / "inbox").mkdir()
        for name in ("processed", "quarantine"):
            assert_exdev(tmp_path / "inbox", tmp_path / name)
        yield tmp_path
    finally:
        stack.close()


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(PARTIAL)]


def bad_and_duplicate(inbox: Path) -> None:
    photos = sorted((inbox / "batch-a").iterdir())
    (inbox / "batch-a" / "zz copy.jpg").write_bytes(photos[0].read_bytes())  # same content, later in the walk
    (inbox / "batch-a" / "zz broken.jpg").write_bytes(photos[1].read_bytes()[:300])  # quarantined


# -- SIGKILL at every point, on the copy path --------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("crashes", [["after_read"], ["before_commit"], ["after_commit#2"], ["mid_move#2"], ["mid_link#2"],
                                     ["after_moves"], ["before_finish"], ["after_commit#2", "recovery_mid_move"]],
                         ids=lambda c: "+".join(c))
def test_sigkill_then_rerun_is_exactly_once_across_filesystems(crashes, split, torchserve, database_url, unseen_images):
    inbox = split / "inbox"
    fill_inbox(inbox, unseen_images, n=10)
    bad_and_duplicate(inbox)
    originals = snapshot(inbox)
    env = ingest_env(torchserve.inference_url, database_url)

    for point in crashes:
        killed = cli(inbox, {**env, "INGEST_TEST_HOOK": f"crash@{point}"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if crashes[-1].startswith(("mid_link", "mid_move")):  # photos under both names (copies) until the rerun
        pending = fetch(database_url, "SELECT source_path, dest_path FROM ingest_files WHERE state = 'pending'")
        assert any(Path(src).exists() and Path(dest).exists() for src, dest in pending)
    else:
        assert_exactly_once(database_url, inbox, originals, final=False)
    assert not partials(split), "a killed run left a partial copy"

    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert not where["inbox"] and where["quarantine"] == {"batch-a/zz broken.jpg"}
    if crashes[0].startswith(("after_commit", "mid_move", "mid_link", "after_moves")):
        assert summary_of(rerun.stdout)["recovered"] > 0
    assert not partials(split)
    statuses = [r[0] for r in fetch(database_url, "SELECT status FROM ingest_runs ORDER BY id")]
    assert statuses == ["interrupted"] * len(crashes) + ["succeeded"]


@pytest.mark.integration
def test_a_partial_copy_left_by_a_kill_mid_copy_is_removed_by_the_rerun(split, torchserve, database_url, unseen_images):
    """A kill inside the copy leaves `.<hash>.ingest-partial` beside the destination: the recovery that
    finishes the move removes it, and the photo lands once, whole."""
    inbox = split / "inbox"
    originals = fill_inbox(inbox, unseen_images, n=6)
    env = ingest_env(torchserve.inference_url, database_url)
    assert cli(inbox, {**env, "INGEST_TEST_HOOK": "crash@after_commit"}).returncode == -signal.SIGKILL
    pending = fetch(database_url, "SELECT dest_path FROM ingest_files WHERE state = 'pending'")
    assert pending
    for (dest,) in pending:  # as a kill halfway through the copy would leave them
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        files.partial_name(Path(dest)).write_bytes(b"half a photo")
    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["processed"] == set(originals) and not partials(split)


# -- files.move across filesystems ------------------------------------------------------------

@pytest.fixture
def other_fs(tmp_path):
    """A folder on a tmpfs of its own (tmp_path is not on it)."""
    where = tmp_path / "other"
    mount_tmpfs(where)
    yield where
    umount(where)


@pytest.fixture
def events(monkeypatch) -> list:
    """Every folder fsync and unlink from here on, in order: ("fsync", folder), ("unlink", path)."""
    seen = []
    real_fsync_dir, real_unlink = files.fsync_dir, os.unlink
    monkeypatch.setattr(files, "fsync_dir", lambda f: (seen.append(("fsync", Path(f))), real_fsync_dir(f))[1])
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (seen.append(("unlink", Path(p))), real_unlink(p, *a, **k))[1])
    return seen


def test_a_cross_filesystem_move_copies_and_syncs_the_folder_before_the_unlink(tmp_path, other_fs, events, monkeypatch):
    src = tmp_path / "a.jpg"
    src.write_bytes(b"photo" * 1000)
    dest = other_fs / "2026-11-29" / "a.jpg"
    real_copy = files._copy_then_link
    monkeypatch.setattr(files, "_copy_then_link", lambda s, d, *expect: (events.append("copy"), real_copy(s, d, *expect))[1])
    files.move(src, dest)
    assert dest.read_bytes() == b"photo" * 1000 and not src.exists() and not partials(other_fs)
    assert "copy" in events  # EXDEV: the copy path
    assert events.index(("fsync", dest.parent)) < events.index(("unlink", src)), events


def test_a_file_that_appears_at_the_destination_is_never_overwritten(tmp_path, other_fs, monkeypatch):
    src = tmp_path / "a.jpg"
    src.write_bytes(b"our photo")
    dest = other_fs / "2026-11-29" / "a.jpg"
    dest.parent.mkdir()

    dest.write_bytes(b"theirs, there before the move")
    with pytest.raises(FileExistsError):
        files.move(src, dest)
    assert dest.read_bytes() == b"theirs, there before the move" and src.read_bytes() == b"our photo"
    dest.unlink()

    real_partial_name = files.partial_name

    def appears_meanwhile(d: Path) -> Path:  # after move() looked, before the copy takes dest's name
        d.write_bytes(b"theirs, arrived during the copy")
        return real_partial_name(d)

    monkeypatch.setattr(files, "partial_name", appears_meanwhile)
    with pytest.raises(FileExistsError):
        files.move(src, dest)
    assert dest.read_bytes() == b"theirs, arrived during the copy"
    assert src.read_bytes() == b"our photo"  # still in the inbox, for the next run
    assert not partials(other_fs), "the failed copy must not take space"


def test_a_batch_of_moves_syncs_each_folder_once_and_every_destination_before_any_unlink(tmp_path, events):
    inbox, processed = tmp_path / "inbox", tmp_path / "processed"
    moves = []
    for k in range(20):
        src = inbox / ("a" if k % 2 else "b") / f"{k}.jpg"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(b"photo %d" % k)
        moves.append((src, processed / "2026-11-30" / src.parent.name / src.name))
    (processed / "2026-11-30" / "a").mkdir(parents=True)
    moves[1][1].write_bytes(b"theirs")  # one destination is taken: that photo alone fails

    errors = files.move_many(moves)

    assert isinstance(errors[1], FileExistsError) and moves[1][0].read_bytes() == b"photo 1"
    assert moves[1][1].read_bytes() == b"theirs"
    for k, (src, dest) in enumerate(moves):
        if k != 1:
            assert errors[k] is None and dest.read_bytes() == b"photo %d" % k and not src.exists()
    synced = [e[1] for e in events if e[0] == "fsync"]
    leaves = [processed / "2026-11-30" / "a", processed / "2026-11-30" / "b", inbox / "a", inbox / "b"]
    assert all(synced.count(f) == 1 for f in leaves), synced  # once per folder, not twice per photo
    first_unlink = min(i for i, e in enumerate(events) if e[0] == "unlink")
    assert all(events.index(("fsync", f)) < first_unlink for f in leaves[:2]), events


def test_recovery_syncs_the_destination_folder_before_it_unlinks_the_inbox_name(tmp_path, events):
    """A photo left under both names (a kill between link and unlink, or a destination folder whose
    fsync failed) loses its inbox name only once its destination folder is synced."""
    from ingest.journal import Journal

    src, dst = tmp_path / "inbox" / "a.jpg", tmp_path / "processed" / "2026-11-30" / "a.jpg"
    src.parent.mkdir()
    dst.parent.mkdir(parents=True)
    src.write_bytes(b"photo")
    os.link(src, dst)
    state, note = Journal._finish_move(type("J", (), {"hook": lambda self, point: None})(), files.sha256_of(src), src, dst)
    assert (state, note) == ("moved", None) and not src.exists() and dst.read_bytes() == b"photo"
    assert events.index(("fsync", dst.parent)) < events.index(("unlink", src)), events


# -- processed/ full ----------------------------------------------------------------------------

@pytest.mark.integration
def test_a_full_processed_folder_leaves_the_photos_then_a_bigger_one_takes_them_once(split, torchserve, database_url, unseen_images):
    inbox = split / "inbox"
    processed = split / "processed"
    umount(processed)
    mount_tmpfs(processed, size="256k")
    fill_inbox(inbox, unseen_images, n=8)
    bad_and_duplicate(inbox)
    originals = snapshot(inbox)
    good = {rel for rel in originals if rel != "batch-a/zz broken.jpg"}
    fd = os.open(processed / "filler", os.O_WRONLY | os.O_CREAT)  # take every page, as other files would
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    env = ingest_env(torchserve.inference_url, database_url)

    full = cli(inbox, env)
    assert full.returncode == 1, full.stderr[-3000:]  # some photos could not be moved: they stay
    summary = summary_of(full.stdout)
    assert summary["move_failed"] == len(good) and summary["processed"] == 0 and summary["quarantined"] == 1
    assert "No space left on device" in full.stderr
    assert snapshot(inbox) == {rel: originals[rel] for rel in good}  # every photo still in the inbox, whole
    assert [p for p in processed.rglob("*") if p.is_file()] == [processed / "filler"]
    assert not partials(split), "a failed copy left a partial file taking space"
    (pending,), = fetch(database_url, "SELECT count(*) FROM ingest_files WHERE state = 'pending'")
    assert pending == len(good)  # recorded, to be moved by the next run

    remount(processed, "64m")
    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert summary_of(rerun.stdout)["recovered"] == len(good)
    (processed / "filler").unlink()  # not a photo: out of assert_exactly_once's way
    where = assert_exactly_once(database_url, inbox, originals)
    assert where["processed"] == good and not where["inbox"] and not partials(split)
    (n,), = fetch(database_url, "SELECT count(*) FROM predictions")
    assert n == len(set(originals.values()))  # one row per content: the copy and its original share one


# -- a file replaced between its read and its move -----------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("layout", ["one filesystem", "separate mounts"])
def test_a_file_replaced_after_it_was_read_is_not_moved_under_its_row(layout, request, tmp_path, torchserve,
                                                                       database_url, unseen_images):
    """The job pauses with the batch's rows committed and its moves not yet made; a new photo is
    renamed over one of the names meanwhile. That file stays in the inbox (its planned move is
    superseded, nothing of it lands under the old row), and the next run records it as what it is."""
    root = request.getfixturevalue("split") if layout == "separate mounts" else tmp_path
    inbox = root / "inbox"
    fill_inbox(inbox, unseen_images, n=4)
    victim = sorted((inbox / "batch-a").iterdir())[1]
    old = victim.read_bytes()
    new = sorted((unseen_images / "images").glob("*.jpg"))[6].read_bytes()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = ingest_env(torchserve.inference_url, database_url)
    with ended(start_cli(inbox, {**env, "INGEST_TEST_HOOK": "pause@after_commit", "INGEST_TEST_HOOK_DIR": str(hooks)},
                         "--batch-size", "10")) as proc:
        wait_for(hooks / "paused-after_commit", proc)
        (victim.parent / ".upload").write_bytes(new)
        os.replace(victim.parent / ".upload", victim)  # a scanner writes the next photo under the same name
        (hooks / "resume-after_commit").touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = summary_of(out)
    assert summary["processed"] == 3 and summary["skipped"] == {"replaced": 1}, summary
    assert victim.read_bytes() == new
    assert not any(p.read_bytes() == old for p in (root / "processed").rglob("*") if p.is_file())
    (state, note), = fetch(database_url, "SELECT state, note FROM ingest_files WHERE sha256 = %(s)s", {"s": sha(old)})
    assert state == "superseded" and "changed after it was read" in note

    rerun = cli(inbox, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(inbox) == {}
    moved = fetch(database_url, "SELECT dest_path FROM ingest_files WHERE sha256 = %(s)s AND state = 'moved'", {"s": sha(new)})
    assert len(moved) == 1 and Path(moved[0][0]).read_bytes() == new
