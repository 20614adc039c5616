"""Test data for the review desk: prediction rows as the ingestion job records them (a run, the
prediction, the moved file) with real image files, written straight into PostgreSQL."""
from __future__ import annotations

import hashlib
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
from PIL import Image

LABELS = ["Tshirts", "Shirts", "Jeans", "Watches", "Heels", "Sandals", "other"]
T0 = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    im = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    for x in range(0, 64, 8):  # a little structure, so files differ beyond their colour
        im.putpixel((x, seed % 48), (255 - x * 3, 0, x * 4))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def sha_with_point(below: bool, seed: int) -> str:
    """A sha256-looking key whose audit point (first 32 bits / 2**32) is below 0.02 or not."""
    h = hashlib.sha256(str(seed).encode()).hexdigest()
    return ("00" + h[2:]) if below else ("f0" + h[2:])


class Rows:
    """Record predictions (and their moved photos) the way ingest does."""

    def __init__(self, url: str, photos: Path):
        self.url = url
        self.photos = photos
        self.photos.mkdir(parents=True, exist_ok=True)
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO ingest_runs (status) VALUES ('succeeded') RETURNING id")
            self.run_id = cur.fetchone()[0]
        conn.close()

    def add(self, seed: int, *, label: str = "Tshirts", confidence: float = 0.5, needs_review: bool = True,
            version: str = "1", data: bytes | None = None, received_at: datetime | None = None,
            suffix: str = ".jpg", sha256: str | None = None, moved: bool = True) -> dict:
        data = data if data is not None else image_bytes(seed)
        sha = sha256 or hashlib.sha256(data).hexdigest()
        path = self.photos / f"{seed}-v{version}{suffix}"
        path.write_bytes(data)
        others = [l for l in LABELS if l != label]
        rest = (1 - confidence) / 4
        topk = [{"label": label, "p": confidence}] + [{"label": l, "p": rest} for l in others[:4]]
        received = received_at or T0 + timedelta(minutes=seed)
        with psycopg2.connect(self.url) as conn, conn.cursor() as cur:
            cur.execute("""INSERT INTO predictions (sha256, original_path, filename, size_bytes, label, confidence, topk,
                               needs_review, model_name, model_version, run_id, received_at, status)
                           VALUES (%(sha)s, %(path)s, %(name)s, %(size)s, %(label)s, %(conf)s, %(topk)s, %(nr)s,
                                   'refund_classifier', %(version)s, %(run)s, %(received)s, 'ok') RETURNING id""",
                        {"sha": sha, "path": str(path), "name": path.name, "size": len(data), "label": label,
                         "conf": confidence, "topk": json.dumps(topk), "nr": needs_review, "version": version,
                         "run": self.run_id, "received": received})
            pid = cur.fetchone()[0]
            cur.execute("""INSERT INTO ingest_files (run_id, prediction_id, sha256, source_path, relative_path, dest_path,
                               destination, state, moved_at)
                           VALUES (%(run)s, %(pid)s, %(sha)s, %(src)s, %(rel)s, %(dest)s, 'processed', %(state)s, now())""",
                        {"run": self.run_id, "pid": pid, "sha": sha, "src": f"/inbox/{path.name}", "rel": path.name,
                         "dest": str(path), "state": "moved" if moved else "pending"})
        conn.close()
        return {"prediction_id": pid, "sha256": sha, "path": path, "label": label, "data": data}


def fetch(url: str, sql: str, params: dict | None = None) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params or {})
            return cur.fetchall()
    finally:
        conn.close()


# -- the pages, through Flask's test client ---------------------------------------------------------

def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def post_login(client, name: str, password: str, address: str = "127.0.0.1"):
    """The login form as a browser sends it (its CSRF token from the login page), from `address`."""
    token = csrf_of(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token},
                       environ_base={"REMOTE_ADDR": address})
