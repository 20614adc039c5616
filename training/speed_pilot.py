"""Measure training throughput (images/s) of an arch at several input sizes and batch sizes.

    nice -n 10 python -m training.speed_pilot --arch resnet50 --sizes 80x60 96x72 112x84 --batch-sizes 128

Random inputs, a few SGD steps each, median step time after two warm-up steps; used to pick
`training.train`'s default input size and batch size (docs/MODEL_CARD.md).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from handler.refund_model import build_model, cpu_supports_bf16


def images_per_s(arch: str, size: tuple[int, int], batch: int, amp: bool, steps: int = 6) -> float:
    model = build_model(arch, 30).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    y = torch.randint(0, 30, (batch,))
    times = []
    for _ in range(steps):
        t = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.monotonic() - t)
    timed = sorted(times[2:])
    return batch / timed[len(timed) // 2]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=str, default="resnet50", help="model to time")
    parser.add_argument("--sizes", type=str, nargs="+", default=["80x60", "96x72", "112x84"], help="HxW input sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128], help="batch sizes")
    parser.add_argument("--amp", type=str, default="auto", choices=["auto", "on", "off", "both"], help="bf16 autocast")
    return parser


def main(args: argparse.Namespace) -> None:
    amps = {"auto": [cpu_supports_bf16()], "on": [True], "off": [False], "both": [True, False]}[args.amp]
    print(f"threads {torch.get_num_threads()}")
    for size in args.sizes:
        h, w = map(int, size.split("x"))
        for batch in args.batch_sizes:
            for amp in amps:
                print(f"{args.arch} {h}x{w} batch {batch} bf16={amp}: {images_per_s(args.arch, (h, w), batch, amp):.1f} images/s", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
