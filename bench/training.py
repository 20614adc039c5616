"""Training throughput: optimizer steps of an architecture at one or more input sizes and batch sizes,
fp32 and bf16 autocast, channels_last, forward + backward + AdamW as training.train does; by default
at training.train's defaults (architecture, size, batch), which these figures helped choose.

    python -m bench.training [--steps 6] [--arch resnet50] [--image-size H W] [--batch-size N]
    nice -n 10 python -m bench.training --image-size 80 60 --image-size 96 72 --image-size 112 84 --batch-size 64 --batch-size 128

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

    num_classes = len(common.refund_categories())
    torch.manual_seed(0)
    model = build_model(arch, num_classes).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch_size, 3, *image_size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    y = torch.randint(0, num_classes, (batch_size,))
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
    parser.add_argument("--image-size", type=int, nargs=2, action="append", default=None, metavar=("H", "W"),
                        help="input size; repeat it to compare several (default: training.train's)")
    parser.add_argument("--batch-size", type=int, action="append", default=None,
                        help="images per step; repeat it to compare several (default: training.train's)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=None, help="folder for training.json (default: runs/bench/<time>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps after 1 warm-up step")
    return parser


def main(args: argparse.Namespace) -> dict:
    from training import train

    defaults = train.get_args_parser()  # the recipe's defaults live in its command line
    arch = args.arch or common.default_arch()  # --arch auto's choice on this machine
    image_sizes = [tuple(s) for s in args.image_size or [defaults.get_default("image_size")]]
    batch_sizes = args.batch_size or [defaults.get_default("batch_size")]
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    results = []
    for image_size in image_sizes:
        for batch_size in batch_sizes:
            for bf16 in (False, True):
                r = measure(arch, image_size=image_size, batch_size=batch_size, steps=steps, warmup=warmup, bf16=bf16)
                what = ""
                if len(image_sizes) > 1 or len(batch_sizes) > 1:
                    r = {"image_size": list(image_size), "batch_size": batch_size, **r}
                    what = f"{image_size[0]}x{image_size[1]} batch {batch_size} "
                results.append(r)
                print(f"  training {what}{r['precision']}: {r['images_per_s']:.1f} images/s ({r['step_s']} s/step)", flush=True)
    image_size, batch_size = image_sizes[0], batch_sizes[0]
    res = {"bench": "training", "arch": arch, "image_size": list(image_size), "batch_size": batch_size,
           "torch_threads": torch.get_num_threads(), "results": results,
           "bf16_speedup": round(results[1]["images_per_s"] / results[0]["images_per_s"], 2),
           **common.run_context(quick=args.quick)}
    if len(results) == 2:
        common.print_table(f"training: {arch} at {image_size[0]}x{image_size[1]}, batch {batch_size}, forward+backward+AdamW step",
                           ["precision", "images/s", "s/step"], [[r["precision"], r["images_per_s"], r["step_s"]] for r in results])
    else:
        common.print_table(f"training: {arch}, forward+backward+AdamW step",
                           ["size", "batch", "precision", "images/s", "s/step"],
                           [[f"{r['image_size'][0]}x{r['image_size'][1]}", r["batch_size"], r["precision"], r["images_per_s"],
                             r["step_s"]] for r in results])
    common.write_json((args.out or common.default_out()) / "training.json", res)
    return res


if __name__ == "__main__":
    common.exit_on_sigterm()
    main(get_args_parser().parse_args())
