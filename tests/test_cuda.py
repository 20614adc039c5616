"""The CUDA paths of training and of the handler. Skipped where there is no GPU (CI has none);
on a GPU box run them with the handler and training tests (bench/README.md, "On a GPU")."""
from __future__ import annotations

import json

import pytest
import torch

from support import TINY, make_handler, run_train
from training import prepare as prepare_mod
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_train_on_cuda_then_resume(sample_catalogue, tmp_path):
    """The uint8 cache and augmentation on the GPU, AMP, class weights on the GPU; a CPU-loadable checkpoint."""
    prepared = tmp_path / "prepared"
    prepare_mod.prepare(sample_catalogue, prepared)
    run = tmp_path / "run"
    common = ["--data-dir", str(prepared), "--out", str(run), "--device", "cuda", "--class-weights", "sqrt", "--patience", "99", *TINY]
    run_train(*common, "--epochs", "2")
    run_train(*common, "--epochs", "3", "--resume", str(run))
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_acc"] > 0.2  # 10 classes: it learns, not just runs
    ckpt = load_checkpoint(run)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_train_other_and_ema_on_cuda(tmp_path):
    """The out-of-category class and the EMA with the cache on the GPU; CPU-loadable state_dicts."""
    from training import make_sample_catalogue

    catalogue = tmp_path / "catalogue"
    make_sample_catalogue.write_catalogue(catalogue, per_class=30, seed=0, outside_per_class=30)
    run = tmp_path / "run"
    common = ["--data-dir", str(catalogue), "--out", str(run), "--device", "cuda", "--ema-decay", "0.9",
              "--other-per-epoch", "20", "--patience", "99", *TINY]
    run_train(*common, "--epochs", "2")
    run_train(*common, "--epochs", "3", "--resume", str(run))
    ckpt = load_checkpoint(run)
    assert ckpt["classes"][-1] == "other" and [h["train_images"] for h in ckpt["history"]] == [132 + 20] * 3
    assert all(t.device.type == "cpu" for sd in (ckpt["model"], ckpt["ema"]) for t in sd.values())
    assert "ema_val_outside_answered_other" in ckpt["history"][-1]


def test_handler_on_cuda_agrees_with_cpu(extracted_archive, unseen_images):
    gpu, gpu_ctx = make_handler(extracted_archive, "0")
    cpu, cpu_ctx = make_handler(extracted_archive, None)
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    good = [{"body": p.read_bytes()} for p in sorted((unseen_images / "images").glob("*.jpg"))]
    data = good + [{"body": b"not an image"}]
    a, b = gpu.handle(data, gpu_ctx), cpu.handle(data, cpu_ctx)
    assert "error" in a[-1] and "error" in b[-1]  # a bad image is named on the GPU too, the batch goes on
    assert gpu_ctx.statuses[len(good)][0] == 400
    agree = sum(x["label"] == y["label"] for x, y in zip(a[:-1], b[:-1])) / len(good)
    assert agree >= 0.9, agree
    assert max(abs(x["confidence"] - y["confidence"]) for x, y in zip(a[:-1], b[:-1])) < 0.05
