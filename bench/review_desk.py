"""The review desk's speed, as a person meets it (not part of `make bench`).

Starts a private PostgreSQL (free port, temporary folder) and `python -m review serve`, queues
`--items` needs-review photos (a catalogue's, `--data-dir`, else 480x360 JPEGs drawn here) and measures:

- time to first byte of the queue page (/queue) and of the review page (/review, which claims an
  item), logged in: median, p90 and max of `--requests` requests each;
- decisions per minute by keyboard: Debian's Chromium (Playwright) presses `1` on `--decide` items in
  a row, each decision a form POST, a redirect and the next page with its photo loaded;
- a reviewer deciding at a person's pace (`--paced` decisions, one every `--pace` seconds: the POST,
  the redirect and the next page), first alone, then while `--idle` connections are held open
  (half silent, half with a request begun and never finished) against the desk's one process:
  each decision's time, and how many idle connections the server still holds at the end;
- optionally a screenshot of the review page (`--screenshot FILE`).

    python -m bench.review_desk [--items 1000] [--requests 20] [--decide 50] [--idle 200] [--paced 20] [--pace 1]
                                [--screenshot FILE] [--out FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import requests
from PIL import Image, ImageDraw
from psycopg2.extras import execute_values

from ingest import db
from review import queue
from serving.paths import REPO_ROOT
from serving.postgres import Cluster
from serving.torchserve import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LABELS = ["Tshirts", "Shirts", "Jeans", "Watches", "Heels", "Sandals", "Casual Shoes", "Handbags", "Kurtas", "Tops"]


def photo(rng: random.Random) -> bytes:
    im = Image.new("RGB", (480, 360), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.randrange(480), rng.randrange(360)
        d.ellipse([x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 160)], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def catalogue_photos(data_dir: Path, n: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, articleType) of the first n photos of a Kaggle-layout catalogue."""
    from training.catalogue import list_items

    items, _ = list_items(data_dir)
    items = sorted(items, key=lambda i: int(i.id))[:n]
    return [(i.path.read_bytes(), i.label) for i in items]


def fill(url: str, folder: Path, n: int, data_dir: Path | None = None) -> None:
    """n needs-review predictions with their moved photos, as the ingestion job records them:
    drawn photos, or those of a catalogue (its label first among the model's top-5)."""
    import hashlib

    rng = random.Random(0)
    real = catalogue_photos(data_dir, n) if data_dir else []
    # The answers a refund model could give: its categories, or "other" for a product outside them.
    categories = [l.strip() for l in (REPO_ROOT / "training" / "categories.txt").read_text().splitlines()
                  if l.strip() and not l.startswith("#")]
    labels = sorted(set(categories) | set(LABELS))
    t0 = datetime.now(timezone.utc) - timedelta(days=3)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO ingest_runs (status) VALUES ('succeeded') RETURNING id")
        run_id = cur.fetchone()[0]
        preds, files, seen = [], [], set()
        for i in range(n):
            data, true_label = real[i % len(real)] if real else (photo(rng), None)
            if hashlib.sha256(data).hexdigest() in seen:  # a catalogue repeats photos: another content, the same look
                data = data + i.to_bytes(4, "big")
            path = folder / f"{i:05d}.jpg"
            path.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            seen.add(sha)
            if true_label is not None and true_label not in labels:
                true_label = "other"
            ranked = rng.sample([l for l in labels if l != true_label], 5)
            if true_label is not None:
                ranked = [true_label] + ranked[:4]
            ps = sorted((rng.random() for _ in range(5)), reverse=True)
            total = sum(ps) * 1.2
            topk = [{"label": label, "p": round(p / total, 6)} for label, p in zip(ranked, ps)]
            preds.append((sha, str(path), path.name, len(data), ranked[0], topk[0]["p"], json.dumps(topk), True,
                          "refund_classifier", "1", run_id, t0 + timedelta(seconds=i * 200), "ok"))
        ids = execute_values(cur, """INSERT INTO predictions (sha256, original_path, filename, size_bytes, label, confidence,
                                         topk, needs_review, model_name, model_version, run_id, received_at, status)
                                     VALUES %s RETURNING id, sha256, original_path""", preds, fetch=True)
        for pid, sha, path in ids:
            files.append((run_id, pid, sha, "/inbox/" + Path(path).name, Path(path).name, path, "processed", "moved"))
        execute_values(cur, """INSERT INTO ingest_files (run_id, prediction_id, sha256, source_path, relative_path,
                                   dest_path, destination, state) VALUES %s""", files)
    conn.close()


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1000, 2), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 2),
            "max_ms": round(xs[-1] * 1000, 2), "n": len(xs)}


def ttfb(session: requests.Session, url: str, n: int) -> list[float]:
    """Seconds until the response's headers arrived (requests' `elapsed`), body read after."""
    out = []
    for _ in range(n):
        r = session.get(url, stream=True, allow_redirects=False)
        out.append(r.elapsed.total_seconds())
        r.content  # noqa: B018 - read the body, so the next request starts clean
        assert r.status_code == 200, (url, r.status_code)
    return out


def csrf_token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def logged_in(base: str, name: str, password: str) -> requests.Session:
    s = requests.Session()
    assert s.post(base + "/login", data={"name": name, "password": password, "csrf_token": csrf_token(s.get(base + "/login").text)},
                  allow_redirects=False).status_code == 302
    return s


def decide_paced(session: requests.Session, base: str, n: int, pace_s: float) -> list[float]:
    """n decisions, one every pace_s seconds: each timed from its POST to the next review page read."""
    times = []
    page = session.get(base + "/review").text
    for _ in range(n):
        item = re.search(r'data-item="(\d+)"', page).group(1)
        form = {"decision": ":other", "replaces": "", "csrf_token": csrf_token(page)}
        t0 = time.perf_counter()
        r = session.post(f"{base}/items/{item}/decide", data=form)
        page = r.text
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and 'data-item="' in page, (r.status_code, page[:300])
        time.sleep(max(0.0, pace_s - times[-1]))
    return times


def hold_idle(port: int, n: int) -> list[socket.socket]:
    """n connections left open: half say nothing, half begin a request and never finish it."""
    held = []
    for k in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if k % 2:
            s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        held.append(s)
    return held


def still_open(held: list[socket.socket]) -> int:
    """How many of the held connections the server has not closed."""
    n = 0
    for s in held:
        s.setblocking(False)
        try:
            n += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            n += 1  # nothing to read, not closed
        except OSError:
            pass
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.review_desk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1000, help="queued needs-review photos")
    p.add_argument("--requests", type=int, default=20, help="requests per page for time to first byte")
    p.add_argument("--decide", type=int, default=50, help="items decided by keyboard in the browser")
    p.add_argument("--idle", type=int, default=200, help="idle connections held open during the paced run")
    p.add_argument("--paced", type=int, default=20, help="decisions at a person's pace, alone and beside the idle connections")
    p.add_argument("--pace", type=float, default=1.0, help="seconds between the paced decisions")
    p.add_argument("--screenshot", type=Path, default=None, help="save a screenshot of the review page here")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("RC_BENCH_DATA") or None,
                   help="Kaggle-layout catalogue whose photos to queue (default: $RC_BENCH_DATA, else drawn photos)")
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="rc-bench-review-"))
    os.chmod(root, 0o755)
    cluster = Cluster(root=root / "pg", port=free_port())
    server = None
    try:
        url = cluster.start()
        db.migrate(url)
        photos = root / "processed"
        photos.mkdir()
        fill(url, photos, args.items, args.data_dir)
        queue.add_reviewer(url, "bench", "bench-password")
        port = free_port()
        env = {**os.environ, "DATABASE_URL": url, "RC_STATE_DIR": str(root / "state"), "PYTHONPATH": str(REPO_ROOT)}
        env.pop("REVIEW_SECRET_KEY", None)
        server = subprocess.Popen([sys.executable, "-m", "review", "serve", "--port", str(port)], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(base + "/login", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        s = logged_in(base, "bench", "bench-password")
        ttfb(s, base + "/queue", 3)  # warm up
        results = {"items_queued": args.items,
                   "queue_ttfb": percentiles(ttfb(s, base + "/queue", args.requests)),
                   "review_ttfb": percentiles(ttfb(s, base + "/review", args.requests))}

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(base + "/login")
            page.fill("input[name=name]", "bench")
            page.fill("input[name=password]", "bench-password")
            with page.expect_navigation():
                page.click("button[type=submit]")
            page.wait_for_function("document.querySelector('img#photo').complete")
            if args.screenshot:
                page.screenshot(path=str(args.screenshot))
            started = time.perf_counter()
            seen = []
            for _ in range(args.decide):
                seen.append(page.locator("#item").get_attribute("data-item"))
                with page.expect_navigation(wait_until="load"):  # the next page, its photo loaded
                    page.keyboard.press("1")
            elapsed = time.perf_counter() - started
            browser.close()
        assert len(set(seen)) == args.decide, "each key press decided a new item"
        decided = psycopg2.connect(url)
        with decided, decided.cursor() as cur:
            cur.execute("SELECT count(*) FROM review_decisions")
            assert cur.fetchone()[0] == args.decide
        decided.close()
        results["keyboard"] = {"decisions": args.decide, "seconds": round(elapsed, 2),
                               "decisions_per_minute": round(args.decide / elapsed * 60, 1),
                               "ms_per_decision": round(elapsed / args.decide * 1000, 1)}

        queue.add_reviewer(url, "paced", "paced-password")
        s = logged_in(base, "paced", "paced-password")  # another reviewer: the browser's holds no item now
        alone = decide_paced(s, base, args.paced, args.pace)
        held = hold_idle(port, args.idle)
        beside = decide_paced(s, base, args.paced, args.pace)
        results["paced"] = {"pace_s": args.pace, "idle_connections": args.idle,
                            "alone": percentiles(alone), "beside_idle": percentiles(beside),
                            "idle_still_open_at_end": still_open(held)}
        for sock in held:
            sock.close()
        results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
