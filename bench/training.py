"""Training throughput: a few optimizer steps of the default architecture at the default image size
and batch size (training.train's defaults), fp32 and bf16 autocast, channels_last, as training.train does.

    python -m bench.training [--steps 6] [--arch resnet50] [--image-size H W] [--batch-size N]

Random data already normalized: this is the model's speed, not the data pipeline's.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bench import common


def measure(arch: str, *, image_size: tuple[int, int], batch_size: int, steps: int, warmup: int, bf16: bool) -> dict:
    from handler.refund_model import build_model

    torch.manual_seed(0)
    model = build_model(arch, len(common.REFUND_CATEGORIES)).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch_size, 3, *image_size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    y = torch.randint(0, len(common.REFUND_CATEGORIES), (batch_size,))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with ctx():
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    total = sum(times)
    return {"precision": "bf16" if bf16 else "fp32", "steps": steps, "step_s": round(total / steps, 3),
            "images_per_s": round(steps * batch_size / total, 2)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=str, default=None, help="architecture (default: training.train's)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: training.train's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: training.train's")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=None, help="folder for training.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps after 1 warm-up step")
    return parser


def main(args: argparse.Namespace) -> dict:
    from training import train

    defaults = train.get_args_parser()
    arch = args.arch or defaults.get_default("arch")
    image_size = tuple(args.image_size or defaults.get_default("image_size"))
    batch_size = args.batch_size or defaults.get_default("batch_size")
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    results = []
    for bf16 in (False, True):
        r = measure(arch, image_size=image_size, batch_size=batch_size, steps=steps, warmup=warmup, bf16=bf16)
        results.append(r)
        print(f"  training {r['precision']}: {r['images_per_s']:.1f} images/s ({r['step_s']} s/step)", flush=True)
    res = {"bench": "training", "arch": arch, "image_size": list(image_size), "batch_size": batch_size,
           "torch_threads": torch.get_num_threads(), "results": results,
           "bf16_speedup": round(results[1]["images_per_s"] / results[0]["images_per_s"], 2),
           **common.run_context(quick=args.quick)}
    common.print_table(f"training: {arch} at {image_size[0]}x{image_size[1]}, batch {batch_size}, forward+backward+AdamW step",
                       ["precision", "images/s", "s/step"], [[r["precision"], r["images_per_s"], r["step_s"]] for r in results])
    common.write_json((args.out or common.default_out()) / "training.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
