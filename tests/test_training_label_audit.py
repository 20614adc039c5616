"""training.label_audit: product names that contradict the catalogue's labels."""
from __future__ import annotations

import json

import pytest

from training import label_audit

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
ROWS = [
    "1,Women,Footwear,Shoes,Heels,Black,Summer,2012,Casual,Catwalk Women Black Flats",  # conflict
    "2,Women,Footwear,Shoes,Heels,Red,Summer,2012,Casual,Rocia Women Red Heels",  # own
    "3,Women,Footwear,Shoes,Flats,Tan,Summer,2012,Casual,Senorita Women Tan Sandals, Flat",  # comma in the name
    "4,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Nike Men Blue T-Shirt",  # not Shirts
    "5,Men,Apparel,Topwear,Shirts,White,Summer,2012,Formal,Arrow Men White Shirt",
    "6,Women,Apparel,Topwear,Kurtas,Green,Summer,2012,Ethnic,Biba Women Green Short Kurta",  # not Shorts
    "7,Women,Apparel,Topwear,Kurtis,NA,Summer,2012,Ethnic,NA",  # no name
    "8,Men,Accessories,Eyewear,Sunglasses,Black,Summer,2012,Casual,Fastrack Men Black Sandals",  # not a category
    "9,Women,Apparel,Dress,Dresses,Red,Summer,2012,Casual,Red Dress",
]


def write_catalogue(root, rows=ROWS):
    root.mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return root


def test_counts_own_conflicting_and_unnamed_products(tmp_path):
    cats = ["Dresses", "Flats", "Heels", "Kurtas", "Kurtis", "Sandals", "Shirts", "Shorts", "Tshirts"]
    result = label_audit.audit(write_catalogue(tmp_path / "cat"), cats)
    per = result["per_class"]
    assert per["Heels"] == {"products": 2, "own": 1, "unnamed": 0, "conflicts": 1, "named_as": {"Flats": 1}}
    assert per["Flats"]["conflicts"] == 0 and per["Flats"]["own"] == 1  # "Sandals, Flat" names Flats too
    assert per["Tshirts"]["own"] == 1 and per["Shirts"]["own"] == 1
    assert per["Kurtas"]["own"] == 1 and per["Kurtas"]["conflicts"] == 0
    assert per["Kurtis"]["unnamed"] == 1
    assert per["Dresses"]["own"] == 1
    assert result["products"] == 8 and result["conflicts"] == 1  # Sunglasses is not a category
    assert result["conflict_ids"] == ["1"]
    assert "1 of 8 products" in label_audit.report(result)


def test_cli_prints_and_writes_json(tmp_path, capsys):
    root = write_catalogue(tmp_path / "cat")
    out = tmp_path / "audit.json"
    label_audit.main(label_audit.get_args_parser().parse_args(["--data-dir", str(root), "--out", str(out)]))
    assert "Heels" in capsys.readouterr().out
    assert json.loads(out.read_text())["per_class"]["Heels"]["named_as"] == {"Flats": 1}


def test_a_folder_without_styles_csv_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no styles.csv"):
        label_audit.main(label_audit.get_args_parser().parse_args(["--data-dir", str(tmp_path)]))
