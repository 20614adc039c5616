"""Train the refund classifier on a Kaggle-layout catalogue.

    python -m training.train --data-dir runs/sample --out runs/demo --epochs 3

Writes RUN/checkpoint.pt (a dict of state_dicts + model config + class names +
preprocessing; never a pickled model), RUN/split.json and RUN/history.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from handler.refund_model import available_archs, build_model, cpu_supports_bf16
from handler.refund_preprocess import IMAGENET_MEAN, IMAGENET_STD, load_for_model, normalize
from training.catalogue import Item, list_items

logger = logging.getLogger("training.train")
CHECKPOINT = "checkpoint.pt"


def stratified_split(items: list[Item], val_frac: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Per class, shuffle with `seed` and hold out round(val_frac * n) (at least 1 when n >= 2)."""
    rng = random.Random(seed)
    by_label: dict[str, list[Item]] = {}
    for item in sorted(items, key=lambda it: it.id):
        by_label.setdefault(item.label, []).append(item)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = max(1, round(val_frac * len(group))) if len(group) >= 2 else 0
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def load_images(items: list[Item], image_size: tuple[int, int]) -> torch.Tensor:
    """Decode every image once into a uint8 cache (N, 3, H, W): the same calls the handler makes."""
    out = torch.empty((len(items), 3, *image_size), dtype=torch.uint8)
    for i, item in enumerate(tqdm(items, desc="decode", leave=False, mininterval=1.0, disable=None)):
        out[i] = load_for_model(item.path.read_bytes(), image_size)
    return out


def augment(batch: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip of a uint8 (B, 3, H, W) batch."""
    flip = torch.rand(batch.shape[0]) < 0.5
    batch = batch.clone()
    batch[flip] = batch[flip].flip(-1)
    return batch


def autocast_for(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, optimizer, scheduler, criterion, images, labels, *, batch_size, device, amp, mean, std, epoch):
    model.train()
    order = torch.randperm(len(labels))
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}", leave=False, mininterval=1.0, disable=None)
    for start in bar:
        idx = order[start:start + batch_size]
        x = normalize(augment(images[idx]), mean=mean, std=std).to(device, memory_format=torch.channels_last)
        y = labels[idx].to(device)
        with autocast_for(device, amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model, criterion, images, labels, *, batch_size, device, amp, mean, std) -> dict:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size], mean=mean, std=std).to(device, memory_format=torch.channels_last)
        y = labels[start:start + batch_size].to(device)
        with autocast_for(device, amp):
            logits = model(x).float()
        total_loss += criterion(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    n = max(len(labels), 1)
    return {"val_loss": total_loss / n, "val_acc": correct / n}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="Kaggle-layout catalogue (styles.csv + images/)")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write the checkpoint and history into")
    parser.add_argument("--arch", type=str, default="resnet50", help="classifier architecture (torchvision name or tinynet)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--image-size", type=int, nargs=2, default=[80, 64], metavar=("H", "W"), help="model input size")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--val-frac", type=float, default=0.15, help="share of each class held out for validation")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--amp", type=str, default="auto", choices=["auto", "on", "off"], help="bf16 autocast on CPU / fp16 on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split, init and order")
    return parser


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.arch not in available_archs():
        raise SystemExit(f"Invalid --arch {args.arch!r}; choose one of: {', '.join(available_archs())}")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    amp = {"on": True, "off": False, "auto": device.type == "cuda" or cpu_supports_bf16()}[args.amp]
    image_size = tuple(args.image_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    items, skipped = list_items(args.data_dir)
    if not items:
        raise SystemExit(f"no usable images in {args.data_dir} (dropped: {skipped})")
    classes = sorted({it.label for it in items})
    train_items, val_items = stratified_split(items, args.val_frac, args.seed)
    logger.info("%d images in %d classes: %d train, %d val; dropped %s", len(items), len(classes), len(train_items), len(val_items), skipped)
    to_index = {c: i for i, c in enumerate(classes)}
    train_x, val_x = load_images(train_items, image_size), load_images(val_items, image_size)
    train_y = torch.tensor([to_index[it.label] for it in train_items])
    val_y = torch.tensor([to_index[it.label] for it in val_items])

    model_config = {"arch": args.arch, "num_classes": len(classes)}
    model = build_model(**model_config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * -(-len(train_y) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(steps, 1), pct_start=0.2)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split.json").write_text(json.dumps({
        "data_dir": str(args.data_dir), "train": [it.id for it in train_items], "val": [it.id for it in val_items],
    }))
    history = []
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        row = {"epoch": epoch}
        row |= train_one_epoch(model, optimizer, scheduler, criterion, train_x, train_y, batch_size=args.batch_size,
                               device=device, amp=amp, mean=mean, std=std, epoch=epoch)
        row |= evaluate(model, criterion, val_x, val_y, batch_size=128, device=device, amp=amp, mean=mean, std=std)
        row["elapsed_s"] = round(time.time() - started, 1)
        history.append(row)
        logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})

    checkpoint = {
        "model": {k: v.contiguous() for k, v in model.state_dict().items()},
        "model_config": model_config,
        "classes": classes,
        "preprocess": {"image_size": list(image_size), "mean": list(mean), "std": list(std)},
        "calibration": {"temperature": 1.0, "review_threshold": 0.5},
        "history": history,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    torch.save(checkpoint, args.out / CHECKPOINT)
    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    logger.info("saved %s (val_acc %.4f)", args.out / CHECKPOINT, history[-1]["val_acc"] if history else float("nan"))
    return args.out / CHECKPOINT


if __name__ == "__main__":
    main(get_args_parser().parse_args())
