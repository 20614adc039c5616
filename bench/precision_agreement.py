"""Top-1 agreement of bf16 (autocast + channels_last, as the handler runs it) with fp32.

    # a training run, on its validation split (its prepared val.csv), the gate for `precision: auto`
    python -m bench.precision_agreement --run runs/fashion
    # an exported archive, on a catalogue's images
    python -m bench.precision_agreement --archive model_store/refund_classifier-2.mar --data-dir DIR
    # no trained model yet: a random-init network of the production shape
    python -m bench.precision_agreement --arch resnet50 --random-init --data-dir DIR --limit 512

Both passes see the same uint8 cache (training.engine.load_images, the handler's decode) and the
same normalize; only the arithmetic differs. Prints one JSON object; exits 1 when the agreement
is below --min-agreement (the issue's bar: 99.5%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from handler.refund_inference import calibrated_probs, calibration, class_bias, label_bias, served_labels
from handler.refund_model import build_model, cpu_supports_bf16
from handler.refund_preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from serving.archive import ArchiveError
from training import prepare as prepare_mod
from training.catalogue import Item, list_items
from training.checkpoint import CheckpointError, fitted_calibration, load_archive_model, load_run
from training.engine import load_images


class BenchError(RuntimeError):
    pass


def run_source(run: Path) -> dict:
    """What to measure from a training run: its model, preprocessing, fitted calibration and prepared splits."""
    ckpt, model = load_run(run)
    data = Path(ckpt.get("data_dir") or "")  # the folder training.prepare wrote: train/val/test.csv
    splits = {name: [Item(id=r.id, label=r.label, path=Path(r.path)) for r in prepare_mod.read_manifest(data / f"{name}.csv")]
              for name in ("train", "val", "test") if (data / f"{name}.csv").is_file()}
    calib = fitted_calibration(run) or ckpt.get("calibration", {})  # training.evaluate's, as exported into the archive
    return {
        "model": model, "arch": ckpt["model_config"]["arch"], "classes": ckpt["classes"],
        # the size the calibration was fitted (and the archive is served) at; older files: the training size
        "image_size": tuple(calib.get("image_size", ckpt["preprocess"]["image_size"])), "mean": tuple(ckpt["preprocess"]["mean"]),
        "std": tuple(ckpt["preprocess"]["std"]), "calibration": calib, "splits": splits,
    }


def archive_source(mar: Path) -> dict:
    """The same from an exported archive (its model_meta.json carries preprocessing and calibration)."""
    model, archive = load_archive_model(mar)
    meta = archive.meta
    return {
        "model": model, "arch": meta["arch"], "classes": archive.classes(),
        "image_size": tuple(meta["image_size"]), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
        "calibration": meta, "splits": {},
    }


@torch.inference_mode()
def logits_of(model, x: torch.Tensor, *, bf16: bool, batch_size: int) -> tuple[torch.Tensor, float]:
    """(N, C) float32 logits and seconds per image, the way the handler computes them."""
    out, started = [], time.perf_counter()
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            out.append(model(xb).float())
    return torch.cat(out), (time.perf_counter() - started) / max(len(x), 1)


def measure(args: argparse.Namespace) -> dict:
    if args.run:
        src = run_source(args.run)
    elif args.archive:
        src = archive_source(args.archive)
    elif args.random_init:
        src = {"model": None, "arch": args.arch, "classes": None, "image_size": tuple(args.image_size),
               "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "calibration": {}, "splits": {}}
    else:
        raise BenchError("give --run, --archive or --random-init")
    if args.split == "auto":
        args.split = "val" if args.run and not args.data_dir else "all"
    if args.split == "all":
        if args.data_dir is None:
            raise BenchError("--split all needs --data-dir (a Kaggle-layout catalogue)")
        items, _ = list_items(args.data_dir)
    elif args.split in src["splits"]:
        items = src["splits"][args.split]
    else:
        raise BenchError(f"--split {args.split} needs a --run whose prepared manifests (train/val/test.csv) still exist; "
                         "or use --split all with --data-dir")
    if args.limit:
        items = items[:args.limit]
    if not items:
        raise BenchError(f"no images selected (split {args.split})")
    classes = src["classes"] or sorted({it.label for it in items})

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = src["model"] if src["model"] is not None else build_model(src["arch"], len(classes))  # random init: seeded
    model = model.eval().to(memory_format=torch.channels_last)
    temperature, _ = calibration(src["calibration"])
    bias = class_bias(src["calibration"], len(classes))
    lbias = label_bias(src["calibration"], len(classes))

    x = normalize(load_images(items, src["image_size"]), mean=src["mean"], std=src["std"])  # (N, 3, H, W)
    fp32, t32 = logits_of(model, x, bf16=False, batch_size=args.batch_size)
    bf16, t16 = logits_of(model, x, bf16=True, batch_size=args.batch_size)
    p32, p16 = calibrated_probs(fp32, temperature, bias), calibrated_probs(bf16, temperature, bias)
    top32, top16 = served_labels(p32, lbias), served_labels(p16, lbias)
    to_index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([to_index.get(it.label, -1) for it in items])
    known = labels >= 0
    result = {
        "source": str(args.run or args.archive or f"random-init {args.arch}"),
        "split": args.split, "images": len(items), "arch": src["arch"], "image_size": list(src["image_size"]),
        "cpu_bf16_native": cpu_supports_bf16(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "top1_agreement": round((top32 == top16).float().mean().item(), 6),
        "disagreements": int((top32 != top16).sum()),
        "max_abs_dp": round((p32 - p16).abs().max().item(), 6),
        "mean_abs_dconfidence": round((p32.gather(1, top32[:, None]) - p16.gather(1, top32[:, None])).abs().mean().item(), 6),
        "fp32_ms_per_image": round(t32 * 1000, 3), "bf16_ms_per_image": round(t16 * 1000, 3),
    }
    if src["model"] is not None and bool(known.any()):
        result["fp32_top1_acc"] = round((top32[known] == labels[known]).float().mean().item(), 6)
        result["bf16_top1_acc"] = round((top16[known] == labels[known]).float().mean().item(), 6)
    result["min_agreement"] = args.min_agreement
    result["pass"] = result["top1_agreement"] >= args.min_agreement
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, default=None, help="training run folder (checkpoint.pt; its prepared data/ manifests)")
    src.add_argument("--archive", type=Path, default=None, help="exported .mar")
    src.add_argument("--random-init", action="store_true", help="an untrained --arch network (smoke measurement)")
    parser.add_argument("--arch", type=str, default="resnet50", help="architecture for --random-init")
    parser.add_argument("--image-size", type=int, nargs=2, default=[80, 64], metavar=("H", "W"), help="input size for --random-init")
    parser.add_argument("--data-dir", type=Path, default=None, help="Kaggle-layout catalogue (with --split all)")
    parser.add_argument("--split", type=str, default="auto", choices=["auto", "val", "test", "train", "all"],
                        help="which images: val/train need --run; auto = val for --run, else all")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (the archive's batchSize)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init weights")
    parser.add_argument("--min-agreement", type=float, default=0.995, help="exit 1 below this top-1 agreement")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        result = measure(args)
    except (BenchError, CheckpointError, ArchiveError) as exc:
        print(f"precision_agreement: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
