"""The inbox on disk: walking it, reading a photo safely, and moving it out without ever deleting it.

Walking streams one directory at a time (names sorted, for a stable order) and never follows a
symlink: a link is reported and left where it is, whatever it points to. Reading opens with
O_NOFOLLOW|O_NONBLOCK (a link swapped in, or a FIFO, cannot hang or escape) and checks that the
file did not change between the walk and the end of the read.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Names writers use while a file is on its way; never images.
PARTIAL_SUFFIXES = {".part", ".partial", ".tmp", ".crdownload", ".download"}


Identity = tuple[int, int, int]  # (inode, size, mtime_ns): the same file, unchanged


def identity_of(st: os.stat_result) -> Identity:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Entry:
    """A regular file found in the inbox, with the stat seen by the walk."""

    path: Path
    relative: str
    size: int
    mtime_ns: int
    inode: int

    @property
    def identity(self) -> Identity:
        return self.inode, self.size, self.mtime_ns


@dataclass
class Skip:
    """Something in the inbox the job leaves where it is, and why."""

    path: Path
    relative: str
    reason: str  # unsupported | symlink | not_a_file | hidden | unreadable | not_settled | changed
    mtime: float | None = None  # its modification time (lstat), where it could be read: how long it has waited


def walk(inbox: Path, *, exclude: tuple[Path, ...] = ()) -> Iterator[Entry | Skip]:
    """Everything under `inbox`, depth first, names in sorted order; holds one directory's sorted
    names at a time, as plain strings (about 70 bytes a file): each entry is lstat'ed when its turn
    comes, so no DirEntry or stat result of the whole folder is kept (a flat inbox of 100,000
    files would hold about a kilobyte per file that way)."""
    stack = [inbox]
    excluded = {p.resolve() for p in exclude}
    while stack:
        folder = stack.pop()
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            yield Skip(folder, _rel(folder, inbox), f"unreadable ({exc.strerror})", _mtime(folder))
            continue
        subfolders = []
        base = os.fspath(folder)
        for name in names:
            # Not folder / name: pathlib interns that very string, and the names list would keep
            # every one of them in the interpreter's intern table (which never shrinks) until the
            # folder is done; from the joined text pathlib interns a copy that dies with the Path.
            path = Path(os.path.join(base, name))
            rel = _rel(path, inbox)
            try:
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    if path.resolve() not in excluded and not name.startswith("."):
                        subfolders.append(path)
                    continue
            except OSError as exc:
                yield Skip(path, rel, f"unreadable ({exc.strerror})", _mtime(path))
                continue
            if stat.S_ISLNK(st.st_mode):
                yield Skip(path, rel, "symlink", st.st_mtime)
            elif not stat.S_ISREG(st.st_mode):
                yield Skip(path, rel, "not_a_file", st.st_mtime)
            elif name.startswith("."):
                yield Skip(path, rel, "hidden", st.st_mtime)
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                yield Skip(path, rel, "unsupported", st.st_mtime)
            else:
                yield Entry(path, rel, st.st_size, st.st_mtime_ns, st.st_ino)
        del names  # before descending
        stack.extend(reversed(subfolders))  # pop() takes them in sorted order


def _mtime(path: Path) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def _rel(path: Path, inbox: Path) -> str:
    return path.relative_to(inbox).as_posix() if path != inbox else "."


class NotReady(Exception):
    """The file is not (yet) something to classify; `reason` says why. It stays in the inbox."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def settled(entry: Entry, min_age_s: float, now: float | None = None) -> bool:
    """Not modified for min_age_s: a writer still appending to it would have touched it."""
    now = time.time() if now is None else now
    return now - entry.mtime_ns / 1e9 >= min_age_s


def read(entry: Entry, *, max_bytes: int) -> tuple[bytes | None, str, int]:
    """(data, sha256, size) of a settled regular file; data is None when it is over max_bytes
    (then only hashed, in chunks). Raises NotReady when it changed, vanished or cannot be read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(entry.path, flags)
    except FileNotFoundError as exc:
        raise NotReady("vanished") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotReady("symlink") from exc
        raise NotReady(f"unreadable ({exc.strerror})") from exc
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise NotReady("not_a_file")
        if identity_of(before) != entry.identity:
            raise NotReady("changed")
        digest = hashlib.sha256()
        chunks = [] if before.st_size <= max_bytes else None
        size = 0
        try:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                digest.update(chunk)
                if chunks is not None:
                    chunks.append(chunk)
        except OSError as exc:
            raise NotReady(f"unreadable ({exc.strerror})") from exc
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
            raise NotReady("changed")
    finally:
        os.close(fd)
    return (b"".join(chunks) if chunks is not None else None), digest.hexdigest(), size


def sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def choose_dest(root: Path, day: str, relative: str, sha256: str, taken: set[Path]) -> Path:
    """root/day/relative, or with ~<sha8>[-n] before the suffix if that name is already used."""
    dest = root / day / relative
    if not dest.exists() and dest not in taken:
        return dest
    stem, suffix = dest.stem, dest.suffix
    for n in range(1, 10_000):
        tag = f"~{sha256[:8]}" + (f"-{n}" if n > 1 else "")
        candidate = dest.with_name(_fit(stem, f"{tag}{suffix}"))
        if not candidate.exists() and candidate not in taken:
            return candidate
    raise FileExistsError(f"no free name for {dest}")


# A file name's limit in bytes on Linux filesystems (NAME_MAX).
NAME_MAX = 255


def _fit(stem: str, tail: str) -> str:
    """stem + tail, the stem shortened (whole characters) so that the name fits NAME_MAX bytes."""
    room = NAME_MAX - len(os.fsencode(tail))
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem + tail


def partial_name(dest: Path) -> Path:
    """Where a cross-filesystem copy is written before it takes dest's name: hidden, ours alone
    (nothing else ends in .ingest-partial), and short whatever dest's length (a 250-byte name stays legal)."""
    tag = hashlib.sha256(os.fsencode(dest.name)).hexdigest()[:16]
    return dest.with_name(f".{tag}.ingest-partial")


def move(src: Path, dest: Path, *, linked=None) -> None:
    """Move src to dest without overwriting anything and without a moment where neither holds
    the photo, durably: move_many for one photo, raising its OSError."""
    (error,) = move_many([(src, dest)], linked=linked)
    if error is not None:
        raise error


class Replaced(OSError):
    """The file under the inbox name is not the one that was read (another inode, size or mtime):
    it is not moved, so that no row stands for content it was not made from."""


def check_identity(src: Path, expect: Identity | None, st: os.stat_result | None = None) -> None:
    """Raise Replaced unless src (or `st`, its stat) is still the file read as `expect`."""
    if expect is None:
        return
    got = identity_of(st if st is not None else os.lstat(src))
    if got != expect:
        raise Replaced(errno.ESTALE, f"replaced or changed since it was read (inode, size, mtime {got} != {expect})", str(src))


def move_many(moves: list[tuple[Path, Path]], *, linked=None, moved_one=None,
              expect: list[Identity | None] | None = None) -> list[OSError | None]:
    """Move each src to its dest without overwriting anything and without a moment where neither
    holds the photo, durably; in its place, None for a moved photo or the OSError that stopped it
    (one photo's failure costs that photo alone).

    Each photo is hard-linked as dest when on one filesystem; else (inbox, processed/ and
    quarantine/ on separate mounts, as in compose and Kubernetes: EXDEV) copied to a hidden partial
    name, fsynced, and hard-linked as dest. dest never replaces a file that is there. Then
    (unlink_sources) every destination folder is fsynced, once for the batch, before any source is unlinked, so a power cut
    after an unlink cannot lose both names; then the sources' folders are fsynced, once each. A crash
    in between leaves photos under both names, which recovery resolves. Two fsyncs per folder for a
    batch, instead of two per photo: fsyncs were most of the job's time between answers.

    expect: each photo's identity as it was read (Identity); a photo whose inbox file is no longer
    that file -- replaced under its name, or written to since -- fails with Replaced and stays where
    it is (checked before the link or copy, and on what was linked or copied)."""
    errors: list[OSError | None] = [None] * len(moves)
    for i, (src, dest) in enumerate(moves):
        try:
            _link(src, dest, expect[i] if expect is not None else None)
        except OSError as exc:
            errors[i] = exc
    return unlink_sources(moves, errors, linked=linked, moved_one=moved_one)


def unlink_sources(moves: list[tuple[Path, Path]], errors: list[OSError | None] | None = None, *,
                   linked=None, moved_one=None) -> list[OSError | None]:
    """The second half of a move, for photos whose dest already holds them (move_many's links, or a
    move an earlier run left under both names): every destination folder fsynced, once, before any
    source is unlinked, then the sources' folders fsynced, once each. `errors`: photos already
    failed (None each by default), left alone; returns them with this half's failures added."""
    errors = list(errors) if errors is not None else [None] * len(moves)
    for folder in dict.fromkeys(dest.parent for (_, dest), e in zip(moves, errors) if e is None):
        try:
            fsync_dir(folder)
        except OSError as exc:  # its photos stay under both names until recovery
            errors = [exc if e is None and dest.parent == folder else e for (_, dest), e in zip(moves, errors)]
    if linked and any(e is None for e in errors):
        linked()  # tests: a kill here leaves the linked photos under both names
    unlinked = 0
    for i, (src, _) in enumerate(moves):
        if errors[i] is not None:
            continue
        try:
            os.unlink(src)  # the photo is at dest now: this is the second half of a move, not a delete
        except OSError as exc:
            errors[i] = exc
            continue
        unlinked += 1
        if unlinked == 1 and moved_one:
            moved_one()  # tests: a kill here leaves one photo moved, the rest under both names
    for folder in dict.fromkeys(src.parent for (src, _), e in zip(moves, errors) if e is None):
        try:
            fsync_dir(folder)
        except OSError:
            pass  # the moves are done; at worst a power cut brings inbox names back, which recovery resolves
    return errors


def _link(src: Path, dest: Path, expect: Identity | None = None) -> None:
    """dest as a second name of src (or, across filesystems, a durable copy of it); never over a file;
    with `expect`, only while src is still the file that was read (else Replaced, nothing left at dest)."""
    _makedirs(dest.parent)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    check_identity(src, expect)
    try:
        os.link(src, dest, follow_symlinks=False)  # fails instead of overwriting
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _copy_then_link(src, dest, expect)
        return
    try:  # what was linked: the file src named at that instant (a replacement between the check and the link)
        check_identity(dest, expect)
    except Replaced:
        os.unlink(dest)  # our own new name of the wrong file; src keeps it
        raise


def _copy_then_link(src: Path, dest: Path, expect: Identity | None = None) -> None:
    tmp = partial_name(dest)
    tmp.unlink(missing_ok=True)  # our own unfinished copy from a killed run, never a photo of record
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            check_identity(src, expect, os.fstat(fin.fileno()))  # the file opened is the one read
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            check_identity(src, expect, os.fstat(fin.fileno()))  # and nobody wrote to it during the copy
            fout.flush()
            os.fsync(fout.fileno())
        os.link(tmp, dest)  # EEXIST rather than overwrite a file that appeared at dest meanwhile
    finally:
        tmp.unlink(missing_ok=True)  # after a failure (ENOSPC, EEXIST, Replaced) it must not take space or a name


def _makedirs(folder: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry is new, so a new day's folder survives a power cut."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue
        fsync_dir(new.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
