"""Clean a Kaggle-layout catalogue and split it into train/val/test manifests.

    python -m training.prepare --data-dir ../shared/datasets/fashion-small --out runs/data

Reads `styles.csv` (only `id` and `articleType` are needed), drops and counts by reason the
rows whose image is missing, unreadable or truncated and the images that are byte-for-byte
duplicates of another, keeps the configured categories (default: training/categories.txt),
drops categories with fewer than --min-per-class images, and writes into --out:
  train.csv, val.csv, test.csv  (id,label,path,sha256; the images are not copied)
  outside-train.csv, outside-val.csv, outside-test.csv
                                (readable images whose label is not a kept category, split the
                                 same way, stratified by their own articleType: training.train
                                 learns them as the class `other`, evaluate measures on -val/-test)
  outside.csv                   (the three outside splits together, for older readers)
  classes.json                  (the kept categories, sorted: index = class id)
  prepare.json                  (format, arguments, counts kept and dropped by reason, per-class split sizes)
The split is stratified per class and deterministic for a seed. `format` in prepare.json is
PREPARE_FORMAT: training.train redoes a folder of an older format that it prepared itself, and
refuses one it was given (`is_current`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from handler.refund_inference import OTHER_LABEL
from handler.refund_preprocess import ImageError, decode_image
from training.catalogue import CatalogueError, read_styles

logger = logging.getLogger("training.prepare")

DEFAULT_CATEGORIES = Path(__file__).resolve().parent / "categories.txt"
SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("id", "label", "path", "sha256")
PREPARED_MARKERS = ("classes.json", "train.csv", "val.csv", "test.csv")
OUTSIDE_SPLITS = tuple(f"outside-{s}.csv" for s in SPLITS)
# 2: the out-of-category images split into outside-{train,val,test}.csv (1: one outside.csv).
PREPARE_FORMAT = 2


@dataclass(frozen=True)
class Record:
    id: str
    label: str
    path: Path
    sha256: str


def read_categories(path: Path) -> list[str]:
    """One category per line; blank lines and `#` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    cats = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not cats:
        raise CatalogueError(f"{path} lists no categories")
    return cats


def is_prepared(data_dir: Path) -> bool:
    """A folder training.prepare wrote, of any format: readable for evaluation."""
    return all((Path(data_dir) / name).is_file() for name in PREPARED_MARKERS)


def prepared_format(data_dir: Path) -> int:
    """prepare.json's `format`; 1 for a folder written before it was recorded."""
    info = Path(data_dir) / "prepare.json"
    try:
        return int(json.loads(info.read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return 1


def is_current(data_dir: Path) -> bool:
    """Prepared by this format: the out-of-category images are split too (what training needs)."""
    data_dir = Path(data_dir)
    return (is_prepared(data_dir) and prepared_format(data_dir) >= PREPARE_FORMAT
            and all((data_dir / name).is_file() for name in OUTSIDE_SPLITS))


def check_image(path: Path) -> tuple[str | None, str | None]:
    """-> (sha256, None) for a fully decodable image, or (None, drop reason)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing_image"
    except OSError:
        return None, "unreadable_image"
    try:
        decode_image(data)  # the handler's own decoder, with a full load: truncation shows up here
    except ImageError as exc:
        return None, "truncated_image" if exc.code == "corrupt" else "unreadable_image"
    return hashlib.sha256(data).hexdigest(), None


def _count(counts: dict[str, int], reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


def scan(data_dir: Path, *, workers: int = 4) -> tuple[list[Record], dict[str, int]]:
    """Every labelled row with a readable, unique image, and the rows dropped by reason.

    Of byte-identical images the lowest id is kept: a duplicate left in would leak between
    the splits (or teach two labels for one picture).
    """
    data_dir = Path(data_dir)
    csv_path = data_dir / "styles.csv"
    if not csv_path.is_file():
        raise CatalogueError(f"{data_dir} is not a Kaggle-layout catalogue: {csv_path} does not exist")
    rows, dropped = read_styles(csv_path)
    seen_ids: set[str] = set()
    unique_rows = []
    for row in sorted(rows, key=lambda r: int(r["id"])):
        if row["id"] in seen_ids:
            _count(dropped, "duplicate_id")
            continue
        seen_ids.add(row["id"])
        unique_rows.append(row)
    paths = [data_dir / "images" / f"{row['id']}.jpg" for row in unique_rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        checked = list(pool.map(check_image, paths, chunksize=64))
    records, by_hash = [], {}
    for row, path, (digest, reason) in zip(unique_rows, paths, checked):
        if reason:
            _count(dropped, reason)
            continue
        if digest in by_hash:
            _count(dropped, "duplicate_image")
            continue
        by_hash[digest] = row["id"]
        records.append(Record(id=row["id"], label=row["articleType"], path=path.resolve(), sha256=digest))
    return records, dropped


def stratified_split(records: list[Record], *, val_frac: float, test_frac: float, seed: int) -> dict[str, list[Record]]:
    """Per class: sort by id, shuffle with (seed, class), cut test then val then train.

    Each class gets its own generator, so adding or dropping one class leaves the others'
    splits unchanged. A class of n >= 3 gets at least one val and one test image.
    """
    by_label: dict[str, list[Record]] = {}
    for rec in sorted(records, key=lambda r: int(r.id)):
        by_label.setdefault(rec.label, []).append(rec)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        group = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(group)
        n = len(group)
        n_test = max(1, round(test_frac * n)) if n >= 3 and test_frac > 0 else 0
        n_val = max(1, round(val_frac * n)) if n >= 3 and val_frac > 0 else 0
        out["test"] += group[:n_test]
        out["val"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    for split in SPLITS:
        out[split].sort(key=lambda r: int(r.id))
    return out


def write_manifest(path: Path, records: list[Record]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_FIELDS)
        for r in records:
            w.writerow([r.id, r.label, str(r.path), r.sha256])


def read_manifest(path: Path) -> list[Record]:
    with open(path, newline="", encoding="utf-8") as f:
        return [Record(id=row["id"], label=row["label"], path=Path(row["path"]), sha256=row["sha256"]) for row in csv.DictReader(f)]


def manifest_hash(data_dir: Path) -> str:
    """sha256 over classes.json, the three split manifests and the outside splits where the folder
    has them: what a checkpoint was trained on. (A folder of format 1 keeps its old hash.)"""
    h = hashlib.sha256()
    for name in PREPARED_MARKERS + OUTSIDE_SPLITS:
        path = Path(data_dir) / name
        if name in OUTSIDE_SPLITS and not path.is_file():
            continue
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def prepare(
    data_dir: Path,
    out: Path,
    *,
    categories: Path | None = DEFAULT_CATEGORIES,
    min_per_class: int = 5,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    seed: int = 0,
) -> dict:
    """Clean, filter and split `data_dir` into manifests in `out`; returns the summary written to prepare.json."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise CatalogueError(f"Invalid --val-frac {val_frac} / --test-frac {test_frac}: each in [0, 1), their sum < 1")
    records, dropped = scan(data_dir)
    wanted = set(read_categories(categories)) if categories else None
    if wanted is not None and OTHER_LABEL in wanted:
        raise CatalogueError(f"{categories} lists {OTHER_LABEL!r}, the name reserved for the out-of-category output; rename it")
    inside = [r for r in records if wanted is None or r.label in wanted]
    outside = [r for r in records if wanted is not None and r.label not in wanted]
    counts: dict[str, int] = {}
    for r in inside:
        _count(counts, r.label)
    too_small = {c: n for c, n in counts.items() if n < min_per_class}
    for c, n in sorted(too_small.items()):
        logger.warning("dropping category %r: %d images < --min-per-class %d", c, n, min_per_class)
    absent = sorted(wanted - set(counts)) if wanted is not None else []
    if absent:
        logger.warning("%d of the categories have no images in %s: %s", len(absent), data_dir, ", ".join(absent))
    kept = [r for r in inside if r.label not in too_small]
    if too_small:
        _count(dropped, "category_below_min", sum(too_small.values()))
    classes = sorted({r.label for r in kept})
    if not classes:
        raise CatalogueError(f"no category of {categories} has >= {min_per_class} usable images in {data_dir}")
    splits = stratified_split(kept, val_frac=val_frac, test_frac=test_frac, seed=seed)
    # The same cut per articleType: every kind of out-of-category product is in all three, and
    # outside-test is never trained or tuned on.
    outside_splits = stratified_split(outside, val_frac=val_frac, test_frac=test_frac, seed=seed)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_manifest(out / f"{split}.csv", splits[split])
        write_manifest(out / f"outside-{split}.csv", outside_splits[split])
    write_manifest(out / "outside.csv", sorted(outside, key=lambda r: int(r.id)))
    (out / "classes.json").write_text(json.dumps(classes, indent=1))
    summary = {
        "format": PREPARE_FORMAT,
        "data_dir": str(Path(data_dir).resolve()),
        "categories": str(categories) if categories else None,
        "min_per_class": min_per_class, "val_frac": val_frac, "test_frac": test_frac, "seed": seed,
        "usable_images": len(records),
        "dropped": dict(sorted(dropped.items())),
        "outside_categories": len(outside),
        "outside_split_sizes": {s: len(outside_splits[s]) for s in SPLITS},
        "categories_below_min": too_small,
        "missing_categories": absent,
        "classes": len(classes),
        "split_sizes": {s: len(splits[s]) for s in SPLITS},
        "per_class": {c: {s: sum(r.label == c for r in splits[s]) for s in SPLITS} for c in classes},
        "manifest_hash": manifest_hash(out),
    }
    (out / "prepare.json").write_text(json.dumps(summary, indent=1))
    logger.info("%d usable images; dropped %s; %d outside the categories; %d classes: %s",
                len(records), summary["dropped"], len(outside), len(classes), summary["split_sizes"])
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="Kaggle-layout catalogue (styles.csv + images/)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the manifests and classes.json into")
    add_split_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    return parser


def add_split_args(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """The cleaning and split flags, shared with training.train (which prepares a raw --data-dir)."""
    parser.add_argument("--categories", type=Path, default=DEFAULT_CATEGORIES, help=f"file of categories to keep, one per line{note}")
    parser.add_argument("--min-per-class", type=int, default=5, help=f"drop categories with fewer usable images, with a warning{note}")
    parser.add_argument("--val-frac", type=float, default=0.15, help=f"share of each category for validation{note}")
    parser.add_argument("--test-frac", type=float, default=0.15, help=f"share of each category for test{note}")


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare(args.data_dir, args.out, categories=args.categories, min_per_class=args.min_per_class,
                          val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    except CatalogueError as exc:
        raise SystemExit(f"prepare: {exc}") from exc
    print(json.dumps({k: summary[k] for k in ("usable_images", "dropped", "outside_categories", "outside_split_sizes",
                                              "classes", "split_sizes")}))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
