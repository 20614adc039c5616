"""Run every benchmark in one go, on one bench archive, and summarise (what `make bench` runs).

    python -m bench [--quick] [--archive MAR] [--out DIR] [--data-dir CATALOGUE] [--only ceiling serving ingestion training]

Each benchmark runs in its own process (so one's memory and threads never colour another's) and
writes its JSON into OUT (default runs/bench/<time>/); this writes OUT/summary.json and
OUT/summary.md (the tables BENCHMARKS.md quotes). Ratios are always between figures of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.ingestion import cpu_split
from serving.archive import MODEL_NAME

BENCHES = ["ceiling", "serving", "ingestion", "training"]


def summary_markdown(out: Path, cmd: str, wall_s: float) -> str:
    load = lambda name: common.read_json(out / f"{name}.json")  # noqa: E731
    ceiling, serving, ingestion, training = (load(b) for b in BENCHES)
    first = next(r for r in (ceiling, serving, ingestion, training) if r)
    m = first["machine"]
    lines = [
        f"- command: `{cmd}` ({wall_s / 60:.1f} min); JSON in `{out.relative_to(common.REPO_ROOT) if out.is_relative_to(common.REPO_ROOT) else out}`",
        f"- machine: {m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}), {m['cores']} cores, {m['memory_gib']} GiB, "
        f"avx512_bf16={'yes' if m['avx512_bf16'] else 'no'}, AMX={'yes' if m['amx_bf16'] else 'no'}; torch {m['torch']}",
        f"- date: {first['date']}",
        "- load: " + ", ".join(f"{r['bench']} {r['load']['loadavg'][0]:.1f}{' (training.train running)' if r['load']['training_running'] else ''}"
                               for r in (ceiling, serving, ingestion, training) if r) + " (1-min load average at the end of each)",
        "",
    ]
    if ceiling:
        h, w = ceiling["image_size"]
        lines += [f"### 1. Model ceiling: {ceiling['arch']} at {h}x{w}, in-process, {ceiling['torch_threads']} threads", "",
                  "| precision | batch | images/s | ms/batch | images per CPU-second |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['precision']} | {r['batch_size']} | {r['images_per_s']:.1f} | {r['batch_ms']:.1f} | {r.get('images_per_cpu_s', float('nan')):.1f} |"
                  for r in ceiling["results"]]
        lines += [f"| {r['precision']}, {r['processes']} one-thread processes at once | {r['batch_size']} | {r['images_per_s']:.1f} | "
                  f"{r['batch_ms']:.1f} (each) | {r.get('images_per_cpu_s', float('nan')):.1f} |" for r in ceiling.get("parallel", [])]
        if "32" in ceiling.get("int8_vs_bf16", {}):  # JSON keys: batch sizes as text
            ratio = lambda key: ceiling[key]["32"]  # noqa: E731
            lines += ["", f"int8 ({ceiling['int8_source']}) / bf16 at batch 32: **{ratio('int8_vs_bf16'):.2f}** (target >= 1.5), "
                          f"per CPU-second {ratio('int8_vs_bf16_per_cpu'):.2f}; "
                          f"int8 / fp32: {ratio('int8_vs_fp32'):.2f}; `precision: auto` serves this archive as "
                          f"{ceiling['served_precision']} here."]
        lines.append("")
    if serving:
        lines += [f"### 2. Serving: TorchServe, batchSize {serving['served_batch_size']}, maxBatchDelay {serving['served_max_batch_delay']} ms, "
                  f"{serving['workers']} worker(s), precision {serving.get('precision')}", "",
                  "| photos/request | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | images per CPU-second |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.get('photos_per_request', 1)} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{sum(r['errors'].values())} | {r.get('images_per_cpu_s', float('nan')):.1f} |" for r in serving["results"]]
        if "ratio_to_ceiling" in serving:
            c = serving["ceiling"]["served"]
            lines += ["", f"Best {serving['best']['images_per_s']:.1f} images/s ({serving['best'].get('photos_per_request', 1)} photo(s) a request, "
                          f"concurrency {serving['best']['concurrency']}): **{serving['ratio_to_ceiling']:.2f}** of the ceiling of the precision it serves "
                          f"({c['precision']} batch {c['batch_size']}, "
                          f"{str(c['processes']) + ' one-thread processes' if c.get('processes') else 'one process'}, {c['images_per_s']:.1f}/s). Target >= 0.85."]
            if "ratio_to_one_process_ceiling" in serving:
                o = serving["ceiling"]["served_one_process"]
                lines += ["", f"Over one process with {str(ceiling['torch_threads']) + ' threads' if ceiling else 'a thread per core'} "
                              f"({o['precision']} batch {o['batch_size']}, {o['images_per_s']:.1f}/s): {serving['ratio_to_one_process_ceiling']:.2f}."]
            if "lone_p50_over_batch1" in serving:
                lines += ["", f"A lone request (1 photo, concurrency 1): p50 {serving['lone']['p50_ms']} ms, **{serving['lone_p50_over_batch1']}x** "
                              f"the model's batch-1 time ({serving['ceiling']['served_batch1']['batch_ms']} ms). Target <= 1.5x."]
            if "cpu_ratio_to_ceiling" in serving:
                cc = serving["ceiling"]["best_per_cpu"]
                lines += ["", f"Per CPU-second (TorchServe's processes + the load generator vs the in-process model in one process; holds on a shared machine): "
                              f"best {serving['best_per_cpu']['images_per_cpu_s']:.1f} vs {cc['images_per_cpu_s']:.1f} "
                              f"({cc['precision']} batch {cc['batch_size']}): **{serving['cpu_ratio_to_ceiling']:.2f}**."]
        stages = [r for r in serving["results"] if r.get("breakdown")]
        if stages:
            lines += ["", "Where the time goes (the handler's `refund_stage_seconds` per batch; TorchServe's latency per request, of which "
                          "its queue, which holds a lone request for maxBatchDelay):", "",
                      "| photos/request | concurrency | images/batch | decode ms | assemble ms | forward ms | response ms | worker idle or outside | "
                      "request ms | queue ms | handler ms | frontend + IPC ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in stages:
                b = r["breakdown"]
                ms = b["stage_ms_per_batch"]
                lines.append(f"| {r['photos_per_request']} | {r['concurrency']} | {b['mean_batch_images']} | {ms['decode']} | {ms['assemble']} | "
                             f"{ms['forward']} | {ms['response']} | {b['idle_or_outside']:.0%} | {b['request_ms']} | {b['queue_ms']} | "
                             f"{b['handler_ms_per_batch']} | {b['frontend_and_ipc_ms']} |")
        if serving.get("variants"):
            lines += ["", "model-config.yaml variants, each on its own TorchServe in the same run (best of its loads):", "",
                      "| variant | best images/s | of the served ceiling | lone p50 ms | lone / batch-1 |", "|---|---:|---:|---:|---:|",
                      f"| (the archive's own) | {serving['best']['images_per_s']:.1f} | {serving.get('ratio_to_ceiling', float('nan')):.2f} | "
                      f"{(serving.get('lone') or {}).get('p50_ms')} | {serving.get('lone_p50_over_batch1')} |"]
            lines += [f"| `{v['variant']}` | {v['best']['images_per_s']:.1f} | {v.get('ratio_to_ceiling', float('nan')):.2f} | "
                      f"{(v.get('lone') or {}).get('p50_ms')} | {v.get('lone_p50_over_batch1')} |" for v in serving["variants"]]
        lines.append("")
    if ingestion:
        lines += [f"### 3. Ingestion end to end (`python -m ingest run`, images from {ingestion['source']})", "",
                  "| run | images | images/s | images per CPU-second | rows (distinct contents) | moved | left in inbox | exit |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        def row(label, r):
            return (f"| {label} | {r['images']} | {r['images_per_s']:.1f} | {r.get('images_per_cpu_s', float('nan')):.1f} | "
                    f"{r['rows']} ({r['distinct_contents']}) | {r['moved']} | {r['left_in_inbox']} | {r['exit_code']} |")
        lines += [row(f"ingest, {MODEL_NAME} {ingestion.get('arch')} (defaults)", r) for r in ingestion["results"]]
        if ingestion.get("tuned"):
            lines.append(row(f"ingest `{' '.join(ingestion['tuned']['extra_args'])}`", ingestion["tuned"]))
        lines += [row(f"ingest, {ingestion.get('memory_archive_arch')} archive (scaling run)", r) for r in ingestion.get("memory_runs", [])]
        n = ingestion.get("naive")
        if n:
            lines.append(f"| naive baseline (224 px fp32, 1 image/request, INSERT+commit per row) | {n['images']} | {n['images_per_s']:.2f} | "
                         f"{n.get('images_per_cpu_s', float('nan')):.2f} | {n['rows']} | {n['images']} | {n['left_in_inbox']} | |")
        lines.append("")
        if "ratio_to_serving" in ingestion:
            lines.append(f"- ratio to serving's best ({ingestion['serving_best']['images_per_s']:.1f}/s): **{ingestion['ratio_to_serving']:.2f}** "
                         f"(target >= 0.95); per CPU-second {ingestion.get('cpu_ratio_to_serving', float('nan')):.2f}")
        if split := cpu_split(ingestion["best"]):
            lines.append(f"- throughput run, {split}")
        if "tuned_ratio_to_serving" in ingestion:
            lines.append(f"- with `{' '.join(ingestion['tuned']['extra_args'])}`: {ingestion['tuned_ratio_to_serving']:.2f} of serving's best")
        if "speedup_vs_naive" in ingestion:
            lines.append(f"- speed-up over the naive baseline: **x{ingestion['speedup_vs_naive']}** (target >= 30); "
                         f"per CPU-second x{ingestion.get('cpu_speedup_vs_naive')}")
        if ingestion.get("memory_runs"):
            a, b = ingestion["memory_runs"][0], ingestion["memory_runs"][-1]
            lines.append(f"- as the inbox grows ({a['images']} -> {b['images']} files, {ingestion.get('memory_archive_arch')} archive): "
                         f"{a['images_per_s']:.1f} -> {b['images_per_s']:.1f} images/s, peak RSS {a['peak_rss_mib']:.0f} -> {b['peak_rss_mib']:.0f} MiB")
        lines.append("")
    lines += peers_markdown(serving, ingestion)
    lines += ["### 5. Memory (peak RSS)", "", "| what | peak RSS MiB |", "|---|---:|"]
    if serving:
        mem = serving["memory"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(mem["at_peak_by_kind_mib"].items()))
        lines.append(f"| TorchServe under the serving load, sum of its processes ({parts}) | {mem['peak_sum_rss_mib']:.0f} |")
    if ingestion:
        mem = ingestion["torchserve_memory"]
        lines.append(f"| TorchServe during ingestion, sum of its processes | {mem['peak_sum_rss_mib']:.0f} |")
        for r in ingestion["results"]:
            lines.append(f"| ingestion process, throughput run, inbox of {r['images']} files | {r['peak_rss_mib']:.0f} |")
        for r in ingestion.get("memory_runs", []):
            lines.append(f"| ingestion process, scaling run, inbox of {r['images']} files | {r['peak_rss_mib']:.0f} |")
    lines.append("")
    if training:
        h, w = training["image_size"]
        lines += [f"### 6. Training: {training['arch']} at {h}x{w}, batch {training['batch_size']}, forward + backward + AdamW step", "",
                  "| precision | images/s | s/step |", "|---|---:|---:|"]
        lines += [f"| {r['precision']} | {r['images_per_s']:.1f} | {r['step_s']:.2f} |" for r in training["results"]]
        lines.append("")
    return "\n".join(lines)


def peers_markdown(serving: dict | None, ingestion: dict | None) -> list[str]:
    """The ways a user would otherwise do it, beside ours, from the same run."""
    rows = []
    if serving:
        b = serving["best"]
        rows.append(f"| our handler in TorchServe ({serving.get('precision')}, {b.get('photos_per_request', 1)} photo(s)/request, c={b['concurrency']}) | "
                    f"{b['images_per_s']:.1f} | 1.00 |")
        stock = serving.get("stock")
        if stock:
            sb = stock["best"]
            rows.append(f"| TorchServe's stock `image_classifier` (fp32, 224 px, batch 1, c={sb['concurrency']}) | {sb['images_per_s']:.1f} | "
                        f"{sb['images_per_s'] / b['images_per_s']:.2f} |")
    if ingestion:
        ib, n = ingestion["best"], ingestion.get("naive")
        base = serving["best"]["images_per_s"] if serving else ib["images_per_s"]
        rows.append(f"| `python -m ingest run` into PostgreSQL | {ib['images_per_s']:.1f} | {ib['images_per_s'] / base:.2f} |")
        if n:
            rows.append(f"| naive baseline end to end (224 px fp32, 1 image/request, INSERT+commit per row) | {n['images_per_s']:.2f} | "
                        f"{n['images_per_s'] / base:.3f} |")
    if not rows:
        return []
    return ["### 4. Peers side by side", "", "| way | images/s | vs our serving |", "|---|---:|---:|", *rows, ""]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark (about 3 minutes on a quiet machine)")
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: training.train's default network, random init, with an int8 model "
                             "built for timing, made now)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and summary (default: runs/bench/<time>)")
    parser.add_argument("--with-100k", action="store_true", help="bench.ingestion: one more scaling run of 100,000 files (several minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES, help="run only these")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"Kaggle-layout catalogue whose images serving and ingestion send (sets ${common.DATA_ENV}; "
                             "default: that variable, else generated images)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.data_dir is not None:  # the benches run as child processes: they read it from the environment
        os.environ[common.DATA_ENV] = str(args.data_dir.resolve())
    common.bench_data_dir()  # a wrong folder fails now, not after the archive is built
    out = (args.out or common.default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench" + (" --quick" if args.quick else "") + (" --with-100k" if args.with_100k else "") + ("" if args.only == BENCHES else " --only " + " ".join(args.only))
    started = time.monotonic()
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        for name in BENCHES:
            if name not in args.only:
                continue
            argv = [sys.executable, "-m", f"bench.{name}", "--out", str(out)] + (["--quick"] if args.quick else [])
            if name != "training":
                argv += ["--archive", str(archive)]
            if name == "ingestion" and args.with_100k:
                argv.append("--with-100k")
            print(f"\n### bench.{name}", flush=True)
            t0 = time.monotonic()
            child = subprocess.Popen(argv, cwd=common.REPO_ROOT)
            try:
                code = child.wait()
            except BaseException:  # SIGTERM/Ctrl-C: let the child stop its services first
                child.terminate()
                child.wait(timeout=60)
                raise
            print(f"### bench.{name}: exit {code} in {time.monotonic() - t0:.0f}s", flush=True)
            if code:
                failed.append(name)
    wall = time.monotonic() - started
    md = summary_markdown(out, cmd, wall)
    (out / "summary.md").write_text(md + "\n")
    summary = {name: common.read_json(out / f"{name}.json") for name in BENCHES}
    common.write_json(out / "summary.json", {"command": cmd, "wall_s": round(wall, 1), "failed": failed, **summary})
    print("\n" + md)
    print(f"\nall benchmarks: {wall / 60:.1f} min; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    common.exit_on_sigterm()
    sys.exit(main(get_args_parser().parse_args()))
