"""training.prepare: robust parsing, drops counted by reason, categories, stratified deterministic splits."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from training import prepare as prepare_mod
from training.catalogue import CatalogueError

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


@pytest.fixture
def messy_catalogue(sample_catalogue, tmp_path):
    """The sample catalogue plus every kind of bad row and image the real file can hold."""
    root = tmp_path / "messy"
    shutil.copytree(sample_catalogue, root)
    images = root / "images"
    good = (images / "10000.jpg").read_bytes()
    (images / "90001.jpg").write_bytes(good)  # byte-for-byte duplicate of 10000
    (images / "90002.jpg").write_bytes(b"this is not a jpeg at all")  # unreadable
    (images / "90003.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "90005.jpg").write_bytes((images / "10001.jpg").read_bytes()[::-1])  # garbage
    for i in range(90010, 90013):  # a category outside the refund set
        shutil.copy(images / f"{i - 90010 + 10002}.jpg", images / f"{i}.jpg")
        (images / f"{i}.jpg").write_bytes((images / f"{i}.jpg").read_bytes() + bytes([i % 251]))  # unique bytes
    with open(root / "styles.csv", "a") as f:
        f.write("90001,Men,Apparel,Topwear,Tshirts,NA,Summer,2012,NA,Copy, of, 10000\n")  # commas in the name
        f.write("90002,Men,Apparel,Topwear,Tshirts,Blue,,,,\n")  # empty cells
        f.write("90003,Men,Apparel,Topwear,Jeans,NA,Summer,2012,Casual,Half a file\n")
        f.write("90004,Men,Apparel,Topwear,Jeans,NA,Summer,2012,Casual,No image on disk\n")
        f.write("90005,Men,Apparel,Topwear,Socks,NA,Summer,2012,Casual,Reversed bytes\n")
        f.write("90006,Men,Apparel,Topwear,NA,NA,Summer,2012,Casual,No label\n")
        f.write("abc,Men,Apparel,Topwear,Jeans,NA,Summer,2012,Casual,Bad id\n")
        f.write("10000,Men,Apparel,Topwear,Jeans,NA,Summer,2012,Casual,Repeated id\n")
        for i in range(90010, 90013):
            f.write(f"{i},Men,Accessories,Eyewear,Sunglasses,Black,Summer,2012,Casual,Shades {i}\n")
    return root


def test_drops_are_counted_by_reason(messy_catalogue, tmp_path):
    summary = prepare_mod.prepare(messy_catalogue, tmp_path / "prep")
    assert summary["dropped"] == {
        "bad_id": 1, "no_label": 1, "duplicate_id": 1, "duplicate_image": 1,
        "missing_image": 1, "unreadable_image": 2, "truncated_image": 1,
    }
    assert summary["outside_categories"] == 3 and summary["classes"] == 6
    assert summary["usable_images"] == 6 * 30 + 3
    assert sum(summary["split_sizes"].values()) == 6 * 30
    outside = prepare_mod.read_manifest(tmp_path / "prep" / "outside.csv")
    assert [r.label for r in outside] == ["Sunglasses"] * 3
    ids = {r.id for s in prepare_mod.SPLITS for r in prepare_mod.read_manifest(tmp_path / "prep" / f"{s}.csv")}
    assert "10000" in ids and not ids & {"90001", "90002", "90003", "90004", "90005", "90006"}


def test_categories_file_and_min_per_class(messy_catalogue, tmp_path, caplog):
    cats = tmp_path / "cats.txt"
    cats.write_text("# two refund categories and one absent\nTshirts\nSunglasses\nDresses\n")
    summary = prepare_mod.prepare(messy_catalogue, tmp_path / "prep", categories=cats, min_per_class=5)
    assert json.loads((tmp_path / "prep" / "classes.json").read_text()) == ["Tshirts"]
    assert summary["categories_below_min"] == {"Sunglasses": 3}
    assert summary["dropped"]["category_below_min"] == 3
    assert summary["missing_categories"] == ["Dresses"]
    assert "Sunglasses" in caplog.text and "Dresses" in caplog.text
    with pytest.raises(CatalogueError, match="no category"):
        prepare_mod.prepare(messy_catalogue, tmp_path / "none", categories=cats, min_per_class=1000)


def test_default_categories_are_the_30_refund_categories():
    cats = prepare_mod.read_categories(prepare_mod.DEFAULT_CATEGORIES)
    assert len(cats) == 30 == len(set(cats)) and {"Tshirts", "Shoe Accessories", "Watches", "Track Pants"} <= set(cats)


def test_split_is_stratified_disjoint_and_deterministic(sample_catalogue, tmp_path):
    a = prepare_mod.prepare(sample_catalogue, tmp_path / "a", val_frac=0.2, test_frac=0.1, seed=7)
    prepare_mod.prepare(sample_catalogue, tmp_path / "b", val_frac=0.2, test_frac=0.1, seed=7)
    c = prepare_mod.prepare(sample_catalogue, tmp_path / "c", val_frac=0.2, test_frac=0.1, seed=8)
    for name in ("train.csv", "val.csv", "test.csv", "classes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "val.csv").read_bytes() != (tmp_path / "c" / "val.csv").read_bytes()
    assert a["manifest_hash"] != c["manifest_hash"]
    assert all(v == {"train": 21, "val": 6, "test": 3} for v in a["per_class"].values()), a["per_class"]
    splits = {s: prepare_mod.read_manifest(tmp_path / "a" / f"{s}.csv") for s in prepare_mod.SPLITS}
    ids = [r.id for recs in splits.values() for r in recs]
    assert len(ids) == len(set(ids)) == 180
    # manifests point at the catalogue's own files: nothing is copied
    assert all(r.path.parent == (sample_catalogue / "images").resolve() for r in splits["train"])
    assert not (tmp_path / "a" / "images").exists()
    with open(tmp_path / "a" / "train.csv") as f:
        assert next(csv.reader(f)) == ["id", "label", "path", "sha256"]


def test_a_class_split_does_not_depend_on_the_others(sample_catalogue, tmp_path):
    recs, _ = prepare_mod.scan(sample_catalogue)
    full = prepare_mod.stratified_split(recs, val_frac=0.15, test_frac=0.15, seed=0)
    only = prepare_mod.stratified_split([r for r in recs if r.label == "Jeans"], val_frac=0.15, test_frac=0.15, seed=0)
    for s in prepare_mod.SPLITS:
        assert [r.id for r in full[s] if r.label == "Jeans"] == [r.id for r in only[s]]


def test_only_id_and_article_type_are_needed(sample_catalogue, tmp_path):
    root = tmp_path / "minimal"
    (root / "images").mkdir(parents=True)
    lines = (sample_catalogue / "styles.csv").read_text().splitlines()[1:13]
    with open(root / "styles.csv", "w") as f:
        f.write("id,articleType\n")
        for line in lines:
            fields = line.split(",")
            f.write(f"{fields[0]},{fields[4]}\n")
            shutil.copy(sample_catalogue / "images" / f"{fields[0]}.jpg", root / "images")
    summary = prepare_mod.prepare(root, tmp_path / "prep", min_per_class=1)
    assert summary["dropped"] == {} and summary["usable_images"] == 12


def test_cli_rejects_bad_fractions(sample_catalogue, tmp_path):
    args = prepare_mod.get_args_parser().parse_args(
        ["--data-dir", str(sample_catalogue), "--out", str(tmp_path / "p"), "--val-frac", "0.6", "--test-frac", "0.5"])
    with pytest.raises(SystemExit, match="val-frac"):
        prepare_mod.main(args)
