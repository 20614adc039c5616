"""Reviewed photos added to a run's training data: `training.train --extra-data DIR` (repeatable).

DIR is a catalogue in the Kaggle layout, as `python -m review export` writes it: DIR/styles.csv
with at least the columns `id` and `articleType`, and DIR/images/<id>.jpg. Each articleType is one
of the run's categories, or `other` (OTHER_LABEL, "not a refund category"). The photos join the
training split only, never val or test, so that the validation figures (model selection, early
stopping, calibration) stay comparable with a run without them:
  - a category's photos are trained as that category, beside the prepared train.csv;
  - `other` photos join the out-of-category pool (the prepared outside-train.csv) that trains the
    `other` output; a run without that output (--other none) leaves them out and logs how many.

What stops the run before any training, naming the file (and line):
  a DIR without styles.csv, a header without id or articleType, and a label that is neither a
  category of the run nor `other` (the export and the run disagree about the categories: training
  on without those decisions would hide it).
What costs only its row (each logged with its line, counted by reason in the checkpoint):
  bad_id (the id is not a number, as in Kaggle's layout), no_label, missing_image,
  unreadable_image, truncated_image, duplicate_image (a byte-for-byte copy of a photo already in
  training, or of an earlier row), in_val_or_test (a copy of a val or test photo: training on it
  would leak into the figures that select the model).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from handler.refund_inference import OTHER_LABEL
from training import prepare as prepare_mod
from training.catalogue import CatalogueError, iter_styles
from training.prepare import Record

logger = logging.getLogger("training.train")  # part of the run's one log

TRAIN_SPLITS = ("train.csv", "outside-train.csv")
HELD_OUT_SPLITS = ("val.csv", "test.csv", "outside-val.csv", "outside-test.csv")
SHOWN_PER_FOLDER = 10  # skipped rows logged one by one; the rest are counted


@dataclass
class ExtraData:
    """One --extra-data folder: the photos it adds, and its rows that were skipped, by reason."""

    folder: Path
    inside: list[Record] = field(default_factory=list)  # labelled with a category of the run
    other: list[Record] = field(default_factory=list)  # labelled OTHER_LABEL
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def csv(self) -> Path:
        return self.folder / "styles.csv"

    def summary(self, *, other_trained: bool) -> dict:
        """What the checkpoint records of the folder: photos trained per kind, rows skipped by reason."""
        return {"dir": str(self.folder), "categories": len(self.inside), OTHER_LABEL: len(self.other) if other_trained else 0,
                f"{OTHER_LABEL}_left_out": 0 if other_trained else len(self.other),
                "skipped": dict(sorted(self.skipped.items()))}


def placed_photos(data_dir: Path) -> dict[str, str]:
    """sha256 -> "train" or "val_or_test" for every photo of a prepared folder's manifests."""
    placed = {}
    for names, where in ((HELD_OUT_SPLITS, "val_or_test"), (TRAIN_SPLITS, "train")):
        for name in names:
            path = Path(data_dir) / name
            if path.is_file():
                for rec in prepare_mod.read_manifest(path):
                    placed.setdefault(rec.sha256, where)
    return placed


def read_extra(folder: Path, classes: list[str], placed: dict[str, str], *, workers: int = 4) -> ExtraData:
    """The usable rows of one reviewed catalogue. `placed` (sha256 -> where, see placed_photos) is
    updated with the photos taken, so a photo given in two folders is trained once."""
    folder = Path(folder).resolve()
    csv_path = folder / "styles.csv"
    if not csv_path.is_file():
        raise CatalogueError(f"--extra-data {folder} is not a Kaggle-layout catalogue: {csv_path} does not exist "
                             f"(python -m review export --out DIR writes one)")
    known = set(classes)
    result = ExtraData(folder)
    shown = 0

    def skip(line_no: int, reason: str, detail: str) -> None:
        nonlocal shown
        result.skipped[reason] = result.skipped.get(reason, 0) + 1
        if shown < SHOWN_PER_FOLDER:
            logger.warning("%s line %d: %s (%s): row skipped", csv_path, line_no, detail, reason)
        shown += 1

    rows, unknown = [], {}
    for line_no, row, reason in iter_styles(csv_path):
        if reason:
            skip(line_no, reason, "the id is not a number" if reason == "bad_id" else "no articleType")
        elif row["articleType"] != OTHER_LABEL and row["articleType"] not in known:
            unknown.setdefault(row["articleType"], []).append(line_no)
        else:
            rows.append((line_no, row))
    if unknown:
        label, lines = next(iter(unknown.items()))
        others = sum(len(v) for v in unknown.values()) - 1
        raise CatalogueError(
            f"{csv_path} line {lines[0]}: articleType {label!r} is neither a category of this run nor {OTHER_LABEL!r}"
            + (f" (and {others} more such rows: {', '.join(sorted(unknown))})" if others else "")
            + f"; the run's categories: {', '.join(classes)}")

    paths = [folder / "images" / f"{row['id']}.jpg" for _, row in rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        checked = list(pool.map(prepare_mod.check_image, paths))
    details = {"missing_image": "no such image", "unreadable_image": "the image cannot be decoded",
               "truncated_image": "the image is truncated"}
    for (line_no, row), path, (digest, reason) in zip(rows, paths, checked):
        if reason:
            skip(line_no, reason, f"{details.get(reason, reason)}: {path}")
            continue
        where = placed.get(digest)
        if where == "val_or_test":
            skip(line_no, "in_val_or_test", f"{path.name} is a copy of a val/test photo")
            continue
        if where is not None:
            skip(line_no, "duplicate_image", f"{path.name} is a copy of a photo already in training")
            continue
        placed[digest] = "train"
        rec = Record(id=row["id"], label=row["articleType"], path=path, sha256=digest)
        (result.other if rec.label == OTHER_LABEL else result.inside).append(rec)
    if shown > SHOWN_PER_FOLDER:
        logger.warning("%s: %d more rows skipped", csv_path, shown - SHOWN_PER_FOLDER)
    logger.info("--extra-data %s: %d photos of the categories, %d labelled %r; skipped %s", folder,
                len(result.inside), len(result.other), OTHER_LABEL, result.skipped or "none")
    return result


def read_all(folders: list[Path], classes: list[str], data_dir: Path) -> list[ExtraData]:
    """Every --extra-data folder, in the order given, against the run's prepared folder."""
    placed = placed_photos(data_dir) if folders else {}
    return [read_extra(f, classes, placed) for f in folders]


def manifest_hash(prepared_hash: str, added: list[tuple[Record, str]]) -> str:
    """The prepared folder's hash, and with reviewed photos trained, those too (label, content):
    what a checkpoint was trained on, so --resume refuses other extra data."""
    if not added:
        return prepared_hash
    h = hashlib.sha256(prepared_hash.encode())
    for rec, label in sorted(added, key=lambda a: (a[0].sha256, a[1])):
        h.update(f"\n{label}\t{rec.sha256}".encode())
    return h.hexdigest()
