"""python -m ingest run|report — the inbox -> TorchServe -> PostgreSQL job and its reports."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ingest import db
from ingest.job import Settings, run


def default_torchserve_url() -> str:
    if os.environ.get("TORCHSERVE_URL"):
        return os.environ["TORCHSERVE_URL"]
    from serving.torchserve import TorchServe

    return TorchServe().inference_url


def database_url() -> str:
    from serving.postgres import database_url as resolve

    return resolve(start=True)


def print_table(headers: list[str], rows: list[tuple]) -> None:
    cells = [headers] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_run(args: argparse.Namespace) -> int:
    if not args.inbox.is_dir():
        print(f"ingest: inbox {args.inbox} is not a folder", file=sys.stderr)
        return 2
    settings = Settings(inbox=args.inbox.resolve(), database_url=database_url(), torchserve_url=args.torchserve_url,
                        model=args.model, batch_size=args.batch_size, concurrency=args.concurrency)
    summary = run(settings)
    print(f"ingest: {summary.seen} images in {summary.elapsed_s:.1f}s ({summary.images_per_s:.1f}/s): "
          f"{summary.recorded} recorded, {summary.duplicates} already recorded, {summary.rejected} rejected, {summary.failed} failed")
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    url = database_url()
    db.migrate(url)
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(db.load_query("summary"), {"since": args.since})
        rows = cur.fetchall()
        print_table([d.name for d in cur.description], rows)
        if args.latest:
            print()
            cur.execute(db.load_query("latest"), {"limit": args.latest})
            print_table([d.name for d in cur.description], cur.fetchall())
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="classify every image in the inbox and record the results")
    p.add_argument("--inbox", type=Path, required=True, help="folder of images to classify (read recursively)")
    p.add_argument("--torchserve-url", type=str, default=None, help="inference address (default: TORCHSERVE_URL or config.properties)")
    p.add_argument("--model", type=str, default=os.environ.get("INGEST_MODEL", "refund_classifier"), help="NAME or NAME/VERSION")
    p.add_argument("--batch-size", type=int, default=64, help="rows per database transaction")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to TorchServe")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("report", help="print what is recorded")
    p.add_argument("--since", type=lambda s: datetime.fromisoformat(s).replace(tzinfo=timezone.utc), default=datetime(1970, 1, 1, tzinfo=timezone.utc), help="ISO date")
    p.add_argument("--latest", type=int, default=0, help="also list the newest N rows")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if getattr(args, "torchserve_url", "x") is None:
        args.torchserve_url = default_torchserve_url()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
