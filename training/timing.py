"""The project's one in-process timing loop: images/s of a model on a fixed batch.

training.evaluate's size sweep and the benchmarks (bench.ceiling, bench.serving) use it, so the
figures in the model card and in BENCHMARKS.md are measured the same way.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch


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
