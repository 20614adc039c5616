"""Model ceiling: in-process forward throughput of the archive's model at its served input size.

    python -m bench.ceiling [--archive MAR] [--batch-sizes 1 8 32] [--seconds 4]

No HTTP, no decoding: random input already normalized, under torch.inference_mode(). fp32, and
bf16 via torch.autocast("cpu") + channels_last. The best figure is what serving is measured against.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench import common
from training.checkpoint import load_archive_model


def measure(model: torch.nn.Module, x: torch.Tensor, *, bf16: bool, seconds: float, warmup: int = 2) -> dict:
    """Images/s and mean batch latency of model(x), repeated for about `seconds` after `warmup` runs."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    with torch.inference_mode(), ctx():
        for _ in range(warmup):
            model(x)
        runs, started, cpu0 = 0, time.perf_counter(), time.process_time()
        while True:
            model(x)
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and runs >= 2:
                break
    cpu = time.process_time() - cpu0
    batch = x.shape[0]
    return {"images_per_s": round(runs * batch / elapsed, 2), "batch_ms": round(1000 * elapsed / runs, 2), "runs": runs,
            "cpu_s": round(cpu, 2), "images_per_cpu_s": round(runs * batch / cpu, 2)}


def run(archive: Path, *, batch_sizes: list[int], seconds: float, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, info = load_archive_model(archive)
    height, width = info.meta["image_size"]
    results = []
    for precision in ("fp32", "bf16"):
        m = model.to(memory_format=torch.channels_last) if precision == "bf16" else model.to(memory_format=torch.contiguous_format)
        for bs in batch_sizes:
            x = torch.randn(bs, 3, height, width)  # (B, 3, H, W), already normalized
            if precision == "bf16":
                x = x.contiguous(memory_format=torch.channels_last)
            r = measure(m, x, bf16=precision == "bf16", seconds=seconds)
            results.append({"precision": precision, "batch_size": bs, **r})
            print(f"  ceiling {precision} bs={bs}: {r['images_per_s']:.1f} images/s", flush=True)
    best = max(results, key=lambda r: r["images_per_s"])
    return {
        "bench": "ceiling", "archive": str(archive), "arch": info.meta.get("arch"),
        "image_size": [height, width], "torch_threads": torch.get_num_threads(),
        "results": results, "best": best,
        "best_per_cpu": max(results, key=lambda r: r["images_per_cpu_s"]),
        "best_by_precision": {p: max((r for r in results if r["precision"] == p), key=lambda r: r["images_per_s"])
                              for p in ("fp32", "bf16")},
    }


def print_results(res: dict) -> None:
    h, w = res["image_size"]
    common.print_table(f"model ceiling: {res['arch']} at {h}x{w}, in-process, {res['torch_threads']} threads",
                       ["precision", "batch", "images/s", "ms/batch", "images/CPU-s"],
                       [[r["precision"], r["batch_size"], r["images_per_s"], r["batch_ms"], r["images_per_cpu_s"]] for r in res["results"]])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="model archive (default: a random ResNet-50 one made now)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to time")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=None, help="folder for ceiling.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per configuration")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = args.out or common.default_out()
    seconds = 1.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        archive = args.archive or common.make_bench_archive(Path(tmp))
        res = run(archive, batch_sizes=args.batch_sizes, seconds=seconds, threads=args.threads)
    res |= common.run_context(quick=args.quick)
    print_results(res)
    common.write_json(out / "ceiling.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
