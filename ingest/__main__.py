"""python -m ingest run|schedule|report|health|prune — the inbox -> TorchServe -> PostgreSQL job, its schedule, its
reports, its health check and its retention.

The exit codes of `run` (listed below) are decided in ingest.outcomes.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from ingest import db, logs
from ingest import health as health_mod
from ingest import prune as prune_mod
from ingest import report as report_mod
from ingest.job import Job
from ingest.outcomes import exit_code_for, exit_codes_help
from ingest.schedule import Cron, CronError, next_due
from ingest.settings import Settings, SettingsError, add_arguments, parse_duration, resolve
from ingest.store import TRANSIENT, DatabaseDown, LockBusy

logger = logging.getLogger("ingest")


def build_settings(values: dict) -> Settings:
    """Fill what the flags, environment and YAML left unset from the local TorchServe and PostgreSQL."""
    if not values.get("inbox"):
        raise SettingsError("no inbox: give --inbox DIR, INGEST_INBOX or `inbox:` in the settings file")
    inbox = Path(values["inbox"])
    if not inbox.is_dir():
        raise SettingsError(f"inbox {inbox} is not a folder")
    if not values.get("torchserve_url") or not values.get("management_url") or values.get("key_file") is None:
        from serving.torchserve import TorchServe

        local = TorchServe()
        explicit_url = bool(values.get("torchserve_url"))
        values["torchserve_url"] = values.get("torchserve_url") or local.inference_url
        values["management_url"] = values.get("management_url") or local.management_url
        # The local key file belongs to the local TorchServe; an explicit URL names another one.
        if values.get("key_file") is None and local.token_auth and not explicit_url:
            values["key_file"] = local.key_file
    if not values.get("database_url"):
        from serving.postgres import database_url

        values["database_url"] = database_url(start=True)
    return Settings(**values)


def print_summary(summary, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({"run_id": summary.run_id, "status": summary.status, "error": summary.error, **summary.counts()}))
    else:
        print(f"ingest: {summary.line()}")
        if summary.error:
            print(f"ingest: {summary.error}")


class Signals:
    """SIGTERM/SIGINT ask for a graceful stop; a second SIGINT stops at once."""

    def __init__(self):
        self.event = threading.Event()
        self.job: Job | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, _frame) -> None:
        logger.warning("%s: stopping after the photos in flight are recorded", signal.Signals(signum).name)
        self.event.set()
        if self.job is not None:
            self.job.request_stop()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_once(settings: Settings, signals: Signals) -> int:
    job = Job(settings)
    signals.job = job
    if signals.event.is_set():
        job.request_stop()
    try:
        summary = job.run()
    except LockBusy as exc:
        logger.warning("%s; exiting without doing anything", exc, extra={"event": "locked"})
        return exit_code_for(exc)
    except DatabaseDown as exc:  # before the run was recorded (its start, or taking the lock)
        logger.error("%s", exc)
        return exit_code_for(exc)
    finally:
        signals.job = None
    print_summary(summary, settings.log_format)
    sys.stdout.flush()
    return summary.exit_code


def _settings_from(args: argparse.Namespace) -> Settings:
    values = resolve(args)
    logs.setup(values["log_format"])
    return build_settings(values)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    signals = Signals()
    signals.install()
    return run_once(settings, signals)


def cmd_schedule(args: argparse.Namespace) -> int:
    if bool(args.every) == bool(args.cron):
        raise SettingsError("give exactly one of --every DURATION (e.g. 15m) or --cron 'EXPR' (e.g. '*/15 * * * *')")
    every = parse_duration(args.every) if args.every else None
    if every is not None and every <= 0:
        raise SettingsError(f"Invalid --every {args.every!r}; it must be positive")
    cron = Cron.parse(args.cron) if args.cron else None
    settings = _settings_from(args)
    signals = Signals()
    signals.install()
    logger.info("scheduled: %s", f"every {args.every}" if every else f"cron '{args.cron}'", extra={"event": "schedule"})
    if cron is not None:  # cron: wait for the first matching minute; --every: run at once
        due = cron.next_after(datetime.now(timezone.utc))
    else:
        due = datetime.now(timezone.utc)
    while not signals.event.is_set():
        wait_s = (due - datetime.now(timezone.utc)).total_seconds()
        if wait_s > 0:
            logger.info("next run at %s", due.strftime("%Y-%m-%d %H:%M:%S %Z"), extra={"event": "next_run"})
            if signals.event.wait(wait_s):
                break
        started = datetime.now(timezone.utc)
        try:
            code = run_once(settings, signals)
            logger.info("run ended with exit code %d", code, extra={"event": "run_end", "exit_code": code})
        except Exception:  # noqa: BLE001 - one failed run must not end the schedule
            logger.exception("run crashed; the schedule goes on")
        due = next_due(started, datetime.now(timezone.utc), every_s=every, cron=cron)
    logger.info("schedule stopped", extra={"event": "schedule_stop"})
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    logs.setup("human", logging.WARNING)
    from serving.postgres import database_url

    url = database_url(args.database_url)
    pending = db.pending_migrations(url)  # a report reads: it never changes the schema
    if pending:
        print(f"ingest report: the database lacks the migration(s) {', '.join(pending)} of this version; "
              f"`python -m ingest migrate` (or the next `python -m ingest run`) applies them", file=sys.stderr)
        return 1
    sections = args.section or list(report_mod.SECTIONS)
    data = report_mod.collect(url, since=args.since, limit=args.limit, sections=sections)
    report_mod.WRITERS[args.format](data)
    if args.latest and args.format == "table":
        with db.connect(url) as conn, conn.cursor() as cur:
            cur.execute(db.load_query("latest"), {"limit": args.latest})
            report_mod.write_table({"latest": {"columns": [d.name for d in cur.description], "rows": cur.fetchall()}})
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 healthy, 1 with one line per problem on stdout, 4 when PostgreSQL cannot be asked."""
    logs.setup("human", logging.WARNING)
    from serving.postgres import database_url

    url = database_url(args.database_url)
    limits = health_mod.Limits(no_success_for=args.no_success_for, waiting_for=args.waiting_for,
                               pending_for=args.pending_for, quarantine_share=args.quarantine_share, window=args.window)
    try:
        found = health_mod.check(url, limits, inbox=Path(args.inbox).resolve() if args.inbox else None)
    except TRANSIENT as exc:
        print(f"ingest health: PostgreSQL unavailable: {str(exc).strip()}")
        return exit_code_for(DatabaseDown(str(exc)))
    text = health_mod.exposition(found)
    if args.textfile:
        health_mod.write_textfile(args.textfile, text)
    if args.pushgateway:
        health_mod.push(args.pushgateway, text)
    for problem in found.problems:
        print(f"ingest health: {problem}")
    if not found.problems:
        print("ingest health: ok")
    return 1 if found.problems else 0


def cmd_prune(args: argparse.Namespace) -> int:
    logs.setup("human", logging.WARNING)
    from serving.postgres import database_url

    url = database_url(args.database_url)
    db.migrate(url)
    summary = prune_mod.prune(url, args.older_than, dry_run=args.dry_run)
    print(f"ingest prune: {summary.line()}")
    return 1 if summary.failed else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from serving.postgres import database_url

    url = database_url(args.database_url)
    applied = db.migrate(url)
    print(f"ingest migrate: applied {', '.join(applied)}" if applied else "ingest migrate: the schema is up to date")
    return 0


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingest", description=f"{__doc__}\n{exit_codes_help()}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="classify every settled photo in the inbox once, record it, move it out")
    add_arguments(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("schedule", help="run again and again: --every 15m or --cron '*/15 * * * *'; stops on SIGTERM")
    p.add_argument("--every", type=str, default=None, help="interval between run starts, e.g. 15m")
    p.add_argument("--cron", type=str, default=None, help="5-field cron expression, in UTC")
    add_arguments(p)
    p.set_defaults(fn=cmd_schedule)
    p = sub.add_parser("report", help="what is recorded: per category and day, review queue, failures, runs")
    p.add_argument("--since", type=report_mod.since_arg, default=datetime(1970, 1, 1, tzinfo=timezone.utc), help="ISO date or datetime (UTC unless given)")
    p.add_argument("--format", choices=sorted(report_mod.WRITERS), default="table", help="table, csv or json")
    p.add_argument("--section", action="append", choices=list(report_mod.SECTIONS), default=None,
                   help="only this section (repeatable); default: all")
    p.add_argument("--limit", type=int, default=100, help="rows of the review queue, duplicates and runs")
    p.add_argument("--latest", type=int, default=0, help="also list the newest N rows (table format)")
    p.add_argument("--database-url", type=str, default=None, help="PostgreSQL URL (default: DATABASE_URL or the private cluster)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("health", help="exit 1 with one line per problem (for an alert); --textfile / --pushgateway: "
                                      "the same figures for Prometheus")
    p.add_argument("--database-url", type=str, default=None, help="PostgreSQL URL (default: DATABASE_URL or the private cluster)")
    p.add_argument("--inbox", type=Path, default=None, help="also check the photos waiting in this inbox")
    p.add_argument("--no-success-for", type=_duration, default=3600.0, help="a problem when no run succeeded for this long (default 1h)")
    p.add_argument("--waiting-for", type=_duration, default=3600.0, help="a problem when a photo has waited in --inbox this long (default 1h)")
    p.add_argument("--pending-for", type=_duration, default=900.0, help="a problem when a move has been pending this long (default 15m)")
    p.add_argument("--quarantine-share", type=float, default=0.2, help="a problem when more than this share of the photos "
                   "recorded in --window was quarantined (default 0.2; judged from 20 photos)")
    p.add_argument("--window", type=_duration, default=86400.0, help="the quarantine share's window (default 24h)")
    p.add_argument("--textfile", type=Path, default=None, help="write the figures here for node_exporter's textfile collector (*.prom)")
    p.add_argument("--pushgateway", type=str, default=None, help="push the figures to this Prometheus Pushgateway URL")
    p.set_defaults(fn=cmd_health)
    p = sub.add_parser("prune", help="retention: remove photos moved to processed/ or quarantine/ longer ago than "
                                     "--older-than (rows kept; photos with an open or unexported review kept)")
    p.add_argument("--older-than", type=_duration, required=True, help="e.g. 90d")
    p.add_argument("--dry-run", action="store_true", help="count what would go, remove nothing")
    p.add_argument("--database-url", type=str, default=None, help="PostgreSQL URL (default: DATABASE_URL or the private cluster)")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser("migrate", help="apply the database migrations this version has (`run` does it too)")
    p.add_argument("--database-url", type=str, default=None, help="PostgreSQL URL (default: DATABASE_URL or the private cluster)")
    p.set_defaults(fn=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SettingsError, CronError) as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
