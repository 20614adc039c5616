"""The inbox walk (ingest.files.walk): what it yields, in which order, and that its memory stays small per file."""
from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from ingest import files


def test_walk_order_and_skips(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "b").mkdir(parents=True)
    (inbox / "a" / "deep").mkdir(parents=True)
    (inbox / ".hidden-folder").mkdir()
    (inbox / "processed").mkdir()
    for rel in ["z.jpg", "c.PNG", "a/2.jpg", "a/1.jpg", "a/deep/x.webp", "b/note.txt", ".h.jpg",
                ".hidden-folder/in.jpg", "processed/done.jpg"]:
        (inbox / rel).write_bytes(b"x")
    os.symlink(inbox / "z.jpg", inbox / "link.jpg")
    os.mkfifo(inbox / "pipe.jpg")
    found = [(f.relative, getattr(f, "reason", None)) for f in files.walk(inbox, exclude=(inbox / "processed",))]
    # this folder's files first (sorted), then its subfolders, depth first, each sorted
    assert found == [(".h.jpg", "hidden"), ("c.PNG", None), ("link.jpg", "symlink"), ("pipe.jpg", "not_a_file"),
                     ("z.jpg", None), ("a/1.jpg", None), ("a/2.jpg", None), ("a/deep/x.webp", None),
                     ("b/note.txt", "unsupported")]
    entry = next(f for f in files.walk(inbox) if f.relative == "z.jpg")
    st = os.lstat(inbox / "z.jpg")
    assert (entry.size, entry.mtime_ns, entry.inode) == (1, st.st_mtime_ns, st.st_ino)


def test_walk_holds_little_per_file_of_a_flat_inbox(tmp_path):
    """A flat inbox of N files: the walk holds the sorted names, not an object (and a stat) per file."""
    n = 5000
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(n):
        (inbox / f"photo-{i:06d}.jpg").write_bytes(b"")
    tracemalloc.start()
    try:
        count = sum(isinstance(f, files.Entry) for f in files.walk(inbox))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak / n < 250, f"{peak / n:.0f} bytes per file"  # names alone: about 80
