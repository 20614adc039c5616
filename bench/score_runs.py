"""Score training runs on a prepared split, on any device: top-1 and macro-F1 on val and test, and
the coverage at 98 % precision (threshold on val by the raw top probability, then applied to test).

    python -m bench.score_runs --data-dir PREPARED --runs RUN [RUN ...] [--out summary.json]

A lighter `training.evaluate` for a machine that holds only the split's images (bench/gpu_check.sh
on a lent GPU): no calibration fit, no figures, no out-of-category set. Prints one line per run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training import prepare as prepare_mod
from training.evaluate import at_threshold, load_run, review_threshold
from training.metrics import confusion, macro_f1
from training.train import CHECKPOINT, load_images, predict


def score_run(run: Path, data_dir: Path, *, device: torch.device, batch_size: int = 512) -> dict:
    ckpt, model = load_run(run)
    classes, pre = ckpt["classes"], ckpt["preprocess"]
    model = model.to(device)
    history = ckpt["history"]
    out = {"epochs": len(history), "best_epoch": ckpt["epoch"], "minutes": round(history[-1]["elapsed_s"] / 60, 2),
           "train_acc_last": round(history[-1]["train_acc"], 4)}
    confidence, correct = {}, {}
    for split in ("val", "test"):
        records = prepare_mod.read_manifest(data_dir / f"{split}.csv")
        y = torch.tensor([classes.index(r.label) for r in records])
        x = load_images(records, tuple(pre["image_size"]), desc=split)
        logits = predict(model, x, batch_size=batch_size, device=device, amp=False, mean=pre["mean"], std=pre["std"])
        confidence[split], pred = logits.softmax(1).max(1)
        correct[split] = pred == y
        out[f"{split}_top1"] = round(float(correct[split].double().mean()), 4)
        out[f"{split}_macro_f1"] = round(macro_f1(confusion(pred, y, len(classes))), 4)
    cut = review_threshold(confidence["val"], correct["val"])
    test = at_threshold(confidence["test"], correct["test"], cut["threshold"])
    out |= {"threshold": round(cut["threshold"], 4), "val_coverage": round(cut["coverage"], 4),
            "test_coverage": round(test["coverage"], 4), "test_precision": round(test["precision_accepted"], 4)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder training.prepare wrote for these runs")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders holding a checkpoint.pt")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary = {}
    for run in args.runs:
        if not (run / CHECKPOINT).is_file():
            print(f"{run.name}: no {CHECKPOINT}, skipped", flush=True)
            continue
        summary[run.name] = score_run(run, args.data_dir, device=device)
        print(run.name, summary[run.name], flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
