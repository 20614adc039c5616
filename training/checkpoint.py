"""The run folder and its checkpoint format: the one place that writes and reads them.

A run folder (`training.train --out RUN`) holds:
  checkpoint.pt  the best epoch: a dict of state_dicts + plain config, never a pickled model:
                   model           the state_dict (CPU tensors)
                   model_config    {"arch", "num_classes"}: build_model(**model_config) rebuilds it
                   classes         class names, index order
                   preprocess      {"image_size": [H, W], "mean": [...], "std": [...]}
                   calibration     defaults; training.evaluate fits the real ones into calibration.json
                   manifest_hash, data_dir   the prepared split it was trained on (training.prepare)
                   epoch, best, history, args
  last.pt        the same plus optimizer state, step, time used and RNG states, for --resume
  history.csv / history.json   one row per epoch
  calibration.json             written by training.evaluate, read by training.export

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
DEFAULT_CALIBRATION = {"temperature": 1.0, "review_threshold": 0.5}


class CheckpointError(RuntimeError):
    pass


# -- writing ---------------------------------------------------------------------------------

def cpu_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def preprocess_dict(image_size, mean, std) -> dict:
    return {"image_size": list(image_size), "mean": list(mean), "std": list(std)}


def checkpoint_dict(model, *, model_config, classes, image_size, mean, std, manifest_hash, data_dir, history, args,
                    epoch, best) -> dict:
    return {
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
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


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


# -- reading ---------------------------------------------------------------------------------

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


def load_run(run: Path) -> tuple[dict, nn.Module]:
    """-> (checkpoint dict, its model in eval mode, channels_last) of a run folder."""
    ckpt = load_checkpoint(Path(run) / CHECKPOINT)
    model = model_from(ckpt["model_config"], ckpt["model"])
    return ckpt, model.to(memory_format=torch.channels_last)


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
