"""Audit the catalogue's labels against its own product names.

    python -m training.label_audit --data-dir ../shared/datasets/fashion-small [--out audit.json]

For every kept category, counts the products whose `productDisplayName` names another kept
category and not their own: an item labelled Heels and named "Catwalk Women Black Flats" is a
label conflict in the catalogue itself. On such items the photo does not settle which label
the catalogue chose, so they weigh on the accuracy any model reaches (training.evaluate
reports top-1 on them apart). Rows without a name (folders with only `id,articleType`)
are counted as unnamed. Nothing is changed: the audit only reads `styles.csv`.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from training.catalogue import CatalogueError, read_styles
from training.prepare import DEFAULT_CATEGORIES, read_categories

NAME_COLUMN = "productDisplayName"
# How names spell the categories where the plain word rule below would miss or over-match.
SPELLINGS = {
    "Tshirts": r"t-?shirts?|tees?",
    "Shirts": r"(?<!t-)shirts?",  # not the "shirt" of "t-shirt"
    "Shorts": r"shorts",  # "short" alone is an adjective ("short kurta")
    "Tops": r"tops?",
    "Dresses": r"dress(?:es)?",
    "Watches": r"watch(?:es)?",
    "Flip Flops": r"flip[- ]?flops?",
    "Track Pants": r"track ?pants?",
    "Shoe Accessories": r"shoe accessor(?:y|ies)",
}


def name_pattern(category: str) -> re.Pattern:
    """A whole-word, case-blind pattern for the category in a product name (singular or plural)."""
    spelling = SPELLINGS.get(category)
    if spelling is None:
        words = category.lower().split()
        spelling = r"\s+".join(re.escape(w[:-1] if w.endswith("s") else w) + "s?" for w in words)
    return re.compile(rf"\b(?:{spelling})\b", re.IGNORECASE)


def name_verdict(label: str, name: str | None, patterns: dict[str, re.Pattern]) -> tuple[str, list[str]]:
    """-> ("own" | "conflicts" | "unnamed", the categories the name names): whether the name names the label."""
    named = sorted(c for c, p in patterns.items() if name and p.search(name))
    if label in named:
        return "own", named
    return ("conflicts" if named else "unnamed"), named


def audit(data_dir: Path, categories: list[str]) -> dict:
    """-> per category: products, named as their own category, named as another one only (by which), unnamed;
    and the ids of the conflicting products (the ones to relabel or to read apart)."""
    rows, _ = read_styles(Path(data_dir) / "styles.csv")
    patterns = {c: name_pattern(c) for c in categories}
    per_class = {c: {"products": 0, "own": 0, "unnamed": 0, "conflicts": 0, "named_as": Counter()} for c in categories}
    conflict_ids = []
    for row in rows:
        entry = per_class.get(row["articleType"])
        if entry is None:
            continue
        entry["products"] += 1
        verdict, named = name_verdict(row["articleType"], row.get(NAME_COLUMN), patterns)
        entry[verdict] += 1
        if verdict == "conflicts":
            entry["named_as"][" + ".join(named)] += 1
            conflict_ids.append(row["id"])
    products = sum(e["products"] for e in per_class.values())
    conflicts = len(conflict_ids)
    for entry in per_class.values():
        entry["named_as"] = dict(entry["named_as"].most_common())
    return {"data": str(data_dir), "products": products, "conflicts": conflicts,
            "conflict_share": conflicts / products if products else 0.0, "per_class": per_class,
            "conflict_ids": conflict_ids}


def report(result: dict, *, top: int = 3) -> str:
    lines = [f"{result['conflicts']} of {result['products']} products ({result['conflict_share']:.1%}) "
             f"are named as another refund category than their label:",
             f"{'label':18s} {'products':>8s} {'conflicts':>9s}  named as"]
    by_share = sorted(result["per_class"].items(), key=lambda kv: -kv[1]["conflicts"] / max(kv[1]["products"], 1))
    for label, e in by_share:
        if e["conflicts"]:
            named = ", ".join(f"{k} {n}" for k, n in list(e["named_as"].items())[:top])
            lines.append(f"{label:18s} {e['products']:8d} {e['conflicts']:5d} {e['conflicts'] / e['products']:4.0%}  {named}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="Kaggle-layout catalogue (styles.csv)")
    parser.add_argument("--categories", type=Path, default=DEFAULT_CATEGORIES, help="one category per line")
    parser.add_argument("--out", type=Path, default=None, help="also write the full audit as JSON here")
    return parser


def main(args: argparse.Namespace) -> dict:
    if not (Path(args.data_dir) / "styles.csv").is_file():
        raise SystemExit(f"label_audit: {args.data_dir} has no styles.csv")
    try:
        result = audit(args.data_dir, read_categories(args.categories))
    except CatalogueError as exc:
        raise SystemExit(f"label_audit: {exc}") from exc
    print(report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
