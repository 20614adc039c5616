"""training.train --extra-data: reviewed photos exported in the Kaggle layout (`python -m review
export`) join the training split only; `other` ones the out-of-category pool; the run's
train_manifest.csv lists them with their labels and source; bad rows are refused clearly."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from handler.refund_inference import OTHER_LABEL
from support import train_tiny
from training import extra_data as extra_mod
from training import make_sample_catalogue
from training import prepare as prepare_mod
from training.checkpoint import CHECKPOINT, load_checkpoint, read_train_manifest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The sample catalogue with out-of-category products, prepared once for every run here."""
    catalogue = tmp_path_factory.mktemp("catalogue-extra")
    make_sample_catalogue.write_catalogue(catalogue, per_class=20, seed=0, outside_per_class=10)
    out = tmp_path_factory.mktemp("prepared-extra")
    prepare_mod.prepare(catalogue, out)
    return out


def write_export(folder: Path, *, seed: int = 7, first_id: int = 90000) -> dict[str, str]:
    """A folder as `review export` writes it: styles.csv with id,articleType, images/<id>.jpg; two new
    photos per refund category and one per out-of-category product, the latter labelled `other`.
    Returns {id: label}."""
    rows = make_sample_catalogue.write_catalogue(folder, per_class=2, seed=seed, first_id=first_id, outside_per_class=1)
    labels = {str(r["id"]): OTHER_LABEL if r["articleType"] in make_sample_catalogue.OUTSIDE_DRAWERS else r["articleType"]
              for r in rows}
    write_styles(folder, labels)
    return labels


def write_styles(folder: Path, labels: dict[str, str]) -> None:
    (folder / "styles.csv").write_text("id,articleType\n" + "".join(f"{i},{label}\n" for i, label in labels.items()))


def test_reviewed_photos_train_and_are_in_the_run_manifest(prepared, tmp_path):
    export = tmp_path / "export"
    labels = write_export(export)
    assert sum(v == OTHER_LABEL for v in labels.values()) == 3 and len(labels) == 15
    run = train_tiny(prepared, tmp_path / "run", "--extra-data", str(export), "--other", "class", epochs=1)

    manifest = read_train_manifest(run)
    from_export = {row["id"]: row for row in manifest if row["source"] == str(export.resolve() / "styles.csv")}
    assert {i: row["label"] for i, row in from_export.items()} == labels  # the reviewed labels, `other` included
    assert all(Path(row["path"]) == export.resolve() / "images" / f"{i}.jpg" for i, row in from_export.items())
    # The prepared training photos are listed too, the out-of-category ones as `other`; val and test are not.
    by_source = {}
    for row in manifest:
        by_source.setdefault(Path(row["source"]).name, []).append(row)
    train = prepare_mod.read_manifest(prepared / "train.csv")
    outside_train = prepare_mod.read_manifest(prepared / "outside-train.csv")
    assert sorted(r["sha256"] for r in by_source["train.csv"]) == sorted(r.sha256 for r in train)
    assert {r["label"] for r in by_source["outside-train.csv"]} == {OTHER_LABEL}
    assert len(by_source["outside-train.csv"]) == len(outside_train)
    held_out = {r.sha256 for split in ("val", "test", "outside-val", "outside-test")
                for r in prepare_mod.read_manifest(prepared / f"{split}.csv")}
    assert not held_out & {row["sha256"] for row in manifest}

    # The checkpoint trained on them: the class counts grew by the reviewed photos, val stayed the prepared one.
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert ckpt["classes"][-1] == OTHER_LABEL and ckpt["data_dir"] == str(prepared.resolve())
    counts = dict(zip(ckpt["classes"], ckpt["class_counts"]))
    for c in ckpt["classes"][:-1]:
        assert counts[c] == sum(r.label == c for r in train) + 2, c
    assert ckpt["manifest_hash"] != prepare_mod.manifest_hash(prepared)
    assert ckpt["extra_data"] == [{"dir": str(export.resolve()), "categories": 12, OTHER_LABEL: 3,
                                   f"{OTHER_LABEL}_left_out": 0, "skipped": {}}]
    assert ckpt["args"]["extra_data"] == [str(export)]


def test_other_rows_are_left_out_without_the_other_output(prepared, tmp_path, caplog):
    export = tmp_path / "export"
    labels = write_export(export)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        run = train_tiny(prepared, tmp_path / "run", "--extra-data", str(export), "--other", "none", epochs=1)
    manifest = read_train_manifest(run)
    assert OTHER_LABEL not in {row["label"] for row in manifest}
    assert {row["id"] for row in manifest if "export" in row["source"]} == {i for i, v in labels.items() if v != OTHER_LABEL}
    assert "3 reviewed photos labelled 'other' left out" in caplog.text
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert OTHER_LABEL not in ckpt["classes"]
    assert ckpt["extra_data"][0] | {"dir": ""} == {"dir": "", "categories": 12, OTHER_LABEL: 0,
                                                   f"{OTHER_LABEL}_left_out": 3, "skipped": {}}


def test_an_unknown_label_stops_the_run_naming_the_file_and_line(prepared, tmp_path):
    export = tmp_path / "export"
    labels = write_export(export)
    first, second = list(labels)[:2]
    labels[second] = "Sunglasses"  # a product type, not a refund category: the export and the run disagree
    write_styles(export, labels)
    with pytest.raises(SystemExit, match=rf"{export / 'styles.csv'} line 3: articleType 'Sunglasses' is neither a "
                                         r"category of this run nor 'other'; the run's categories: Casual Shoes, "):
        train_tiny(prepared, tmp_path / "run", "--extra-data", str(export), epochs=1)
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    with pytest.raises(SystemExit, match="is not a Kaggle-layout catalogue"):
        train_tiny(prepared, tmp_path / "run", "--extra-data", str(tmp_path / "nowhere"), epochs=1)
    (export / "styles.csv").write_text(f"id,label\n{first},Tshirts\n")
    with pytest.raises(SystemExit, match=r"styles.csv: missing required column\(s\) \['articleType'\]"):
        train_tiny(prepared, tmp_path / "run", "--extra-data", str(export), epochs=1)


def test_a_bad_row_costs_only_that_row(prepared, tmp_path, caplog):
    export = tmp_path / "export"
    labels = write_export(export)
    ids = list(labels)
    (export / "images" / f"{ids[0]}.jpg").unlink()  # line 2: missing image
    (export / "images" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")  # line 3: unreadable
    val_photo = prepare_mod.read_manifest(prepared / "val.csv")[0]
    shutil.copy(val_photo.path, export / "images" / f"{ids[2]}.jpg")  # line 4: a val photo
    shutil.copy(export / "images" / f"{ids[4]}.jpg", export / "images" / f"{ids[3]}.jpg")  # line 5 = line 6's photo
    rows = dict(labels)
    rows["x1"] = "Tshirts"  # line 17: not a Kaggle id
    write_styles(export, rows)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        extras = extra_mod.read_all([export], sorted({v for v in labels.values() if v != OTHER_LABEL}), prepared)
    (extra,) = extras
    assert extra.skipped == {"missing_image": 1, "unreadable_image": 1, "in_val_or_test": 1, "duplicate_image": 1,
                             "bad_id": 1}
    assert {r.id for r in extra.inside + extra.other} == set(ids[3:]) - {ids[4]}  # the first of two copies is kept
    csv = export.resolve() / "styles.csv"
    for line, reason in ((2, "missing_image"), (3, "unreadable_image"), (4, "in_val_or_test"), (6, "duplicate_image"),
                         (17, "bad_id")):
        assert f"{csv} line {line}: " in caplog.text and f"({reason}): row skipped" in caplog.text, (line, caplog.text)


def test_resume_refuses_other_extra_data(prepared, tmp_path):
    export = tmp_path / "export"
    write_export(export)
    run = train_tiny(prepared, tmp_path / "run", "--extra-data", str(export), epochs=1)
    with pytest.raises(SystemExit, match="other manifests"):
        train_tiny(prepared, run, "--resume", str(run), epochs=2)
