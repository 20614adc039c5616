"""The ingestion job: every image in the inbox -> TorchServe -> one row in PostgreSQL.

Requests run concurrently (enough to fill TorchServe's server-side batches); rows are
written in batched transactions with `execute_values`; a content already recorded for
a model version is skipped by the database's unique key, so a rerun never duplicates.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import requests
from psycopg2.extras import Json, execute_values

from ingest import db

logger = logging.getLogger("ingest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class Settings:
    inbox: Path
    database_url: str
    torchserve_url: str = "http://127.0.0.1:8080"
    model: str = "refund_classifier"
    batch_size: int = 64
    concurrency: int = 8
    timeout_s: float = 60.0


@dataclass
class Result:
    path: Path
    sha256: str
    size: int
    received_at: datetime
    status_code: int
    body: dict

    def row(self, run_id: int, inbox: Path, default_model: str) -> tuple:
        ok = self.status_code == 200
        b = self.body
        model, _, version = default_model.partition("/")
        return (
            self.sha256, str(self.path.relative_to(inbox)), self.path.name, self.size,
            b.get("label") if ok else None, b.get("confidence") if ok else None,
            Json(b.get("topk")) if ok else None, b.get("needs_review") if ok else None,
            b.get("model") or model, str(b.get("version") or version or "unknown"), run_id, self.received_at,
            "ok" if ok else "rejected", None if ok else f"{b.get('code', self.status_code)}: {b.get('error', b)}",
        )


@dataclass
class Summary:
    seen: int = 0
    recorded: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.seen / self.elapsed_s if self.elapsed_s else 0.0


def iter_inbox(inbox: Path) -> Iterator[Path]:
    """Image files under `inbox`, recursively, in a stable (sorted) order, without listing it all at once."""
    for dirpath, dirnames, filenames in os.walk(inbox):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield path


def predict_file(session: requests.Session, url: str, path: Path, timeout_s: float) -> Result:
    data = path.read_bytes()
    received_at = datetime.now(timezone.utc)
    response = session.post(url, data=data, timeout=timeout_s, headers={"Content-Type": "application/octet-stream"})
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500], "code": f"http_{response.status_code}"}
    if response.status_code >= 500:
        raise RuntimeError(f"TorchServe answered {response.status_code} for {path}: {body}")
    return Result(path, hashlib.sha256(data).hexdigest(), len(data), received_at, response.status_code, body)


def bounded_map(fn, items: Iterable, *, workers: int) -> Iterator[Future]:
    """Run fn over items with at most 2*workers in flight; yields futures as they finish."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Future] = set()
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from done
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from done


def run(settings: Settings) -> Summary:
    db.migrate(settings.database_url)
    summary = Summary()
    started = time.monotonic()
    url = f"{settings.torchserve_url.rstrip('/')}/predictions/{settings.model}"
    insert_sql = db.load_query("insert_predictions")
    with db.connect(settings.database_url) as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO ingest_runs (host) VALUES (%(host)s) RETURNING id", {"host": socket.gethostname()})
            run_id = cur.fetchone()[0]
        conn.commit()

        buffer: list[Result] = []

        def flush() -> None:
            if not buffer:
                return
            with conn.cursor() as cur:
                inserted = execute_values(cur, insert_sql, [r.row(run_id, settings.inbox, settings.model) for r in buffer], fetch=True)
            conn.commit()
            summary.recorded += len(inserted)
            summary.duplicates += len(buffer) - len(inserted)
            buffer.clear()

        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=settings.concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        for future in bounded_map(lambda p: predict_file(session, url, p, settings.timeout_s),
                                  iter_inbox(settings.inbox), workers=settings.concurrency):
            summary.seen += 1
            try:
                result = future.result()
            except (OSError, requests.RequestException, RuntimeError) as exc:
                summary.failed += 1
                summary.errors.append(str(exc))
                logger.error("%s", exc)
                continue
            if result.status_code != 200:
                summary.rejected += 1
                logger.warning("%s rejected: %s", result.path, result.body)
            buffer.append(result)
            if len(buffer) >= settings.batch_size:
                flush()
        flush()
        summary.elapsed_s = time.monotonic() - started
        counts = {k: getattr(summary, k) for k in ("seen", "recorded", "duplicates", "rejected", "failed")}
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE ingest_runs SET finished_at = now(), status = %(status)s, counts = %(counts)s WHERE id = %(id)s",
                {"status": "failed" if summary.failed else "succeeded", "counts": Json(counts), "id": run_id},
            )
    return summary
