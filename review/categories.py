"""The categories a reviewer may choose for an item: the classes of the model version that
answered it, read from its archive in the model store (serving.archive, no torch), or, when that
archive is not at hand, every label that version answered among its top-k in PostgreSQL."""
from __future__ import annotations

import threading
from pathlib import Path

from review import queue
from serving.archive import OTHER_LABEL, ArchiveError, archive_name, read_archive


class Categories:
    def __init__(self, database_url: str, model_store: Path | None):
        self.url = database_url
        self.model_store = Path(model_store) if model_store else None
        self._cache: dict[tuple[str, str], tuple[float | None, list[str]]] = {}
        self._lock = threading.Lock()

    def _from_archive(self, model_name: str, version: str) -> tuple[float, list[str]] | None:
        if self.model_store is None:
            return None
        path = self.model_store / archive_name(version, model_name)
        try:
            mtime = path.stat().st_mtime
            cached = self._cache.get((model_name, version))
            if cached and cached[0] == mtime:
                return cached
            return mtime, read_archive(path).classes()
        except (OSError, ArchiveError, KeyError, ValueError):
            return None

    def for_version(self, model_name: str, version: str) -> list[str]:
        """Sorted category names (without OTHER_LABEL, which the page offers as its own button)."""
        with self._lock:
            found = self._from_archive(model_name, version)
            if found is None:
                cached = self._cache.get((model_name, version))
                if cached and cached[0] is None:
                    return cached[1]
                found = (None, queue.labels_seen(self.url, model_name, version))
            names = sorted(c for c in found[1] if c != OTHER_LABEL)
            self._cache[(model_name, version)] = (found[0], names)
            return names
