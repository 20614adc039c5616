"""python -m ingest report: what PostgreSQL recorded, as a table, CSV or JSON."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TextIO

from ingest import db

def since_arg(text: str) -> datetime:
    """--since of `ingest report` and `review export`: an ISO date or datetime, UTC unless it says otherwise."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Invalid --since {text!r}; use an ISO date such as 2026-11-01 or 2026-11-01T08:00") from exc
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# section -> (query file, title)
SECTIONS = {
    "by_day": ("report_by_day", "Photos per day and category"),
    "review_queue": ("report_review_queue", "Needs-review queue (oldest first)"),
    "failures": ("report_failures", "Rejected photos by reason"),
    "duplicates": ("report_duplicates", "Duplicates (same content as a recorded photo)"),
    "runs": ("report_runs", "Runs"),
    "disk": ("report_disk", "Disk: what processed/ and quarantine/ hold (recorded sizes), and what retention removed"),
}
# The review desk (python -m review): reads the tables of migrations 004 and 008, empty until someone reviews.
REVIEW_SECTIONS = {
    "review_open": ("report_review_open", "Review desk: open items"),
    "review_per_day": ("report_review_per_day", "Review desk: decisions per day"),
    "review_agreement": ("report_review_agreement", "Review desk: decisions agreeing with the model, per version and class"),
    "review_audit": ("report_review_audit", "Review desk: measured precision of accepted answers (audit sample, settled labels, Wilson 95 % interval)"),
    "review_accuracy": ("report_review_accuracy", "Review desk: reviewed accuracy of the needs-review answers"),
    "review_opinions": ("report_review_opinions", "Review desk: second opinions"),
    "review_kappa": ("report_review_kappa", "Review desk: agreement per pair of reviewers (Cohen's kappa)"),
    "review_gold": ("report_review_gold", "Review desk: reviewers' accuracy on gold items (Wilson 95 % interval)"),
}
SECTIONS.update(REVIEW_SECTIONS)
# Shown on request only (`report --latest N`), not among the default sections.
EXTRA_SECTIONS = {"latest": ("latest", "Latest predictions")}


def collect(url: str, *, since: datetime, limit: int, sections: list[str]) -> dict[str, dict]:
    """{section: {"columns": [...], "rows": [[...], ...]}}"""
    out = {}
    with db.connect(url) as conn, conn.cursor() as cur:
        for name in sections:
            cur.execute(db.load_query(SECTIONS[name][0]), {"since": since, "limit": limit})
            out[name] = {"columns": [d.name for d in cur.description], "rows": [list(r) for r in cur.fetchall()]}
    return out


def _plain(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def write_table(data: dict, out: TextIO = sys.stdout) -> None:
    for name, section in data.items():
        title = (SECTIONS.get(name) or EXTRA_SECTIONS[name])[1]
        print(f"== {title} ==", file=out)
        cells = [section["columns"]] + [[_cell(v) for v in row] for row in section["rows"]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(section["columns"]))]
        for n, row in enumerate(cells):
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
            if n == 0:
                print("  ".join("-" * w for w in widths), file=out)
        if not section["rows"]:
            print("(none)", file=out)
        print(file=out)


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection"):
# a photo named "=HYPERLINK(...).jpg" must open as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    if value is None:
        return ""
    value = _plain(value)
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def write_csv(data: dict, out: TextIO = sys.stdout) -> None:
    """One CSV block per section; with several sections each block starts with a `# section` line."""
    w = csv.writer(out, lineterminator="\n")
    for n, (name, section) in enumerate(data.items()):
        if len(data) > 1:
            if n:
                out.write("\n")
            out.write(f"# {name}\n")
        w.writerow(section["columns"])
        for row in section["rows"]:
            w.writerow([_csv_cell(v) for v in row])


def write_json(data: dict, out: TextIO = sys.stdout) -> None:
    doc = {name: [dict(zip(s["columns"], map(_plain, row))) for row in s["rows"]] for name, s in data.items()}
    json.dump(doc, out, indent=2, ensure_ascii=False, default=str)
    out.write("\n")


WRITERS = {"table": write_table, "csv": write_csv, "json": write_json}
