"""Serving: a real TorchServe (the repository's config.properties, the archive's model-config.yaml)
under closed-loop load at several concurrencies: throughput and p50/p95/p99 latency; peak RSS of
its frontend and backend workers; the ratio to the in-process model ceiling of the same run.

    python -m bench.serving [--archive MAR] [--concurrency 1 8 32 64] [--seconds 10] [--ceiling ceiling.json]

The load generator is a minimal asyncio HTTP/1.1 client on keep-alive connections, so that on
this 2-core machine it takes as little CPU from TorchServe as it can (requests + threads costs
several times more per request).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from bench import common
from serving.archive import MODEL_NAME, read_archive


class Connection:
    """One keep-alive HTTP/1.1 connection; post() sends a body and returns (status, body)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
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


async def closed_loop(url: str, payloads: list[bytes], *, concurrency: int, warmup_s: float, seconds: float) -> dict:
    """`concurrency` clients each send the next image as soon as their previous answer arrives.

    Timed window: from `warmup_s` after the start until `seconds` have passed and at least
    2 x concurrency answers arrived in it (so a slow, loaded machine still yields a figure), at
    most 6 x `seconds`. Throughput counts answers inside the window; latency, requests sent and
    answered inside it.
    """
    u = urlparse(url)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = float("inf")
    done_in_window = answered = 0

    def check_stop(now: float) -> None:
        nonlocal stop_at
        if stop_at == float("inf") and now >= measure_from + seconds and (
                done_in_window >= 2 * concurrency or now >= measure_from + 6 * seconds):
            stop_at = now

    async def client() -> None:
        nonlocal counter, done_in_window, answered
        conn = Connection(u.hostname, u.port)
        try:
            while loop.time() < stop_at:
                t0 = loop.time()
                body = payloads[counter % len(payloads)]
                counter += 1
                status, _ = await conn.post(u.path, body)
                t1 = loop.time()
                answered += 1
                if t1 > stop_at:
                    return
                if t1 >= measure_from:
                    done_in_window += 1
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
        "concurrency": concurrency, "requests": done_in_window, "seconds": round(window, 2),
        "images_per_s": round(done_in_window / window, 2),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_ms": round(statistics.fmean(lat_ms), 1) if lat_ms else float("nan"),
        "errors": errors, "answered_total": answered,
    }


def load_payloads(n: int, work: Path) -> list[bytes]:
    return [p.read_bytes() for p in common.image_paths(n, work)]


def run(archive: Path, work: Path, *, concurrencies: list[int], seconds: float, warmup_s: float, n_images: int) -> dict:
    info = read_archive(archive)
    payloads = load_payloads(n_images, work)
    ts = common.make_torchserve(archive.parent, work / "torchserve")
    t0 = time.monotonic()
    ts.start([f"{MODEL_NAME}={archive.name}"])
    startup_s = time.monotonic() - t0
    url = f"{ts.inference_url}/predictions/{MODEL_NAME}"
    rows = []
    try:
        with common.TreeRSS(ts.pid()) as rss:
            asyncio.run(closed_loop(url, payloads, concurrency=1, warmup_s=0, seconds=min(2.0, seconds)))  # JIT/alloc warm-up
            for c in concurrencies:
                # CPU seconds of TorchServe's processes and of this client: a figure that holds on a shared machine.
                cpu0 = common.tree_cpu_s(ts.pid()) + time.process_time()
                r = asyncio.run(closed_loop(url, payloads, concurrency=c, warmup_s=warmup_s, seconds=seconds))
                cpu = common.tree_cpu_s(ts.pid()) + time.process_time() - cpu0
                r |= {"cpu_s": round(cpu, 2), "images_per_cpu_s": round(r["answered_total"] / cpu, 2)}
                rows.append(r)
                print(f"  serving c={c}: {r['images_per_s']:.1f} images/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms errors {r['errors']}", flush=True)
        memory = rss.report()
        workers = ts.describe(MODEL_NAME)[0]
    finally:
        ts.stop()
    best = max(rows, key=lambda r: r["images_per_s"])
    best_cpu = max(rows, key=lambda r: r["images_per_cpu_s"])
    return {
        "best_per_cpu": best_cpu,
        "bench": "serving", "archive": str(archive), "image_size": info.meta.get("image_size"),
        "model_config": info.config, "startup_s": round(startup_s, 1),
        "payload_bytes_mean": round(sum(map(len, payloads)) / len(payloads)),
        "payloads": len(payloads), "results": rows, "best": best, "memory": memory,
        "served_batch_size": workers.get("batchSize"), "served_max_batch_delay": workers.get("maxBatchDelay"),
        "workers": len(workers.get("workers", [])),
    }


def add_ratios(res: dict, ceiling: dict | None) -> dict:
    if not ceiling:
        return res
    best = ceiling["best"]
    res["ceiling"] = {"best": best, "best_by_precision": ceiling.get("best_by_precision")}
    res["ratio_to_ceiling"] = round(res["best"]["images_per_s"] / best["images_per_s"], 3)
    if ceiling.get("best_per_cpu") and res.get("best_per_cpu"):
        res["cpu_ratio_to_ceiling"] = round(res["best_per_cpu"]["images_per_cpu_s"] / ceiling["best_per_cpu"]["images_per_cpu_s"], 3)
        res["ceiling"]["best_per_cpu"] = ceiling["best_per_cpu"]
    res["ratio_to_ceiling_by_precision"] = {
        p: round(res["best"]["images_per_s"] / r["images_per_s"], 3) for p, r in (ceiling.get("best_by_precision") or {}).items()
    }
    return res


def print_results(res: dict) -> None:
    cfg = res["model_config"]
    common.print_table(
        f"serving: TorchServe, batchSize {res.get('served_batch_size')}, maxBatchDelay {res.get('served_max_batch_delay')} ms, "
        f"{res['workers']} worker(s), {res['image_size']} px",
        ["concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors", "images/CPU-s"],
        [[r["concurrency"], r["images_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"], sum(r["errors"].values()), r["images_per_cpu_s"]]
         for r in res["results"]],
    )
    mem = res["memory"]
    print(f"peak RSS of TorchServe (frontend + workers): {mem['peak_sum_rss_mib']} MiB {mem['at_peak_by_kind_mib']}")
    if "ratio_to_ceiling" in res:
        c = res["ceiling"]["best"]
        print(f"ratio to the ceiling ({c['precision']} bs={c['batch_size']}: {c['images_per_s']:.1f}/s): "
              f"{res['ratio_to_ceiling']:.2f} (target >= 0.8); by precision {res['ratio_to_ceiling_by_precision']}; "
              f"per CPU-second {res.get('cpu_ratio_to_ceiling')}")
    _ = cfg


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random ResNet-50 one made now)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="clients in flight")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each")
    parser.add_argument("--images", type=int, default=2000, help="distinct images to cycle through")
    parser.add_argument("--ceiling", type=Path, default=None, help="ceiling.json of the same run, for the ratio")
    parser.add_argument("--out", type=Path, default=None, help="folder for serving.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per concurrency")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = args.out or common.default_out()
    seconds, warmup = (2.0, 1.0) if args.quick else (args.seconds, args.warmup)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        res = run(archive, Path(tmp), concurrencies=args.concurrency, seconds=seconds, warmup_s=warmup,
                  n_images=200 if args.quick else args.images)
    res = add_ratios(res, common.read_json(args.ceiling or out / "ceiling.json"))
    res |= common.run_context(quick=args.quick)
    print_results(res)
    common.write_json(out / "serving.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
