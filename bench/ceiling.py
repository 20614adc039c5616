"""Model ceiling: in-process forward throughput of the archive's model at its served input size.

    python -m bench.ceiling [--archive MAR] [--batch-sizes 1 8 32] [--seconds 4]

No HTTP, no decoding: random input already normalized, under torch.inference_mode(). fp32, bf16
via torch.autocast("cpu") + channels_last, and int8: the archive's own int8 program where it
carries one (training.export), else the same weights quantized here the export's way
(training.quantize) with random calibration inputs, which sets the speed, not the accuracy. The
three run interleaved (for each batch size: fp32, bf16, int8; --rounds repeats that, each figure
the median), so that a busy machine slows them alike.

One process with a thread per core is not the machine's best: OpenMP's threads wait for each other
at every layer, and stall whenever another process holds a core. So the largest batch size is also
timed as `--processes` processes (default: one per core) of one thread each, running at once, as
TorchServe runs that many one-thread workers (`parallel`: the images/s of all of them together).
The best of both, per precision, is what serving is measured against; `served_precision` is what
the handler's `precision: auto` picks for this archive here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench import common
from handler.refund_inference import INT8_SERVABLE, served_precision
from handler.refund_model import cpu_supports_bf16, cpu_supports_vnni, int8_backend_available, load_int8
from training import quantize
from training.checkpoint import load_archive_model
from training.timing import measure

PRECISIONS = ("fp32", "bf16", "int8")
PARALLEL_TIMEOUT_S = 900  # one parallel measurement, loading included


def int8_model(model: torch.nn.Module, info, image_size, tmp: Path) -> tuple[torch.nn.Module, str]:
    """The archive's int8 program, else this model quantized here the export's way on random inputs."""
    entry = info.meta.get("int8") or {}
    example = torch.zeros(1, 3, *image_size)
    if entry.get("status") in INT8_SERVABLE:
        path = tmp / quantize.FILE
        path.write_bytes(info.read(entry["file"]))
        what = "the archive's int8 model" if entry["status"] == "passed" else "the archive's int8 model, built for timing (not gated)"
        return load_int8(path, example), what
    torch.manual_seed(0)
    batches = [torch.randn(32, 3, *image_size) for _ in range(4)]  # (B, 3, H, W): sets the speed, not the accuracy
    q = quantize.quantize_int8(info.meta["arch"], len(info.classes()), model.state_dict(), batches)
    path = tmp / quantize.FILE  # through TorchScript's file, as the handler gets it
    quantize.save_int8(q, path)
    return load_int8(path, example), "quantized here (training.quantize) on random calibration inputs: speed only"


def as_timed(precision: str, model: torch.nn.Module, int8: torch.nn.Module | None, x: torch.Tensor):
    """(module, input) for `precision`: the int8 program with a channels_last input, as the handler
    sends it; else the one float module, bf16 in channels_last (oneDNN's layout), fp32 in the plain one."""
    if precision == "int8":
        return int8, x.contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
    return model.to(memory_format=layout), x.contiguous(memory_format=layout)


def one_process(archive: Path, int8_file: Path | None, precision: str, batch_size: int, seconds: float) -> dict:
    """One of the parallel processes (--one): one thread, its model loaded and warm; prints `ready`
    and waits for a line on stdin, so that all of them are timed at once."""
    torch.set_num_threads(1)
    model, info = load_archive_model(archive)
    height, width = info.meta["image_size"]
    int8 = load_int8(int8_file, torch.zeros(1, 3, height, width)) if precision == "int8" else None
    m, x = as_timed(precision, model, int8, torch.randn(batch_size, 3, height, width))
    measure(m, x, bf16=precision == "bf16", seconds=0.5)  # warm
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    res = measure(m, x, bf16=precision == "bf16", seconds=seconds, warmup=0)
    return res | {"started": started, "ended": time.time()}


def parallel(archive: Path, int8_file: Path, precision: str, batch_size: int, *, processes: int, seconds: float) -> dict:
    """`processes` one-thread processes timing the model at the same time: their images/s summed."""
    cmd = [sys.executable, "-m", "bench.ceiling", "--one", precision, "--archive", str(archive), "--int8-file", str(int8_file),
           "--batch-sizes", str(batch_size), "--seconds", str(seconds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]

    def kill_all():
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    watchdog = threading.Timer(PARALLEL_TIMEOUT_S, kill_all)  # a process stuck loading never hangs the bench
    watchdog.start()
    try:
        for proc in procs:  # all loaded and warm
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bench.ceiling --one {precision} did not get ready (killed after {PARALLEL_TIMEOUT_S}s, or failed)")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        each = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench.ceiling --one {precision} exited {proc.returncode}")
            each.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        watchdog.cancel()
        kill_all()
        for proc in procs:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
    overlap = min(r["ended"] for r in each) - max(r["started"] for r in each)
    total = sum(r["images_per_s"] for r in each)
    return {"precision": precision, "batch_size": batch_size, "processes": processes, "threads_each": 1,
            "images_per_s": round(total, 2), "batch_ms": round(statistics.mean(r["batch_ms"] for r in each), 2),
            "images_per_cpu_s": round(total / max(sum(r["cpu_s"] / (r["ended"] - r["started"]) for r in each), 1e-9), 2),
            "overlap_share": round(overlap / max(r["ended"] - r["started"] for r in each), 3), "each": each}


def run(archive: Path, *, batch_sizes: list[int], seconds: float, threads: int | None, rounds: int = 1,
        processes: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, info = load_archive_model(archive)
    height, width = info.meta["image_size"]
    tmp = tempfile.TemporaryDirectory(prefix="bench-int8-")
    int8, int8_source = int8_model(model, info, (height, width), Path(tmp.name))  # its file stays for `parallel`
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(rounds):
        for bs in batch_sizes:
            for precision in PRECISIONS:  # interleaved: a busy machine slows the three alike
                m, x = as_timed(precision, model, int8, torch.randn(bs, 3, height, width))  # (B, 3, H, W), normalized
                runs.setdefault((precision, bs), []).append(measure(m, x, bf16=precision == "bf16", seconds=seconds))
    results = []
    for bs in batch_sizes:
        for precision in PRECISIONS:
            rs = runs[(precision, bs)]
            r = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            results.append({"precision": precision, "batch_size": bs, **r, "rounds": len(rs)})
            print(f"  ceiling {precision} bs={bs}: {r['images_per_s']:.1f} images/s", flush=True)
    processes = processes if processes is not None else len(os.sched_getaffinity(0))
    parallel_rows = []
    try:
        for precision in PRECISIONS if processes > 1 else ():
            r = parallel(archive, Path(tmp.name) / quantize.FILE, precision, max(batch_sizes), processes=processes, seconds=seconds)
            parallel_rows.append(r)
            print(f"  ceiling {precision} bs={max(batch_sizes)}, {processes} processes x 1 thread: {r['images_per_s']:.1f} images/s", flush=True)
    finally:
        tmp.cleanup()
    by = {(r["precision"], r["batch_size"]): r for r in results}
    served, _, _ = served_precision("auto", info.meta, device_type="cpu", bf16_native=cpu_supports_bf16(),
                                    int8_backend=int8_backend_available(), vnni=cpu_supports_vnni())
    best_by_precision = {p: max((r for r in results + parallel_rows if r["precision"] == p), key=lambda r: r["images_per_s"])
                         for p in PRECISIONS}
    return {
        "bench": "ceiling", "archive": str(archive), "arch": info.meta.get("arch"),
        "image_size": [height, width], "torch_threads": torch.get_num_threads(),
        "int8_source": int8_source, "results": results, "parallel": parallel_rows,
        "best": max(results + parallel_rows, key=lambda r: r["images_per_s"]),
        "best_per_cpu": max(results, key=lambda r: r["images_per_cpu_s"]),
        "best_by_precision": best_by_precision,
        "served_precision": served, "best_served": best_by_precision[served],
        "int8_vs_bf16": {bs: round(by[("int8", bs)]["images_per_s"] / by[("bf16", bs)]["images_per_s"], 2) for bs in batch_sizes},
        "int8_vs_fp32": {bs: round(by[("int8", bs)]["images_per_s"] / by[("fp32", bs)]["images_per_s"], 2) for bs in batch_sizes},
        # per CPU-second: what other load on a shared machine disturbs less
        "int8_vs_bf16_per_cpu": {bs: round(by[("int8", bs)]["images_per_cpu_s"] / by[("bf16", bs)]["images_per_cpu_s"], 2)
                                 for bs in batch_sizes},
    }


def print_results(res: dict) -> None:
    h, w = res["image_size"]
    common.print_table(f"model ceiling: {res['arch']} at {h}x{w}, in-process, {res['torch_threads']} threads",
                       ["precision", "batch", "images/s", "ms/batch", "images/CPU-s"],
                       [[r["precision"], r["batch_size"], r["images_per_s"], r["batch_ms"], r["images_per_cpu_s"]] for r in res["results"]])
    for r in res.get("parallel", []):
        print(f"{r['precision']} batch {r['batch_size']}, {r['processes']} processes x 1 thread at once: {r['images_per_s']} images/s "
              f"({r['batch_ms']} ms a batch each)")
    print(f"int8 ({res['int8_source']}) / bf16 by batch size: {res['int8_vs_bf16']} (per CPU-second "
          f"{res['int8_vs_bf16_per_cpu']}); int8 / fp32: {res['int8_vs_fp32']}; "
          f"precision: auto serves {res['served_precision']} here", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random one of training.train's default network, made now)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to time")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per configuration")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved grid; each figure the median")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=None, help="folder for ceiling.json (default: runs/bench/<time>)")
    parser.add_argument("--processes", type=int, default=None,
                        help="one-thread processes for the parallel figure (default: one per core; 1: none)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per configuration")
    parser.add_argument("--one", choices=PRECISIONS, help=argparse.SUPPRESS)  # one of the parallel processes
    parser.add_argument("--int8-file", type=Path, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.one:
        res = one_process(args.archive, args.int8_file, args.one, args.batch_sizes[0], args.seconds)
        print(json.dumps(res))
        return res
    out = args.out or common.default_out()
    seconds = 1.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        res = run(archive, batch_sizes=args.batch_sizes, seconds=seconds, threads=args.threads, rounds=args.rounds,
                  processes=args.processes)
    res |= common.run_context(quick=args.quick)
    print_results(res)
    common.write_json(out / "ceiling.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
