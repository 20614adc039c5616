"""Ingestion end to end, the naive baseline, and the ingestion job's memory as the inbox grows.

    python -m bench.ingestion [--archive MAR] [--sizes 500 10000] [--baseline-images 300] [--serving serving.json]

For each size N: N JPEGs are copied into a fresh inbox (the real catalogue holds a few byte-identical
duplicates, so rows are checked against the distinct contents), then `python -m ingest run` (the
production CLI, in its own process) sends them to a real TorchServe (repository config, the archive's
model-config.yaml) and records them in a real PostgreSQL (a private cluster on a free port). Timed
from process start to exit; checked afterwards: committed rows, files left in the inbox, files moved.
The job's peak RSS comes from wait4(2) (the kernel's high-water mark for that process).

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

NAIVE_MODEL = "refund_classifier_naive"
NAIVE_SIZE = (224, 224)


# -- inboxes ----------------------------------------------------------------------------------

def fill_inbox(inbox: Path, sources: list[Path]) -> Path:
    """Copy the images into a fresh inbox, dated an hour ago so no 'still being written' check holds them back."""
    if inbox.exists():
        shutil.rmtree(inbox)
    inbox.mkdir(parents=True)
    past = time.time() - 3600
    for src in sources:
        dst = inbox / src.name
        shutil.copyfile(src, dst)
        os.utime(dst, (past, past))
    return inbox


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
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
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


def bench_ingest(n: int, sources: list[Path], work: Path, *, pg: common.PostgresForBench, torchserve_url: str, extra: list[str],
                 tag: str = "") -> dict:
    case = work / f"ingest-{n}{tag}"
    inbox = fill_inbox(case / "inbox", sources[:n])
    url = pg.create_database(f"bench_ingest_{n}{tag}")
    r = run_ingest(inbox, case, database_url=url, torchserve_url=torchserve_url, extra=extra)
    counts = db_counts(url)
    distinct = len({hashlib.sha256(p.read_bytes()).hexdigest() for p in sources[:n]})
    left = count_files(inbox)
    moved = count_files(case / "processed") + count_files(case / "quarantine")
    res = {
        "images": n, "extra_args": extra, "distinct_contents": distinct, **r, **counts, "left_in_inbox": left, "moved": moved,
        "images_per_s": round(n / r["wall_s"], 2),
        "all_recorded": counts["distinct_sha256"] == distinct, "all_moved": moved == n and left == 0,
    }
    print(f"  ingest N={n} {' '.join(extra)}: {res['images_per_s']:.1f} images/s, {counts['rows']} rows for {distinct} distinct contents, {moved} moved, {left} left, "
          f"peak RSS {r['peak_rss_mib']} MiB, exit {r['exit_code']}", flush=True)
    return res


# -- the naive baseline ------------------------------------------------------------------------------

def make_naive_archive(archive: Path, out: Path) -> Path:
    """The same weights as `archive`, in an archive served like the original project: 224 px, fp32, batchSize 1."""
    import zipfile

    info = common.archive_info(archive)
    staging = out / "naive-staging"
    staging.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        (staging / "weights.pt").write_bytes(z.read(info["manifest"]["model"]["serializedFile"]))
        classes = json.loads(z.read("index_to_name.json"))
    meta = {"arch": info["meta"]["arch"], "image_size": list(NAIVE_SIZE), "classes": [classes[str(i)] for i in range(len(classes))]}
    (staging / "naive_meta.json").write_text(json.dumps(meta))
    (staging / "model-config.yaml").write_text(yaml.safe_dump({
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 0, "responseTimeout": 120}))
    shutil.copy(Path(__file__).with_name("naive_handler.py"), staging / "naive_handler.py")
    store = out / "naive-store"
    store.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", NAIVE_MODEL, "--version", "1",
           "--serialized-file", str(staging / "weights.pt"), "--handler", str(staging / "naive_handler.py"),
           "--extra-files", str(staging / "naive_meta.json"), "--config-file", str(staging / "model-config.yaml"),
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
        res = naive_loop(inbox, case / "processed", url=f"{ts.inference_url}/predictions/{NAIVE_MODEL}",
                         database_url=pg.create_database("bench_naive"))
    finally:
        ts.stop()
    res |= {"image_size": list(NAIVE_SIZE), "precision": "fp32", "batch_size": 1, "left_in_inbox": count_files(case / "inbox")}
    print(f"  naive baseline: {res['images_per_s']:.2f} images/s over {res['images']} images ({res['rows']} rows)", flush=True)
    return res


# -- all of it ---------------------------------------------------------------------------------------

def run(archive: Path, work: Path, *, sizes: list[int], baseline_images: int, extra: list[str],
        tuned: tuple[int, int] | None) -> dict:
    info = common.archive_info(archive)
    sources = common.image_paths(max([*sizes, baseline_images, tuned[0] if tuned else 0]), work)
    results, tuned_result = [], None
    with common.PostgresForBench() as pg:
        ts = common.make_torchserve(archive.parent, work / "torchserve")
        ts.start([f"{common.MODEL_NAME}={archive.name}"])
        try:
            with common.TreeRSS(ts.pid()) as rss:
                for n in sizes:
                    results.append(bench_ingest(n, sources, work, pg=pg, torchserve_url=ts.inference_url, extra=extra))
            ts_memory = rss.report()
            if tuned and "--concurrency" in cli_options():
                # What more requests in flight would give: the job's own knob, not a code change.
                tuned_result = bench_ingest(tuned[0], sources, work, pg=pg, torchserve_url=ts.inference_url,
                                            extra=[*extra, "--concurrency", str(tuned[1])], tag="_tuned")
        finally:
            ts.stop()
        naive = bench_naive(archive, sources, work, pg=pg, n=baseline_images) if baseline_images else None
    largest = max(results, key=lambda r: r["images"])
    smallest = min(results, key=lambda r: r["images"])
    res = {
        "bench": "ingestion", "archive": str(archive), "image_size": info["meta"].get("image_size"),
        "source": "../shared/datasets/fashion-small/images" if str(sources[0]).startswith(str(common.DATASET)) else "generated (training.make_sample_catalogue)",
        "results": results, "best": largest, "tuned": tuned_result, "naive": naive, "torchserve_memory": ts_memory,
        "memory_growth_mib": round(largest["peak_rss_mib"] - smallest["peak_rss_mib"], 1),
        "memory_growth_ratio": round(largest["peak_rss_mib"] / smallest["peak_rss_mib"], 3),
    }
    if naive:
        res["speedup_vs_naive"] = round(largest["images_per_s"] / naive["images_per_s"], 1)
    return res


def add_ratios(res: dict, serving: dict | None) -> dict:
    if serving:
        res["serving_best"] = serving["best"]
        res["ratio_to_serving"] = round(res["best"]["images_per_s"] / serving["best"]["images_per_s"], 3)
        if res.get("tuned"):
            res["tuned_ratio_to_serving"] = round(res["tuned"]["images_per_s"] / serving["best"]["images_per_s"], 3)
    return res


def print_results(res: dict) -> None:
    rows = [[f"ingest N={r['images']}", r["images_per_s"], r["rows"], r["moved"], r["left_in_inbox"], r["peak_rss_mib"], r["exit_code"]]
            for r in res["results"]]
    if res.get("tuned"):
        r = res["tuned"]
        rows.append([f"ingest N={r['images']} {' '.join(r['extra_args'])}", r["images_per_s"], r["rows"], r["moved"], r["left_in_inbox"], r["peak_rss_mib"], r["exit_code"]])
    if res.get("naive"):
        n = res["naive"]
        rows.append([f"naive N={n['images']}", n["images_per_s"], n["rows"], n["images"], n["left_in_inbox"], None, None])
    common.print_table(f"ingestion end to end ({res['source']})", ["run", "images/s", "rows", "moved", "left", "peak RSS MiB", "exit"], rows)
    print(f"ingestion memory: {res['results'][0]['peak_rss_mib']} MiB at N={res['results'][0]['images']} -> "
          f"{res['best']['peak_rss_mib']} MiB at N={res['best']['images']} (x{res['memory_growth_ratio']})")
    if "ratio_to_serving" in res:
        print(f"ratio to serving's best ({res['serving_best']['images_per_s']:.1f}/s at c={res['serving_best']['concurrency']}): "
              f"{res['ratio_to_serving']:.2f} (target >= 0.9)")
    if "speedup_vs_naive" in res:
        print(f"speed-up over the naive baseline: x{res['speedup_vs_naive']} (target >= 10)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random ResNet-50 one made now)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 10000], help="inbox sizes; the largest gives the throughput")
    parser.add_argument("--baseline-images", type=int, default=300, help="images for the naive baseline (0: skip it)")
    parser.add_argument("--tuned", type=int, nargs=2, default=[5000, 32], metavar=("N", "CONCURRENCY"),
                        help="one more run of N images with --concurrency CONCURRENCY (N=0: skip)")
    parser.add_argument("--ingest-arg", action="append", default=[], help="extra argument for `python -m ingest run` (repeatable)")
    parser.add_argument("--serving", type=Path, default=None, help="serving.json of the same run, for the ratio")
    parser.add_argument("--out", type=Path, default=None, help="folder for ingestion.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: inboxes of 100 and 1000, 20 baseline images")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = args.out or common.default_out()
    sizes, baseline, tuned = ([100, 1000], 20, (300, 32)) if args.quick else (args.sizes, args.baseline_images, tuple(args.tuned))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        res = run(archive, Path(tmp), sizes=sizes, baseline_images=baseline, extra=args.ingest_arg,
                  tuned=tuned if tuned[0] else None)
    res = add_ratios(res, common.read_json(args.serving or out / "serving.json"))
    res |= {"machine": common.machine_info(), "load": common.other_load(), "date": common.now_iso(), "quick": args.quick}
    print_results(res)
    common.write_json(out / "ingestion.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
