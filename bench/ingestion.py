"""Ingestion end to end, the naive baseline, and the ingestion job's cost as the inbox grows.

    python -m bench.ingestion [--archive MAR] [--sizes 1000 10000] [--with-100k] [--baseline-images 300] [--serving serving.json]

For each size N: N JPEGs are copied into a fresh inbox (the real catalogue holds a few byte-identical
duplicates, so rows are checked against the distinct contents), then `python -m ingest run` (the
production CLI, in its own process) sends them to a real TorchServe (repository config, the archive's
model-config.yaml) and records them in a real PostgreSQL (a private cluster on a free port). Timed
from process start to exit; checked afterwards: committed rows, files left in the inbox, files moved.
The job's peak RSS is its own VmHWM (bench/peak_rss.py: the kernel's high-water mark for that process).
The inbox is flushed to disk (sync) before the job starts: writing the photos' arrival to disk is
the disk's work whoever triggers it, and the job's folder fsyncs should not pay for this bench's copy.
The throughput run (--images, 4,000) follows, on the same TorchServe, bench.serving's warm-up (--warm-s
of multi-photo requests, so that TorchServe's JIT has compiled its hot paths, as in a long-running server
and as bench.serving does before it measures), then an untimed run of --warmup-images other photos.

Scaling runs: inboxes of --sizes files (1,000 and 10,000; 100,000 with --with-100k, several minutes)
on a small-model archive (TinyNet: the job's cost per file does not depend on the model, and the large
runs stay short), each its images/s and peak RSS: both should stay flat as the inbox grows. An inbox
larger than the catalogue repeats its photos, each copy made distinct by a tag after the image's end
marker (decoders ignore it), so every file is a new content with its own row.

The naive baseline is how the original project worked: a ResNet-50 archive at 224x224 in fp32
served one image per request (bench/naive_handler.py, batchSize 1), a sequential loop that posts
each file on a new connection, then one INSERT and one commit per row, then moves the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml

from bench import common
from bench import serving as serving_bench
from handler import refund_model
from serving.archive import MODEL_NAME, read_archive

NAIVE_MODEL = "refund_classifier_naive"
# Distinct photos read from the catalogue (or generated); larger inboxes repeat them, tagged.
MAX_SOURCES = 10_000
NAIVE_SIZE = (224, 224)


# -- inboxes ----------------------------------------------------------------------------------

def fill_inbox(inbox: Path, sources: list[Path], n: int | None = None) -> Path:
    """Copy n images (default: all) into a fresh inbox, dated an hour ago so no 'still being written'
    check holds them back. Past the end of `sources` they repeat, each copy tagged after the image
    data so that its content is new."""
    if inbox.exists():
        shutil.rmtree(inbox)
    inbox.mkdir(parents=True)
    past = time.time() - 3600
    for i in range(len(sources) if n is None else n):
        src = sources[i % len(sources)]
        lap = i // len(sources)
        dst = inbox / (src.name if lap == 0 else f"{src.stem}-copy{lap}{src.suffix}")
        if lap == 0:
            shutil.copyfile(src, dst)
        else:
            dst.write_bytes(src.read_bytes() + f"\n(bench copy {lap})".encode())
        os.utime(dst, (past, past))
    return inbox


def distinct_contents(folder: Path) -> int:
    return len({hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
                for root, _, names in os.walk(folder) for name in names})


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.exists() else 0


# -- the production job ---------------------------------------------------------------------------

def cli_options() -> str:
    result = subprocess.run([sys.executable, "-m", "ingest", "run", "--help"], cwd=common.REPO_ROOT, capture_output=True, text=True)
    return result.stdout


def run_ingest(inbox: Path, work: Path, *, database_url: str, torchserve_url: str, extra: list[str]) -> dict:
    """`python -m ingest run` in its own process: wall time, exit code, peak RSS (wait4), its log."""
    options = cli_options()
    processed, quarantine = work / "processed", work / "quarantine"
    rss_file = work / "peak_rss.json"
    cmd = [sys.executable, "-m", "bench.peak_rss", str(rss_file),
           "ingest", "run", "--inbox", str(inbox), "--torchserve-url", torchserve_url]
    if "--processed" in options:
        cmd += ["--processed", str(processed)]
    if "--quarantine" in options:
        cmd += ["--quarantine", str(quarantine)]
    cmd += extra
    env = {**os.environ, "DATABASE_URL": database_url, "TORCHSERVE_URL": torchserve_url, "PYTHONUNBUFFERED": "1"}
    log = work / "ingest.log"
    with open(log, "wb") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=60)
            raise
        wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = common.read_json(rss_file) or {}
    return {
        "cmd": "python -m " + " ".join(cmd[4:]), "exit_code": proc.returncode, "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak.get("vm_hwm_kib", 0) / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "processed_dir": str(processed) if "--processed" in options else None,
        "log_tail": log.read_text(errors="replace").strip().splitlines()[-3:],
    }


def db_counts(database_url: str) -> dict:
    import psycopg2

    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM predictions GROUP BY status")
            by_status = dict(cur.fetchall())
            cur.execute("SELECT count(DISTINCT sha256) FROM predictions")
            distinct = cur.fetchone()[0]
    finally:
        conn.close()
    return {"rows": sum(by_status.values()), "by_status": by_status, "distinct_sha256": distinct}


def bench_ingest(n: int, sources: list[Path], work: Path, *, pg: common.PostgresForBench, ts, extra: list[str],
                 tag: str = "") -> dict:
    case = work / f"ingest-{n}{tag}"
    inbox = fill_inbox(case / "inbox", sources[:n], n)
    # The job's folder fsyncs would otherwise also write back the 4,000 files this bench has just
    # copied: writing a photo's arrival to disk is the disk's work whoever triggers it, not the job's.
    os.sync()
    distinct = distinct_contents(inbox)
    url = pg.create_database(f"bench_ingest_{n}{tag}")
    ts_cpu0, pg_cpu0 = common.tree_cpu_s(ts.pid()), pg.cpu_s()
    r = run_ingest(inbox, case, database_url=url, torchserve_url=ts.inference_url, extra=extra)
    pg.settle()
    ts_cpu, pg_cpu = common.tree_cpu_s(ts.pid()) - ts_cpu0, pg.cpu_s() - pg_cpu0
    cpu = r["cpu_s"] + ts_cpu
    # Who used the cores: on a machine where TorchServe alone keeps them busy, what the job and
    # PostgreSQL take is what ingestion loses against serving.
    cpu_ms = {"torchserve": ts_cpu, "job": r["cpu_s"], "postgres": pg_cpu}
    counts = db_counts(url)
    left = count_files(inbox)
    moved = count_files(case / "processed") + count_files(case / "quarantine")
    res = {
        "images": n, "extra_args": extra, "distinct_contents": distinct, **r, **counts, "left_in_inbox": left, "moved": moved,
        "images_per_s": round(n / r["wall_s"], 2), "cpu_s_with_torchserve": round(cpu, 1),
        "images_per_cpu_s": round(n / cpu, 2),
        "cpu_ms_per_photo": {k: round(v / n * 1e3, 3) for k, v in cpu_ms.items()},
        "all_recorded": counts["distinct_sha256"] == distinct, "all_moved": moved == n and left == 0,
    }
    if n > 20000:  # 100,000 photos take a few hundred MB: gone once counted
        shutil.rmtree(case, ignore_errors=True)
    print(f"  ingest N={n} {' '.join(extra)}: {res['images_per_s']:.1f} images/s, {counts['rows']} rows for {distinct} distinct contents, {moved} moved, {left} left, "
          f"peak RSS {r['peak_rss_mib']} MiB, exit {r['exit_code']}; ms of CPU a photo: "
          + ", ".join(f"{k} {v}" for k, v in res["cpu_ms_per_photo"].items()), flush=True)
    return res


# -- the naive baseline ------------------------------------------------------------------------------

def make_naive_archive(archive: Path, out: Path) -> Path:
    """The same weights as `archive`, in an archive served like the original project: 224 px, fp32, batchSize 1."""
    info = read_archive(archive)
    staging = out / "naive-staging"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "weights.pt").write_bytes(info.read(info.weights_file))
    meta = {"arch": info.meta["arch"], "image_size": list(NAIVE_SIZE), "classes": info.classes()}
    (staging / "naive_meta.json").write_text(json.dumps(meta))
    (staging / "model-config.yaml").write_text(yaml.safe_dump({
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 0, "responseTimeout": 120}))
    shutil.copy(Path(__file__).with_name("naive_handler.py"), staging / "naive_handler.py")
    shutil.copy(refund_model.__file__, staging / "refund_model.py")  # builds any network the project trains
    store = out / "naive-store"
    store.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", NAIVE_MODEL, "--version", "1",
           "--serialized-file", str(staging / "weights.pt"), "--handler", str(staging / "naive_handler.py"),
           "--extra-files", f"{staging / 'naive_meta.json'},{staging / 'refund_model.py'}", "--config-file", str(staging / "model-config.yaml"),
           "--export-path", str(store), "--archive-format", "default", "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=common.private_tmp_env(store))
    if result.returncode != 0:
        raise SystemExit(f"bench: torch-model-archiver failed for the naive archive: {result.stderr or result.stdout}")
    return store / f"{NAIVE_MODEL}.mar"


def naive_loop(inbox: Path, processed: Path, *, url: str, database_url: str) -> dict:
    """One image per request on a new connection, sequential; one INSERT + commit per row; then move the file."""
    import psycopg2
    import requests
    from psycopg2.extras import Json

    insert = resources.files("bench").joinpath("naive_insert.sql").read_text()
    processed.mkdir(parents=True, exist_ok=True)
    conn = psycopg2.connect(database_url)
    n, errors = 0, 0
    t0 = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute(resources.files("bench").joinpath("naive.sql").read_text())
        conn.commit()
        for path in sorted(inbox.iterdir()):
            data = path.read_bytes()
            r = requests.post(url, data=data, timeout=120)
            if r.status_code != 200:
                errors += 1
                continue
            body = r.json()
            with conn.cursor() as cur:
                cur.execute(insert, {"sha256": hashlib.sha256(data).hexdigest(), "path": str(path), "label": body["label"],
                                     "confidence": body["confidence"], "topk": Json(body["topk"])})
            conn.commit()
            shutil.move(path, processed / path.name)
            n += 1
        wall = time.monotonic() - t0
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM naive_predictions")
            rows = cur.fetchone()[0]
    finally:
        conn.close()
    return {"images": n, "errors": errors, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2), "rows": rows}


def bench_naive(archive: Path, sources: list[Path], work: Path, *, pg: common.PostgresForBench, n: int) -> dict:
    case = work / "naive"
    mar = make_naive_archive(archive, case)
    ts = common.make_torchserve(mar.parent, case / "torchserve")
    ts.start([f"{NAIVE_MODEL}={mar.name}"])
    try:
        inbox = fill_inbox(case / "inbox", sources[:n])
        cpu0 = common.tree_cpu_s(ts.pid()) + time.process_time()
        res = naive_loop(inbox, case / "processed", url=f"{ts.inference_url}/predictions/{NAIVE_MODEL}",
                         database_url=pg.create_database("bench_naive"))
        cpu = common.tree_cpu_s(ts.pid()) + time.process_time() - cpu0
        res |= {"cpu_s_with_torchserve": round(cpu, 1), "images_per_cpu_s": round(res["images"] / cpu, 2)}
    finally:
        ts.stop()
    res |= {"image_size": list(NAIVE_SIZE), "precision": "fp32", "batch_size": 1, "left_in_inbox": count_files(case / "inbox")}
    print(f"  naive baseline: {res['images_per_s']:.2f} images/s over {res['images']} images ({res['rows']} rows)", flush=True)
    return res


def source_of(sources: list[Path]) -> str:
    data = common.bench_data_dir()
    if data is not None and str(sources[0]).startswith(str(data)):
        return str(data / "images")
    return "generated (training.make_sample_catalogue)"


# -- all of it ---------------------------------------------------------------------------------------

def run(archive: Path, work: Path, *, images: int, sizes: list[int], baseline_images: int, extra: list[str],
        tuned_concurrency: int, memory_archive: Path | None, per_request: list[int] = (), warmup: int = 0,
        warm_s: float = 0.0) -> dict:
    """Throughput on `archive`; the inbox-size memory runs on `memory_archive` (the job's memory does not
    depend on the model, and a small model keeps the 10,000-file run short); then the naive baseline."""
    info = read_archive(archive)
    # Larger inboxes repeat the catalogue's photos (fill_inbox): never generate 100,000 images.
    sources = common.image_paths(max([images + warmup, *[min(s, MAX_SOURCES) for s in sizes], baseline_images]), work)
    throughput, tuned, memory_runs, warm, jit_warm = [], None, [], None, None
    with common.PostgresForBench() as pg:
        ts = common.make_torchserve(archive.parent, work / "torchserve")
        ts.start([f"{MODEL_NAME}={archive.name}"])
        try:
            others = sources[images:] or sources  # photos outside the timed run, for the untimed ones
            if warm_s > 0:
                payloads = serving_bench.load_payloads(2000, work, serving_bench.PHOTOS_PER_REQUEST, paths=others)
                jit_warm = serving_bench.warm_up(f"{ts.inference_url}/predictions/{MODEL_NAME}", payloads, warm_s)
            if warmup:  # and the job's own first run: PostgreSQL, the page cache, the job's paths
                warm = bench_ingest(warmup, others, work, pg=pg, ts=ts, extra=extra, tag="_warmup")
            with common.TreeRSS(ts.pid()) as rss:
                throughput.append(bench_ingest(images, sources, work, pg=pg, ts=ts, extra=extra))
                for n in per_request:  # the same inbox and TorchServe, several photos per request or one
                    throughput.append(bench_ingest(images, sources, work, pg=pg, ts=ts, tag=f"_ppr{n}",
                                                   extra=[*extra, "--photos-per-request", str(n)]))
                if tuned_concurrency and "--concurrency" in cli_options():
                    # What more requests in flight give: the job's own knob, not a code change.
                    tuned = bench_ingest(images, sources, work, pg=pg, ts=ts, extra=[*extra, "--concurrency", str(tuned_concurrency)], tag="_tuned")
            ts_memory = rss.report()
        finally:
            ts.stop()
        if sizes:
            mem_archive = memory_archive or archive
            mts = common.make_torchserve(mem_archive.parent, work / "torchserve-memory")
            mts.start([f"{MODEL_NAME}={mem_archive.name}"])
            try:
                for n in sizes:
                    memory_runs.append(bench_ingest(n, sources, work, pg=pg, ts=mts, extra=extra, tag="_scale"))
            finally:
                mts.stop()
        naive = bench_naive(archive, sources, work, pg=pg, n=baseline_images) if baseline_images else None
    best = throughput[0]
    res = {
        "bench": "ingestion", "archive": str(archive), "arch": info.meta.get("arch"), "image_size": info.meta.get("image_size"),
        "source": source_of(sources),
        "results": throughput, "best": best, "tuned": tuned, "jit_warm_up": jit_warm, "warmup": warm, "naive": naive, "torchserve_memory": ts_memory,
        "memory_runs": memory_runs, "memory_archive_arch": read_archive(memory_archive or archive).meta.get("arch"),
    }
    if len(memory_runs) >= 2:
        small, large = memory_runs[0], memory_runs[-1]
        res["memory_growth_mib"] = round(large["peak_rss_mib"] - small["peak_rss_mib"], 1)
        res["memory_growth_ratio"] = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
        res["throughput_ratio_large_to_small"] = round(large["images_per_s"] / small["images_per_s"], 3)
    if naive:
        res["speedup_vs_naive"] = round(best["images_per_s"] / naive["images_per_s"], 1)
        res["cpu_speedup_vs_naive"] = round(best["images_per_cpu_s"] / naive["images_per_cpu_s"], 1)
    return res


def add_ratios(res: dict, serving: dict | None) -> dict:
    if serving:
        res["serving_best"] = serving["best"]
        res["ratio_to_serving"] = round(res["best"]["images_per_s"] / serving["best"]["images_per_s"], 3)
        if serving.get("best_per_cpu"):
            res["cpu_ratio_to_serving"] = round(res["best"]["images_per_cpu_s"] / serving["best_per_cpu"]["images_per_cpu_s"], 3)
        if res.get("tuned"):
            res["tuned_ratio_to_serving"] = round(res["tuned"]["images_per_s"] / serving["best"]["images_per_s"], 3)
    return res


def cpu_split(run: dict) -> str | None:
    """Where a run's CPU went, a photo at a time; on cores that TorchServe alone keeps busy, the job's and
    PostgreSQL's share is what ingestion loses against serving."""
    ms = run.get("cpu_ms_per_photo")
    if not ms or not ms.get("torchserve"):
        return None
    total = sum(ms.values())
    return (f"ms of CPU a photo: TorchServe {ms['torchserve']:.2f}, the job {ms['job']:.2f}, PostgreSQL {ms['postgres']:.2f}; "
            f"the job and PostgreSQL take {(ms['job'] + ms['postgres']) / total:.0%} of it, so on cores that TorchServe "
            f"alone keeps busy ingestion reaches at most about {ms['torchserve'] / total:.2f} of serving")


def print_results(res: dict) -> None:
    def row(label, r):
        return [label, r["images_per_s"], r.get("images_per_cpu_s"), r["rows"], r.get("moved"), r["left_in_inbox"], r.get("peak_rss_mib"), r.get("exit_code")]
    rows = [row(f"ingest N={r['images']} {' '.join(r['extra_args'])}".strip(), r) for r in res["results"]]
    if res.get("tuned"):
        rows.append(row(f"ingest N={res['tuned']['images']} {' '.join(res['tuned']['extra_args'])}", res["tuned"]))
    rows += [row(f"scaling N={r['images']} ({res['memory_archive_arch']})", r) for r in res["memory_runs"]]
    if res.get("naive"):
        n = res["naive"]
        rows.append([f"naive N={n['images']}", n["images_per_s"], n.get("images_per_cpu_s"), n["rows"], n["images"], n["left_in_inbox"], None, None])
    common.print_table(f"ingestion end to end ({res['source']})", ["run", "images/s", "images/CPU-s", "rows", "moved", "left", "peak RSS MiB", "exit"], rows)
    if res["memory_runs"]:
        a, b = res["memory_runs"][0], res["memory_runs"][-1]
        print(f"ingestion as the inbox grows: peak RSS {a['peak_rss_mib']} MiB at N={a['images']} -> {b['peak_rss_mib']} MiB at "
              f"N={b['images']}; {a['images_per_s']:.1f} -> {b['images_per_s']:.1f} images/s")
    if "ratio_to_serving" in res:
        print(f"ratio to serving's best ({res['serving_best']['images_per_s']:.1f}/s at c={res['serving_best']['concurrency']}): "
              f"{res['ratio_to_serving']:.2f} (target >= 0.95); per CPU-second {res.get('cpu_ratio_to_serving')}")
    if split := cpu_split(res["best"]):
        print(f"throughput run, {split}")
    if "speedup_vs_naive" in res:
        print(f"speed-up over the naive baseline: x{res['speedup_vs_naive']} (target >= 30); per CPU-second x{res.get('cpu_speedup_vs_naive')}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random one of training.train's default network, made now)")
    parser.add_argument("--images", type=int, default=4000, help="inbox size of the throughput run (the archive's network)")
    parser.add_argument("--warm-s", type=float, default=None,
                        help="untimed seconds of multi-photo requests on TorchServe before the ingest runs (default: bench.serving's)")
    parser.add_argument("--warmup-images", type=int, default=1000,
                        help="an untimed first run of this many other photos on the same TorchServe (0: none)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000], help="inbox sizes of the scaling runs")
    parser.add_argument("--with-100k", action="store_true", help="one more scaling run with an inbox of 100,000 files (several minutes)")
    parser.add_argument("--memory-arch", type=str, default="tinynet", help="model of the scaling runs' archive ('same': the bench archive)")
    parser.add_argument("--baseline-images", type=int, default=200, help="images for the naive baseline (0: skip it)")
    parser.add_argument("--tuned-concurrency", type=int, default=128, help="one more throughput run with this --concurrency (0: skip)")
    parser.add_argument("--per-request", type=int, nargs="*", default=[],
                        help="after the throughput run, one more each with this --photos-per-request (e.g. 1 8)")
    parser.add_argument("--ingest-arg", action="append", default=[], help="extra argument for `python -m ingest run` (repeatable)")
    parser.add_argument("--serving", type=Path, default=None, help="serving.json of the same run, for the ratio")
    parser.add_argument("--out", type=Path, default=None, help="folder for ingestion.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 images, scaling runs of 100 and 1000, 20 baseline images")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = args.out or common.default_out()
    images, sizes, baseline = (300, [100, 1000], 20) if args.quick else (args.images, args.sizes, args.baseline_images)
    warmup = 100 if args.quick else args.warmup_images
    warm_s = 2.0 if args.quick else (serving_bench.WARM_S if args.warm_s is None else args.warm_s)
    if args.with_100k:
        sizes = sorted({*sizes, 100_000})
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        memory_archive = None
        if sizes and args.memory_arch != "same":
            memory_archive = common.make_bench_archive(Path(tmp) / "memory", arch=args.memory_arch,
                                                       image_size=tuple(read_archive(archive).meta["image_size"]))
        res = run(archive, Path(tmp), images=images, sizes=sizes, baseline_images=baseline, extra=args.ingest_arg,
                  tuned_concurrency=args.tuned_concurrency, memory_archive=memory_archive, per_request=args.per_request,
                  warmup=warmup, warm_s=warm_s)
    res = add_ratios(res, common.read_json(args.serving or out / "serving.json"))
    res |= common.run_context(quick=args.quick)
    print_results(res)
    common.write_json(out / "ingestion.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
