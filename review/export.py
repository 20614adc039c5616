"""`python -m review export --out DIR [--since DATE]`: the decided photos as a Kaggle-layout catalogue.

    DIR/styles.csv         id,articleType   (id: the decision's id; articleType: the decided
                                             category, or `other` for "not a refund category")
    DIR/images/<id>.jpg    the photo: JPEG bytes copied as they are, other formats re-encoded

Only each photo's settled label counts: its current decision (a changed decision exports its latest
label once), or, where the photo went to a second opinion, the label the reviewers settled on; a
photo still waiting for an opinion (`awaiting_opinion`) or whose three reviewers all differ
(`no_majority`) is skipped, and so is a photo a catalogue added as gold (`catalogue_gold`: a test
split never becomes training data); "photo unusable" is left out. `--since` counts from when a
photo's label settled. Each decision written is stamped exported (`exported_at`), which lets
retention (`ingest prune`) remove its photo later; a photo retention already removed is skipped as
`pruned`. `training.train --extra-data DIR` and `serving rollout --sample DIR`
read this layout.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ingest import db
from ingest.journal import path_from_row
from review import queue

logger = logging.getLogger("review.export")

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95


class ExportError(RuntimeError):
    pass


@dataclass
class ExportSummary:
    written: int = 0
    copied: int = 0  # JPEG bytes as they are
    converted: int = 0  # another format, re-encoded
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    labels: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _write_image(source: Path, dest: Path) -> bool:
    """True: copied as is (JPEG); False: re-encoded. Raises OSError / UnidentifiedImageError."""
    with open(source, "rb") as f:
        head = f.read(3)
    if head == JPEG_MAGIC:
        shutil.copyfile(source, dest)
        return True
    with Image.open(source) as im:
        im.load()
        if im.mode not in ("RGB", "L"):
            # Transparency over white, as a catalogue photo would be shown.
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im.save(dest, "JPEG", quality=JPEG_QUALITY)
    return False


def export(url: str, out: Path, *, since: datetime) -> ExportSummary:
    out = Path(out)
    if (out / "styles.csv").exists() or (out / "images").exists() and any((out / "images").iterdir()):
        raise ExportError(f"{out} holds a catalogue already (styles.csv or images/); export into a new folder")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(queue.load_query("export"), {"since": since})
        rows = cur.fetchall()
    summary = ExportSummary()
    lines = ["id,articleType\n"]
    written = []
    for decision_id, label, _decided_at, dest_path, dest_bytes, pruned, waiting, no_majority, catalogue in rows:
        if waiting or no_majority or catalogue:
            summary.skip("awaiting_opinion" if waiting else "no_majority" if no_majority else "catalogue_gold")
            continue
        if dest_path is None:
            summary.skip("pruned" if pruned else "no_file_recorded")
            if pruned:
                logger.warning("decision %s: its photo was removed by retention (ingest prune); skipped", decision_id)
            continue
        if "," in label or "\n" in label:  # styles.csv is read unquoted (training.catalogue)
            summary.skip("label_not_csv_safe")
            logger.warning("decision %s: label %r cannot be written to styles.csv; skipped", decision_id, label)
            continue
        source = path_from_row(dest_path, dest_bytes)
        dest = images / f"{decision_id}.jpg"
        try:
            if _write_image(source, dest):
                summary.copied += 1
            else:
                summary.converted += 1
        except FileNotFoundError:
            summary.skip("file_missing")
            logger.warning("decision %s: %s is gone; skipped", decision_id, source)
            continue
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            dest.unlink(missing_ok=True)
            summary.skip("unreadable")
            logger.warning("decision %s: %s cannot be read as an image (%s); skipped", decision_id, source, exc)
            continue
        lines.append(f"{decision_id},{label}\n")
        written.append(decision_id)
        summary.written += 1
        summary.labels[label] = summary.labels.get(label, 0) + 1
    tmp = out / "styles.csv.tmp"
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out / "styles.csv")
    with db.connect(url) as conn, conn.cursor() as cur:  # after styles.csv is in place: only what was written
        cur.execute(queue.load_query("mark_exported"), {"ids": written})
    return summary
