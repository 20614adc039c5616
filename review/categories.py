"""The categories a reviewer may choose for an item: the classes of the model version that
answered it, read from its archive in the model store (serving.archive, no torch), or, when that
archive is not at hand, every label that version answered among its top-k in PostgreSQL (read
again every few minutes, as new answers may name more)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from review import queue
from serving.archive import OTHER_LABEL, ArchiveError, archive_name, read_archive

SEEN_LABELS_TTL_S = 300.0


class Categories:
    def __init__(self, database_url: str, model_store: Path | None):
        self.url = database_url
        self.model_store = Path(model_store) if model_store else None
        # (model, version) -> (archive mtime, or None for labels read from PostgreSQL; names; when read)
        self._cache: dict[tuple[str, str], tuple[float | None, list[str], float]] = {}
        self._lock = threading.Lock()

    def _archive_mtime(self, model_name: str, version: str) -> tuple[Path, float] | None:
        if self.model_store is None:
            return None
        path = self.model_store / archive_name(version, model_name)
        try:
            return path, path.stat().st_mtime
        except OSError:
            return None

    def for_version(self, model_name: str, version: str) -> list[str]:
        """Sorted category names (without OTHER_LABEL, which the page offers as its own button)."""
        key = (model_name, version)
        with self._lock:
            cached = self._cache.get(key)
            found = self._archive_mtime(model_name, version)
            if found is not None:
                path, mtime = found
                if cached and cached[0] == mtime:
                    return cached[1]
                try:
                    names = sorted(c for c in read_archive(path).classes() if c != OTHER_LABEL)
                    self._cache[key] = (mtime, names, time.monotonic())
                    return names
                except (ArchiveError, KeyError, ValueError):
                    pass  # not a readable archive: the labels PostgreSQL saw
            if cached and cached[0] is None and time.monotonic() - cached[2] < SEEN_LABELS_TTL_S:
                return cached[1]
            names = sorted(c for c in queue.labels_seen(self.url, model_name, version) if c != OTHER_LABEL)
            self._cache[key] = (None, names, time.monotonic())
            return names
