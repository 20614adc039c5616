"""Reading a Kaggle-layout catalogue: `styles.csv` + `images/<id>.jpg`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "articleType")
MISSING = {"", "NA"}


class CatalogueError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    id: str
    label: str
    path: Path


def iter_styles(csv_path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Kaggle's unquoted styles.csv, row by row: (line number, row, None) for a usable row,
    (line number, None, reason) for one without a numeric id or a label; blank lines are passed over.

    The last column (productDisplayName) may hold commas, so a row is split on the first
    len(header)-1 commas only: everything after belongs to the last column. Cells that are
    empty or the literal `NA` become None.
    """
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        header_line = f.readline()
        header = [h.strip() for h in header_line.rstrip("\r\n").split(",")]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CatalogueError(f"{csv_path}: missing required column(s) {missing}; the header is {header}")
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(",", len(header) - 1)
            if len(fields) < len(header):
                fields += [""] * (len(header) - len(fields))
            row = {h: (None if v.strip() in MISSING else v.strip()) for h, v in zip(header, fields)}
            if row["id"] is None or not row["id"].isdigit():
                yield line_no, None, "bad_id"
            elif row["articleType"] is None:
                yield line_no, None, "no_label"
            else:
                yield line_no, row, None


def read_styles(csv_path: Path) -> tuple[list[dict], dict[str, int]]:
    """The usable rows of a styles.csv (see iter_styles), and the count of the others by reason."""
    skipped: dict[str, int] = {}
    rows = []
    for _, row, reason in iter_styles(csv_path):
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            rows.append(row)
    return rows, skipped


def list_items(data_dir: Path) -> tuple[list[Item], dict[str, int]]:
    """Every labelled row whose image file exists, and the count of rows dropped by reason."""
    data_dir = Path(data_dir)
    csv_path = data_dir / "styles.csv"
    if not csv_path.is_file():
        raise CatalogueError(f"{data_dir} is not a Kaggle-layout catalogue: {csv_path} does not exist")
    rows, skipped = read_styles(csv_path)
    items = []
    for row in rows:
        path = data_dir / "images" / f"{row['id']}.jpg"
        if not path.is_file():
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
            continue
        items.append(Item(id=row["id"], label=row["articleType"], path=path))
    return items, skipped
