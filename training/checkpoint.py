"""The run folder and its checkpoint format: the one place that writes and reads them.

A run folder (`training.train --out RUN`) holds:
  checkpoint.pt  the kept epoch (--keep best: the best by val macro-F1; last: the annealed end):
                 a dict of state_dicts + plain config, never a pickled model:
                   model           the state_dict (CPU tensors)
                   ema             the EMA of the weights at that epoch (--ema-decay > 0 only)
                   model_config    {"arch", "num_classes"}: build_model(**model_config) rebuilds it
                   classes         class names, index order; the out-of-category class OTHER_LABEL
                                   last when the run learned it (--other class)
                   preprocess      {"image_size": [H, W], "mean": [...], "std": [...]}: the training size
                   calibration     defaults; training.evaluate fits the real ones into calibration.json
                   manifest_hash, data_dir   the prepared split it was trained on (training.prepare);
                                   the hash covers the --extra-data photos trained too
                   extra_data      per --extra-data folder: photos trained, rows skipped by reason
                   class_counts    training images per class and epoch (the prior calibration uses)
                   epoch, best, last, keep, ema_decay, history, args
                 Runs from before `ema`, `class_counts`, `keep`, `last` and `extra_data` lack them and load as before.
  last.pt        the latest epoch plus optimizer state, step, time used and RNG states, for --resume
  history.csv / history.json   one row per epoch
  train_manifest.csv           every photo the run trains on: id,label,path,sha256,source (label:
                               the class it is trained as, `other` for the out-of-category pool;
                               source: the manifest or --extra-data styles.csv it came from)
  calibration.json             written by training.evaluate, read by training.export
  eval-sizes/metrics.json      training.evaluate --sizes: the val sweep over served sizes

Loading is always `torch.load(..., map_location="cpu", weights_only=True)` and a rebuild from
`model_config` with the handler's `build_model`, so a run loads on any machine and with any
version of this code that keeps these keys.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import nn

from handler.refund_model import build_model
from serving.archive import read_archive

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
CALIBRATION = "calibration.json"
SIZE_SWEEP = Path("eval-sizes") / "metrics.json"
TRAIN_MANIFEST = "train_manifest.csv"
TRAIN_MANIFEST_FIELDS = ("id", "label", "path", "sha256", "source")
DEFAULT_CALIBRATION = {"temperature": 1.0, "review_threshold": 0.5}
# Which of a checkpoint's state_dicts to use: auto = the EMA where the run kept one.
EMA_CHOICES = ("auto", "on", "off")


class CheckpointError(RuntimeError):
    pass


# -- writing ---------------------------------------------------------------------------------

def cpu_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def preprocess_dict(image_size, mean, std) -> dict:
    return {"image_size": list(image_size), "mean": list(mean), "std": list(std)}


def checkpoint_dict(model, *, model_config, classes, image_size, mean, std, manifest_hash, data_dir, history, args,
                    epoch, best, ema: nn.Module | None = None, extra: dict | None = None) -> dict:
    """`extra`: plain values stored as they are (class_counts, keep, ema_decay, last)."""
    out = {
        "model": cpu_state_dict(model),
        "model_config": model_config,
        "classes": classes,
        "preprocess": preprocess_dict(image_size, mean, std),
        "calibration": dict(DEFAULT_CALIBRATION),  # training.evaluate fits the real ones
        "manifest_hash": manifest_hash,
        "data_dir": str(data_dir),
        "epoch": epoch,
        "best": best,
        "history": history,
        "args": {k: _plain(v) for k, v in vars(args).items()},
        **(extra or {}),
    }
    if ema is not None:
        out["ema"] = cpu_state_dict(ema)
    return out


def _plain(value):
    """An argument as torch.load(weights_only=True) reads it back: paths (also in a list) as strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def untrained_checkpoint_dict(model, *, model_config, classes, image_size, mean, std, note: str) -> dict:
    """A checkpoint of a model nobody trained (the benchmarks' archive): no data, no history."""
    return {
        "model": cpu_state_dict(model),
        "model_config": model_config,
        "classes": list(classes),
        "preprocess": preprocess_dict(image_size, mean, std),
        "calibration": dict(DEFAULT_CALIBRATION),
        "history": [],
        "args": {"arch": model_config["arch"], "image_size": list(image_size), "note": note},
    }


def save_atomic(obj, path: Path) -> None:
    """torch.save to PATH.partial, then rename: a reader never sees half a checkpoint."""
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, partial)
    partial.replace(path)


def write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        fields = list(dict.fromkeys(k for row in history for k in row))
        with open(out / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(history)


def write_train_manifest(out: Path, rows: list[dict]) -> None:
    """RUN/train_manifest.csv: one row per training photo (TRAIN_MANIFEST_FIELDS), written whole or not at all."""
    path = Path(out) / TRAIN_MANIFEST
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=TRAIN_MANIFEST_FIELDS)
        w.writeheader()
        w.writerows({k: str(row[k]) for k in TRAIN_MANIFEST_FIELDS} for row in rows)
    partial.replace(path)


# -- reading ---------------------------------------------------------------------------------

def read_train_manifest(run: Path) -> list[dict]:
    """RUN/train_manifest.csv as dicts; [] for a run from before it was written."""
    path = Path(run) / TRAIN_MANIFEST
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file, or a run folder's checkpoint.pt, as a dict of CPU tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train first (python -m training.train --out {path.parent} ...)")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from(model_config: dict, state: dict) -> nn.Module:
    """The one rebuild: build_model(**model_config), then its weights; eval mode."""
    model = build_model(**model_config)
    model.load_state_dict(state)
    return model.eval()


def weights_key(ckpt: dict, ema: str = "auto") -> str:
    """The state_dict to use: "ema" (on, or auto where the run kept one) or "model"."""
    if ema not in EMA_CHOICES:
        raise CheckpointError(f"Invalid --ema {ema!r}; choose one of: {', '.join(EMA_CHOICES)}")
    if ema == "on" and "ema" not in ckpt:
        raise CheckpointError("--ema on: this run kept no EMA weights (train with --ema-decay D > 0)")
    return "ema" if ema == "on" or (ema == "auto" and "ema" in ckpt) else "model"


def load_run(run: Path, *, ema: str = "auto") -> tuple[dict, nn.Module]:
    """-> (checkpoint dict, its model in eval mode, channels_last) of a run folder; the EMA weights
    where the run kept them (ema="auto") or asked for ("on"). ckpt["weights"] says which: raw | ema."""
    ckpt = load_checkpoint(Path(run) / CHECKPOINT)
    key = weights_key(ckpt, ema)
    model = model_from(ckpt["model_config"], ckpt[key])
    ckpt["weights"] = "ema" if key == "ema" else "raw"
    return ckpt, model.to(memory_format=torch.channels_last)


def size_sweep(run: Path) -> dict | None:
    """RUN/eval-sizes/metrics.json (training.evaluate --sizes), None when the run has none."""
    path = Path(run) / SIZE_SWEEP
    return json.loads(path.read_text()) if path.is_file() else None


def served_size(run: Path, ckpt: dict, serve_size=None) -> tuple[int, int]:
    """The input size to calibrate, evaluate and serve at: `serve_size` (--serve-size), else the
    best on val of a recorded size sweep, else the training size."""
    if serve_size:
        return tuple(int(v) for v in serve_size)
    sweep = size_sweep(run)
    if sweep and sweep.get("best"):
        return tuple(int(v) for v in sweep["best"])
    return tuple(ckpt["preprocess"]["image_size"])


def fitted_calibration(run: Path) -> dict | None:
    """RUN/calibration.json (training.evaluate's fit), None when the run has none."""
    path = Path(run) / CALIBRATION
    return json.loads(path.read_text()) if path.is_file() else None


def load_archive_model(mar: Path):
    """-> (model in fp32 eval mode, serving.archive.Archive): the archive's weights rebuilt from its
    model_meta.json, as the handler does."""
    archive = read_archive(mar)
    state = torch.load(io.BytesIO(archive.read(archive.weights_file)), map_location="cpu", weights_only=True)
    num_classes = int(archive.meta.get("num_classes") or len(archive.classes()))
    return model_from({"arch": archive.meta["arch"], "num_classes": num_classes}, state), archive
