"""Serving: a real TorchServe (the repository's config.properties, the archive's model-config.yaml)
under closed-loop load at several concurrencies, with one photo per request and with several (16, as
the ingestion job sends them; PHOTOS_PER_REQUEST): throughput and p50/p95/p99 latency; where the worker's time goes
(the handler's refund_stage_seconds metric: decode, assemble, forward, response, beside TorchServe's
own queue and request latency); peak RSS of its frontend and backend workers; the ratio to the
in-process model ceiling of the precision it serves, from the same run; then the same loads on
variants of the archive's model-config.yaml (batch size and delay, workers x threads), and TorchServe's
stock image_classifier handler on the same weights (bench/stock.py).

    python -m bench.serving [--archive MAR] [--concurrency 1 8 32 64] [--multi-concurrency 1 4 8 16]
                            [--variants maxBatchDelay=10 batchSize=4 ...] [--seconds 10] [--ceiling ceiling.json]

The load generator is a minimal asyncio HTTP/1.1 client on keep-alive connections, so that on
this 2-core machine it takes as little CPU from TorchServe as it can (requests + threads costs
several times more per request).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
import yaml

from bench import common
from serving.archive import MODEL_NAME, read_archive
from serving import metrics
from serving.client import MultipartPhotos

# The handler's per-stage histogram (handler/refund_handler.py METRIC_STAGE) and its stages.
STAGE_METRIC = "refund_stage_seconds"
STAGES = ("decode", "assemble", "forward", "response")
# Photos per request of the multi-photo load: ingest run's --photos-per-request default.
PHOTOS_PER_REQUEST = 16
# Seconds of the multi-photo load a TorchServe carries before it is measured (--warm-s). Its Java
# frontend compiles its hot paths while it serves (the JIT): under 8-photo requests its compiler threads took
# 0.8 ms of CPU an image over the first 10 s, 0.2-0.5 ms from 10 to 60 s and about 0.1 ms after,
# CPU that the two cores' workers lose. A long-running server is past that; a fresh one is not.
WARM_S = 30.0


@dataclass(frozen=True)
class Payload:
    """One request body: its Content-Type and how many photos it carries."""

    body: bytes
    content_type: str = "application/octet-stream"
    photos: int = 1


class Connection:
    """One keep-alive HTTP/1.1 connection; post() sends a body and returns (status, body)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            key, value = key.strip().lower(), value.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif key == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            data = b"".join(parts)
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data = await self.reader.read()
            close = True
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(url: str, payloads: list[Payload], *, concurrency: int, warmup_s: float, seconds: float) -> dict:
    """`concurrency` clients each send the next request as soon as their previous answer arrives.

    Timed window: from `warmup_s` after the start until `seconds` have passed and at least
    2 x concurrency answers arrived in it (so a slow, loaded machine still yields a figure), at
    most 6 x `seconds`. Throughput counts the photos of the answers inside the window; latency,
    requests sent and answered inside it.
    """
    u = urlparse(url)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = float("inf")
    done_in_window = answered = photos_in_window = photos_answered = 0

    def check_stop(now: float) -> None:
        nonlocal stop_at
        if stop_at == float("inf") and now >= measure_from + seconds and (
                done_in_window >= 2 * concurrency or now >= measure_from + 6 * seconds):
            stop_at = now

    async def client() -> None:
        nonlocal counter, done_in_window, answered, photos_in_window, photos_answered
        conn = Connection(u.hostname, u.port)
        try:
            while loop.time() < stop_at:
                t0 = loop.time()
                payload = payloads[counter % len(payloads)]
                counter += 1
                status, _ = await conn.post(u.path, payload.body, payload.content_type)
                t1 = loop.time()
                answered += 1
                photos_answered += payload.photos
                if t1 > stop_at:
                    return
                if t1 >= measure_from:
                    done_in_window += 1
                    photos_in_window += payload.photos
                    if t0 >= measure_from:
                        latencies.append(t1 - t0)
                    if status != 200:
                        errors[status] = errors.get(status, 0) + 1
                check_stop(t1)
        finally:
            conn.close()

    async def ticker() -> None:  # ends the window even when no answer arrives for a while
        while stop_at == float("inf"):
            check_stop(loop.time())
            await asyncio.sleep(0.05)

    await asyncio.gather(ticker(), *(client() for _ in range(concurrency)))
    window = stop_at - measure_from
    lat_ms = sorted(1000 * x for x in latencies)

    def pct(p: float) -> float:
        return round(lat_ms[min(len(lat_ms) - 1, int(round(p / 100 * (len(lat_ms) - 1))))], 1) if lat_ms else float("nan")

    return {
        "concurrency": concurrency, "photos_per_request": payloads[0].photos, "requests": done_in_window,
        "seconds": round(window, 2), "images_per_s": round(photos_in_window / window, 2),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_ms": round(statistics.fmean(lat_ms), 1) if lat_ms else float("nan"),
        "errors": errors, "answered_total": answered, "photos_answered_total": photos_answered,
    }


def warm_up(url: str, payloads: list[Payload], seconds: float) -> dict | None:
    """Untimed load, 16 requests in flight, so that TorchServe's JIT has compiled its hot paths (WARM_S)."""
    if seconds <= 0:
        return None
    r = asyncio.run(closed_loop(url, payloads, concurrency=16, warmup_s=0, seconds=seconds))
    print(f"  warm-up: {seconds:.0f} s of {payloads[0].photos} photo(s)/request at c=16, {r['images_per_s']:.1f} images/s, "
          f"errors {r['errors']}", flush=True)
    return {"seconds": r["seconds"], "photos_per_request": payloads[0].photos, "images_per_s": r["images_per_s"], "errors": r["errors"]}


def load_payloads(n: int, work: Path, photos_per_request: int = 1, paths: list[Path] | None = None) -> list[Payload]:
    """n distinct photos (the first n of `paths`, else of common.image_paths) as raw single-photo
    bodies, or as multipart requests of photos_per_request (the form serving.client.classify_many
    and the ingestion job send)."""
    photos = [p.read_bytes() for p in (paths[:n] if paths is not None else common.image_paths(n, work))]
    if photos_per_request == 1:
        return [Payload(b) for b in photos]
    out = []
    for i in range(0, len(photos) - photos_per_request + 1, photos_per_request):
        body = MultipartPhotos(photos[i:i + photos_per_request])
        out.append(Payload(b"".join(body), body.content_type, photos_per_request))
    return out


# -- TorchServe's metrics: where the time goes ---------------------------------------------------------

def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    return metrics.parse(requests.get(f"{metrics_url}/metrics", timeout=30).text)


def settled_scrape(metrics_url: str, wait_s: float = 5.0) -> dict:
    """The handler's metrics reach the frontend as worker log lines, a moment after the answers:
    scrape until the count of answered batches stops moving (at most wait_s)."""
    deadline = time.monotonic() + wait_s
    last = scrape(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = scrape(metrics_url)
        if metrics.total(now, f"{STAGE_METRIC}_count", Stage="response") == metrics.total(last, f"{STAGE_METRIC}_count", Stage="response"):
            return now
        last = now
    return last


def breakdown(before: dict, after: dict, *, wall_s: float, workers: int) -> dict:
    """Where the time of one load went, from the metrics' change over it (warm-up included).

    Per batch: the handler's stages (decode, assemble, forward, response). Per request: TorchServe's
    latency (frontend in to frontend out), of which the queue (waiting for a worker and for the batch
    to fill: maxBatchDelay for a lone request) and the handler's time for its batch; the rest is the
    frontend, the worker's protocol and the IPC between them. `worker_share`: each stage's part of the
    workers' wall time (workers x wall_s); `idle_or_outside`: the part in none of them."""
    d = lambda name, **labels: metrics.total(after, name, **labels) - metrics.total(before, name, **labels)  # noqa: E731
    batches = d(f"{STAGE_METRIC}_count", Stage="response")
    images = d("refund_batch_size_sum")
    stage_s = {st: d(f"{STAGE_METRIC}_sum", Stage=st) for st in STAGES}
    reqs = d("ts_inference_requests_total")
    if not batches or not reqs:
        return {}
    handler_ms = 1000 * sum(stage_s.values()) / batches
    request_ms = d("ts_inference_latency_microseconds") / reqs / 1000
    queue_ms = d("ts_queue_latency_microseconds") / reqs / 1000
    busy = max(wall_s * workers, 1e-9)
    return {
        "batches": int(batches), "images": int(images), "requests": int(reqs),
        "mean_batch_images": round(images / batches, 2),
        "stage_ms_per_batch": {st: round(1000 * v / batches, 2) for st, v in stage_s.items()},
        "stage_ms_per_image": {st: round(1000 * v / max(images, 1), 3) for st, v in stage_s.items()},
        "worker_share": {st: round(v / busy, 3) for st, v in stage_s.items()},
        "idle_or_outside": round(1 - sum(stage_s.values()) / busy, 3),
        "request_ms": round(request_ms, 2), "queue_ms": round(queue_ms, 2), "handler_ms_per_batch": round(handler_ms, 2),
        "frontend_and_ipc_ms": round(request_ms - queue_ms - handler_ms, 2),
    }


def served_precision(ts) -> str | None:
    """The precision the handler chose, from its start-up line in model_log.log ('precision=bf16')."""
    try:
        found = re.findall(r"\bprecision=(\w+)", (ts.log_dir / "model_log.log").read_text(errors="replace"))
    except OSError:
        return None
    return found[-1] if found else None


# -- one TorchServe, several loads ----------------------------------------------------------------------

def parse_loads(specs: list[str]) -> list[tuple[int, int]]:
    """'8x16' -> (8 photos per request, concurrency 16); '32' -> (1, 32)."""
    out = []
    for spec in specs:
        k, _, c = spec.rpartition("x")
        try:
            out.append((int(k or 1), int(c)))
        except ValueError as exc:
            raise SystemExit(f"bench.serving: invalid load {spec!r}; write CONCURRENCY or PHOTOSxCONCURRENCY (8x16)") from exc
    return out


def measure_loads(ts, url: str, payloads: dict[int, list[Payload]], loads: list[tuple[int, int]], *,
                  seconds: float, warmup_s: float, workers: int, label: str = "") -> list[dict]:
    rows = []
    before = settled_scrape(ts.metrics_url)
    for k, c in loads:
        # CPU seconds of TorchServe's processes and of this client: a figure that holds on a shared machine.
        cpu0 = common.tree_cpu_s(ts.pid()) + time.process_time()
        t0 = time.monotonic()
        r = asyncio.run(closed_loop(url, payloads[k], concurrency=c, warmup_s=warmup_s, seconds=seconds))
        wall = time.monotonic() - t0
        cpu = common.tree_cpu_s(ts.pid()) + time.process_time() - cpu0
        after = settled_scrape(ts.metrics_url)
        r |= {"cpu_s": round(cpu, 2), "images_per_cpu_s": round(r["photos_answered_total"] / cpu, 2),
              "breakdown": breakdown(before, after, wall_s=wall, workers=workers)}
        before = after
        rows.append(r)
        b = r["breakdown"]
        where = (" | per batch of %.1f: " % b["mean_batch_images"] + ", ".join(f"{st} {ms:.1f}" for st, ms in b["stage_ms_per_batch"].items())
                 + f" ms; request {b['request_ms']:.1f} = queue {b['queue_ms']:.1f} + handler {b['handler_ms_per_batch']:.1f}"
                 f" + frontend/IPC {b['frontend_and_ipc_ms']:.1f} ms") if b else ""
        print(f"  {label}serving {k} photo(s)/request c={c}: {r['images_per_s']:.1f} images/s p50 {r['p50_ms']} ms "
              f"p99 {r['p99_ms']} ms errors {r['errors']}{where}", flush=True)
    return rows


def run_archive(archive: Path, work: Path, model: str, loads: list[tuple[int, int]], payloads: dict[int, list[Payload]], *,
                seconds: float, warmup_s: float, warm_s: float, label: str = "", env: dict | None = None) -> dict:
    """Start a TorchServe serving `archive` as `model`, warm it (`warm_s` of its largest requests), measure each load, stop it."""
    ts = common.make_torchserve(archive.parent, work)
    t0 = time.monotonic()
    ts.start([f"{model}={archive.name}"], env=env)
    startup_s = time.monotonic() - t0
    url = f"{ts.inference_url}/predictions/{model}"
    try:
        with common.TreeRSS(ts.pid()) as rss:
            asyncio.run(closed_loop(url, payloads[1], concurrency=1, warmup_s=0, seconds=min(2.0, seconds)))  # the first answers
            warm = warm_up(url, payloads[max(k for k, _ in loads)], warm_s)  # the largest requests it will be sent
            described = ts.describe(model)[0]
            workers = max(1, len(described.get("workers", [])))
            rows = measure_loads(ts, url, payloads, loads, seconds=seconds, warmup_s=warmup_s, workers=workers, label=label)
        memory = rss.report()
        precision = served_precision(ts)
    finally:
        ts.stop()
    return {
        "archive": str(archive), "startup_s": round(startup_s, 1), "warm_up": warm, "results": rows, "memory": memory, "precision": precision,
        "served_batch_size": described.get("batchSize"), "served_max_batch_delay": described.get("maxBatchDelay"),
        "workers": workers, "best": max(rows, key=lambda r: r["images_per_s"]),
        "best_per_cpu": max(rows, key=lambda r: r["images_per_cpu_s"]),
        "lone": next((r for r in rows if (r["photos_per_request"], r["concurrency"]) == (1, 1)), None),
    }


# -- variants of the archive's model-config.yaml ------------------------------------------------------------

def parse_variant(spec: str) -> dict:
    """'batchSize=4,maxBatchDelay=1' -> {'batchSize': 4, 'maxBatchDelay': 1}; 'workers=N' sets min and max
    workers (handler threads stay auto: cores // workers); 'threads=N' and other handler keys go under handler:."""
    out: dict = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"bench.serving: invalid variant {spec!r}; write KEY=VALUE[,KEY=VALUE] (batchSize=4,maxBatchDelay=1)")
        value = yaml.safe_load(value)
        if key == "workers":
            out |= {"minWorkers": value, "maxWorkers": value}
        elif key in ("threads", "precision", "topk", "max_photos"):
            out.setdefault("handler", {})[key] = value
        else:
            out[key] = value
    return out


def variant_archive(archive: Path, overrides: dict, out: Path) -> Path:
    """A copy of the archive whose model-config.yaml has these settings replaced."""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / archive.name
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as dst:
        config_file = json.loads(src.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]
        for item in src.infolist():
            data = src.read(item)
            if item.filename == config_file:
                config = yaml.safe_load(data) or {}
                handler = {**config.get("handler", {}), **overrides.get("handler", {})}
                config = {**config, **{k: v for k, v in overrides.items() if k != "handler"}, "handler": handler}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            dst.writestr(item, data)
    return dest


# -- all of it -----------------------------------------------------------------------------------------------

def run(archive: Path, work: Path, *, loads: list[tuple[int, int]], variants: list[str], variant_loads: list[tuple[int, int]],
        stock_loads: list[tuple[int, int]], seconds: float, warmup_s: float, warm_s: float, n_images: int) -> dict:
    info = read_archive(archive)
    kinds = sorted({k for k, _ in [*loads, *variant_loads, *stock_loads]} | {1})
    payloads = {k: load_payloads(n_images, work, k) for k in kinds}
    main = run_archive(archive, work / "torchserve", MODEL_NAME, loads, payloads, seconds=seconds, warmup_s=warmup_s, warm_s=warm_s)
    res = {
        "bench": "serving", "archive": str(archive), "image_size": info.meta.get("image_size"), "model_config": info.config,
        "payload_bytes_mean": round(sum(len(p.body) for p in payloads[1]) / len(payloads[1])), "payloads": len(payloads[1]),
        **main,
    }
    res["variants"] = []
    for n, spec in enumerate(variants):
        overrides = parse_variant(spec)
        mar = variant_archive(archive, overrides, work / f"variant-{n}")
        v = run_archive(mar, work / f"torchserve-variant-{n}", MODEL_NAME, variant_loads, payloads,
                        seconds=seconds, warmup_s=warmup_s, warm_s=warm_s, label=f"[{spec}] ")
        res["variants"].append({"variant": spec, "overrides": overrides, **{k: v[k] for k in (
            "results", "precision", "served_batch_size", "served_max_batch_delay", "workers", "best", "lone", "startup_s")}})
    if stock_loads:
        from bench.stock import STOCK_MODEL, make_stock_archive, worker_env

        mar = make_stock_archive(archive, work / "stock")
        s = run_archive(mar, work / "torchserve-stock", STOCK_MODEL, stock_loads, payloads, seconds=seconds,
                        warmup_s=warmup_s, warm_s=warm_s, label="[stock image_classifier] ", env=worker_env(work / "stock"))
        res["stock"] = {"handler": "ts.torch_handler.image_classifier", "image_size": [224, 224], "precision": "fp32",
                        **{k: s[k] for k in ("results", "served_batch_size", "workers", "best", "lone", "memory", "startup_s")}}
    return res


def ceiling_of(ceiling: dict, precision: str | None, batch_size: int | None = None, *, one_process: bool = False) -> dict | None:
    """The ceiling's best row of that precision (of that batch size when given): one process with a
    thread per core, or one-thread processes side by side (`parallel`), whichever is faster."""
    rows = ceiling.get("results", []) + ([] if one_process else ceiling.get("parallel", []))
    rows = [r for r in rows if r["precision"] == precision and batch_size in (None, r["batch_size"])]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def ratios_of(run_: dict, ceiling: dict) -> dict:
    """Best images/s over the served precision's best ceiling (the target's ratio: the faster of one
    process and one-thread processes side by side); the lone request's p50 over that precision's
    batch-1 time."""
    out = {}
    top = ceiling_of(ceiling, run_.get("precision"))
    if top:
        out["ratio_to_ceiling"] = round(run_["best"]["images_per_s"] / top["images_per_s"], 3)
    one = ceiling_of(ceiling, run_.get("precision"), 1)
    if one and run_.get("lone"):
        out["lone_p50_over_batch1"] = round(run_["lone"]["p50_ms"] / one["batch_ms"], 2)
    return out


def add_ratios(res: dict, ceiling: dict | None) -> dict:
    if not ceiling:
        return res
    best = ceiling["best"]
    served = ceiling_of(ceiling, res.get("precision")) or best
    res["ceiling"] = {"best": best, "served": served, "best_by_precision": ceiling.get("best_by_precision"),
                      "served_batch1": ceiling_of(ceiling, res.get("precision"), 1)}
    one = ceiling_of(ceiling, res.get("precision"), one_process=True)
    if one:
        res["ceiling"]["served_one_process"] = one
        res["ratio_to_one_process_ceiling"] = round(res["best"]["images_per_s"] / one["images_per_s"], 3)
    res["ratio_to_best_ceiling"] = round(res["best"]["images_per_s"] / best["images_per_s"], 3)
    res |= ratios_of(res, ceiling)
    res.setdefault("ratio_to_ceiling", res["ratio_to_best_ceiling"])  # the precision served is not known
    for v in res.get("variants", []):
        v |= ratios_of(v, ceiling)
    per_cpu = [r for r in ceiling.get("results", []) if r["precision"] == served["precision"] and "images_per_cpu_s" in r]
    if per_cpu and res.get("best_per_cpu"):
        top = max(per_cpu, key=lambda r: r["images_per_cpu_s"])
        res["cpu_ratio_to_ceiling"] = round(res["best_per_cpu"]["images_per_cpu_s"] / top["images_per_cpu_s"], 3)
        res["ceiling"]["best_per_cpu"] = top
    res["ratio_to_ceiling_by_precision"] = {
        p: round(res["best"]["images_per_s"] / r["images_per_s"], 3) for p, r in (ceiling.get("best_by_precision") or {}).items()
    }
    return res


def add_stock_ratio(res: dict) -> dict:
    """Ours over the stock handler: the best of each, and at the stock handler's best concurrency with one photo a request."""
    stock = res.get("stock")
    if stock:
        stock["ours_over_stock"] = round(res["best"]["images_per_s"] / stock["best"]["images_per_s"], 2)
        same = next((r for r in res["results"] if (r["photos_per_request"], r["concurrency"])
                     == (1, stock["best"]["concurrency"])), None)
        if same:
            stock["ours_over_stock_one_photo_per_request"] = round(same["images_per_s"] / stock["best"]["images_per_s"], 2)
    return res


def print_results(res: dict) -> None:
    common.print_table(
        f"serving: TorchServe, batchSize {res.get('served_batch_size')}, maxBatchDelay {res.get('served_max_batch_delay')} ms, "
        f"{res['workers']} worker(s), {res['image_size']} px, precision {res.get('precision')}",
        ["photos/request", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors", "images/CPU-s"],
        [[r["photos_per_request"], r["concurrency"], r["images_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
          sum(r["errors"].values()), r["images_per_cpu_s"]] for r in res["results"]],
    )
    common.print_table(
        "where the time goes (per batch: the handler's stages; per request: TorchServe's latency)",
        ["photos/request", "concurrency", "images/batch", *[f"{st} ms" for st in STAGES], "worker idle/outside",
         "request ms", "queue ms", "handler ms", "frontend+IPC ms"],
        [[r["photos_per_request"], r["concurrency"], b.get("mean_batch_images"), *[b["stage_ms_per_batch"][st] for st in STAGES],
          f"{b['idle_or_outside']:.0%}", b.get("request_ms"), b.get("queue_ms"), b.get("handler_ms_per_batch"), b.get("frontend_and_ipc_ms")]
         for r in res["results"] if (b := r.get("breakdown"))],
    )
    mem = res["memory"]
    print(f"peak RSS of TorchServe (frontend + workers): {mem['peak_sum_rss_mib']} MiB {mem['at_peak_by_kind_mib']}")
    if "ratio_to_ceiling" in res:
        c = res["ceiling"]["served"]
        how = f"{c['processes']} one-thread processes" if c.get("processes") else "one process"
        print(f"ratio to the ceiling of the served precision ({c['precision']} bs={c['batch_size']}, {how}: {c['images_per_s']:.1f}/s): "
              f"{res['ratio_to_ceiling']:.2f} (target >= 0.85); to one process's: {res.get('ratio_to_one_process_ceiling')}; "
              f"by precision {res['ratio_to_ceiling_by_precision']}; per CPU-second {res.get('cpu_ratio_to_ceiling')}")
    if "lone_p50_over_batch1" in res:
        print(f"a lone request: p50 {res['lone']['p50_ms']} ms = {res['lone_p50_over_batch1']}x the model's batch-1 time "
              f"({res['ceiling']['served_batch1']['batch_ms']} ms) (target <= 1.5)")
    if res.get("variants"):
        rows = [["(defaults)", res["best"]["images_per_s"], res.get("ratio_to_ceiling"),
                 (res.get("lone") or {}).get("p50_ms"), res.get("lone_p50_over_batch1")]]
        rows += [[v["variant"], v["best"]["images_per_s"], v.get("ratio_to_ceiling"), (v.get("lone") or {}).get("p50_ms"),
                  v.get("lone_p50_over_batch1")] for v in res["variants"]]
        common.print_table("model-config.yaml variants, each on its own TorchServe (best of its loads)",
                           ["variant", "best images/s", "of ceiling", "lone p50 ms", "lone / batch-1"], rows)
    if res.get("stock"):
        s = res["stock"]
        print(f"stock image_classifier handler (fp32, 224 px, batch 1): best {s['best']['images_per_s']:.1f} images/s at "
              f"c={s['best']['concurrency']}; ours {s.get('ours_over_stock')}x its best "
              f"({s.get('ours_over_stock_one_photo_per_request')}x with one photo per request at the same concurrency)")


DEFAULT_VARIANTS = ["workers=1", "maxBatchDelay=10", "batchSize=4", "batchSize=16"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random one of training.train's default network, made now)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="clients in flight, one photo per request")
    parser.add_argument("--multi-concurrency", type=int, nargs="*", default=[1, 4, 8, 16],
                        help=f"clients in flight, {PHOTOS_PER_REQUEST} photos per request (as ingest run sends them)")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                        help="model-config.yaml variants to measure beside the archive's own, each KEY=VALUE[,KEY=VALUE] "
                             "(batchSize, maxBatchDelay, workers, threads, ...)")
    parser.add_argument("--variant-loads", nargs="*", default=["1", "32", f"{PHOTOS_PER_REQUEST}x8", f"{PHOTOS_PER_REQUEST}x16"],
                        help="loads of each variant: CONCURRENCY (one photo a request) or PHOTOSxCONCURRENCY")
    parser.add_argument("--stock-loads", nargs="*", default=["1", "8", "32"],
                        help="loads of TorchServe's stock image_classifier handler on the same weights (none: skip it)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per load")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each")
    parser.add_argument("--warm-s", type=float, default=WARM_S,
                        help="untimed seconds of the multi-photo load on each TorchServe before its first load (its JIT)")
    parser.add_argument("--images", type=int, default=2000, help="distinct images to cycle through")
    parser.add_argument("--ceiling", type=Path, default=None, help="ceiling.json of the same run, for the ratio")
    parser.add_argument("--out", type=Path, default=None, help="folder for serving.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s per load, loads 1, 8 and 8x8, no variants, the stock handler at c=8")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = args.out or common.default_out()
    loads = [(1, c) for c in args.concurrency] + [(PHOTOS_PER_REQUEST, c) for c in args.multi_concurrency]
    variants, variant_loads, stock_loads = args.variants, parse_loads(args.variant_loads), parse_loads(args.stock_loads)
    seconds, warmup, warm_s = args.seconds, args.warmup, args.warm_s
    if args.quick:
        seconds, warmup, warm_s = 2.0, 1.0, 2.0
        loads, variants, stock_loads = [(1, 1), (1, 8), (PHOTOS_PER_REQUEST, 8)], [], [(1, 8)]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        res = run(archive, Path(tmp), loads=loads, variants=variants, variant_loads=variant_loads, stock_loads=stock_loads,
                  seconds=seconds, warmup_s=warmup, warm_s=warm_s, n_images=200 if args.quick else args.images)
    res = add_ratios(res, common.read_json(args.ceiling or out / "ceiling.json"))
    res = add_stock_ratio(res)
    res |= common.run_context(quick=args.quick)
    print_results(res)
    common.write_json(out / "serving.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
