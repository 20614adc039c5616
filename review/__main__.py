"""python -m review serve | up | down | add-reviewer NAME | deactivate NAME | reviewers | lead NAME |
audit-share X | quality | gold DIR | export --out DIR

The review desk: a web page where staff decide the needs-review queue (and an audit sample of
the confidently accepted answers), and the export of their decisions as a training catalogue.
PostgreSQL: DATABASE_URL, else the private cluster of `python -m serving up` (as ingest does).
"""
from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ingest import db
from ingest.report import since_arg
from review import process, queue

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


def _database_url(args: argparse.Namespace) -> str:
    from serving.postgres import database_url

    return database_url(getattr(args, "database_url", None))


def _migrated_url(args: argparse.Namespace) -> str:
    url = _database_url(args)
    pending = db.pending_migrations(url)
    if pending:
        raise queue.ReviewError(f"the database lacks the migration(s) {', '.join(pending)}; "
                                f"run `python -m ingest migrate` first")
    return url


def _writable_url(args: argparse.Namespace) -> str:
    """The database, with this version's migrations applied (as `ingest run` does; serialized by a lock)."""
    url = _database_url(args)
    db.migrate(url)
    return url


def _model_store(args: argparse.Namespace) -> Path | None:
    if args.model_store:
        return args.model_store
    from serving.paths import REPO_ROOT
    from serving.torchserve import load_properties

    props = load_properties(REPO_ROOT / "config.properties")
    return REPO_ROOT / props.get("model_store", "model_store")


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from waitress import create_server

    from review.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = _writable_url(args)
    db.use_pool(url, args.threads)  # one connection kept per request handled at once
    app = create_app(url, state=process.review_state(), lease_s=args.lease, model_store=_model_store(args),
                     secure_cookies=args.secure_cookies, proxies=args.proxies, order=args.order)
    # waitress reads each request whole in its I/O loop before a worker thread sees it: an idle or
    # slow connection costs a socket, never a thread. Threads, connections and idle time are bounded.
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           connection_limit=args.connection_limit, channel_timeout=args.idle_timeout,
                           ident="review-desk", expose_tracebacks=False)
    if not loopback(args.host) and not args.secure_cookies:
        message = (f"listening on {args.host}, beyond this machine, without --secure-cookies: the session cookie "
                   f"travels in clear wherever the connection is not HTTPS. Put a TLS proxy in front and pass "
                   f"--secure-cookies (REVIEW_SECURE_COOKIES=1)")
        print(f"review: WARNING: {message}", file=sys.stderr, flush=True)
        logging.getLogger("review").warning(message)
    print(f"review: serving on http://{args.host}:{server.effective_port}/ with waitress ({args.threads} threads, "
          f"at most {args.connection_limit} connections, idle ones closed after {args.idle_timeout} s; Ctrl-C stops)",
          flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _serve_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--lease", str(args.lease), "--threads", str(args.threads), "--connection-limit", str(args.connection_limit),
             "--idle-timeout", str(args.idle_timeout), "--proxies", str(args.proxies), "--order", args.order]
    if args.model_store:
        flags += ["--model-store", str(args.model_store)]
    if args.secure_cookies:
        flags.append("--secure-cookies")
    return flags


def cmd_up(args: argparse.Namespace) -> int:
    _writable_url(args)  # start the private cluster and migrate first, and fail here rather than in the background
    try:
        url = process.start(args.host, args.port, _serve_flags(args))
    except RuntimeError as exc:
        raise queue.ReviewError(str(exc)) from exc
    print(f"review: up at {url} (log: {process.log_file()}; `python -m review down` stops it)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    print("review: stopped" if process.stop() else "review: was not running")
    return 0


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated)."""
    if args.generate_password:
        import secrets

        return secrets.token_urlsafe(12), True
    if args.password_file == "-":
        return sys.stdin.readline().rstrip("\r\n"), False
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n"), False
        except OSError as exc:
            raise queue.ReviewError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from exc
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n"), False
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise queue.ReviewError("the two passwords differ")
    return first, False


def cmd_add_reviewer(args: argparse.Namespace) -> int:
    url = _writable_url(args)
    password, generated = _read_password(args)
    _, created = queue.add_reviewer(url, args.name, password, replace=args.replace)
    print(f"review: reviewer {args.name} {'created' if created else 'has a new password'}"
          + (f"; password: {password}" if generated else ""))
    return 0


def cmd_deactivate(args: argparse.Namespace) -> int:
    ended, released = queue.deactivate(_writable_url(args), args.name)
    print(f"review: reviewer {args.name} deactivated: {ended} session(s) ended, {released} held item(s) back in the "
          f"queue; `add-reviewer {args.name} --replace` reactivates it with a new password")
    return 0


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def cmd_reviewers(args: argparse.Namespace) -> int:
    rows = queue.reviewers(_writable_url(args))
    header = ("name", "active", "lead", "last login", "decisions", "last decision", "sessions")
    table = [header] + [(r["name"], "yes" if r["active"] else f"no (since {_when(r['deactivated_at'])})",
                         "yes" if r["lead"] else "",
                         _when(r["last_login_at"]), str(r["decisions"]), _when(r["last_decision_at"]), str(r["sessions"]))
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_audit_share(args: argparse.Namespace) -> int:
    share = queue.set_audit_share(_writable_url(args), args.share)
    print(f"review: {share:.2%} of the confidently accepted predictions recorded from now on also enter the queue as audit items")
    return 0


def cmd_lead(args: argparse.Namespace) -> int:
    queue.set_lead(_writable_url(args), args.name, not args.off)
    print(f"review: {args.name} {'is no longer' if args.off else 'is'} a lead"
          + ("" if args.off else " (the Lead page: reviewers' accuracy on gold items, agreement per pair)"))
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    audit = None if args.second_opinion_audit is None else args.second_opinion_audit == "on"
    got = queue.set_quality(_writable_url(args), gold_share=args.gold_share,
                            second_opinion_share=args.second_opinion_share, second_opinion_audit=audit)
    print(f"review: gold items {got['gold_share']:.2%} of what a reviewer is shown; second opinion on "
          f"{'every audit item and ' if got['second_opinion_audit'] else ''}{got['second_opinion_share']:.2%} of "
          f"the items decided from now on")
    return 0


GOLD_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def cmd_gold(args: argparse.Namespace) -> int:
    """DIR/<category>/<photo>: photos of known label (a catalogue's test split) that the inbox
    has already taken in. `other` is "not a refund category"; a folder that is not one of the
    model's categories is refused photo by photo (a misspelt label would score every reviewer wrong)."""
    import hashlib

    from review.categories import Categories
    from serving.archive import OTHER_LABEL

    url = _writable_url(args)
    categories = Categories(url, _model_store(args))
    if not args.dir.is_dir():
        raise queue.ReviewError(f"{args.dir} is not a folder (expected DIR/<category>/<photo>)")
    counts: dict[str, int] = {}
    missing = []
    for folder in sorted(p for p in args.dir.iterdir() if p.is_dir()):
        label = folder.name
        for photo in sorted(folder.iterdir()):
            if not photo.is_file() or photo.suffix.lower() not in GOLD_SUFFIXES:
                continue
            sha = hashlib.sha256(photo.read_bytes()).hexdigest()
            model = queue.prediction_of(url, sha)
            if model is None:
                status = "not recorded"
            elif label != OTHER_LABEL and label not in categories.for_version(*model):
                status = "unknown category"
            else:
                status = queue.add_gold(url, sha, label)
            counts[status] = counts.get(status, 0) + 1
            if status in ("not recorded", "unknown category"):
                missing.append((photo, status))
    print(f"review gold: {counts.get('added', 0)} photos added, {counts.get('known', 0)} gold already, "
          f"{counts.get('not recorded', 0)} not taken in by the inbox yet, "
          f"{counts.get('unknown category', 0)} in a folder that is not one of the model's categories")
    for photo, status in missing[:10]:
        print(f"  {status}: {photo}" + (" (drop it into the inbox, then run this again)" if status == "not recorded"
                                       else f" ({photo.parent.name!r} is not a category of the model that answered it)"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from review.export import ExportError, export

    logging.basicConfig(level=logging.WARNING, format="review export: %(message)s")
    try:
        summary = export(_migrated_url(args), args.out, since=args.since)
    except ExportError as exc:
        raise queue.ReviewError(str(exc)) from exc
    labels = ", ".join(f"{k} {v}" for k, v in sorted(summary.labels.items())) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "none"
    print(f"review export: {summary.written} photos to {args.out} ({summary.copied} JPEG copied, "
          f"{summary.converted} re-encoded); labels: {labels}; skipped: {skipped}")
    return 0


def _share(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Invalid share {text!r}; give a fraction (0.02) or a percentage (2%)") from exc
    return value


def _whole(low: int, high: int | None = None):
    """A whole number in [low, high]: argparse's `type`, and the check of a REVIEW_* setting."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}" if high is not None
                                             else f"{value} is less than {low}")
        return value
    return convert


def _order(text: str) -> str:
    if text not in queue.ORDERS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(queue.ORDERS)}")
    return text


def _setting(name: str, default, convert):
    """A REVIEW_* setting from the environment, checked like its option: a bad one stops here, named."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return convert(text)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"python -m review: {name}={text!r}: {exc}") from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m review", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", type=str, default=None,
                        help="PostgreSQL URL (default: DATABASE_URL or the private cluster)")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--host", type=str, default=os.environ.get("REVIEW_HOST", DEFAULT_HOST),
                        help="address to bind (default: REVIEW_HOST or 127.0.0.1)")
    server.add_argument("--port", type=_whole(0, 65535), default=_setting("REVIEW_PORT", DEFAULT_PORT, _whole(0, 65535)),
                        help=f"port (default: REVIEW_PORT or {DEFAULT_PORT})")
    server.add_argument("--lease", type=_whole(1), default=_setting("REVIEW_LEASE_S", queue.DEFAULT_LEASE_S, _whole(1)),
                        help="seconds a reviewer holds an item before it goes back to the queue (default: REVIEW_LEASE_S or 600)")
    server.add_argument("--model-store", type=Path, default=os.environ.get("REVIEW_MODEL_STORE") or None,
                        help="where the archives are, for each version's category list (default: REVIEW_MODEL_STORE "
                             "or config.properties' model_store)")
    server.add_argument("--secure-cookies", action="store_true", default=os.environ.get("REVIEW_SECURE_COOKIES") == "1",
                        help="send the session cookie over HTTPS only (behind a TLS proxy)")
    server.add_argument("--order", type=_order, default=_setting("REVIEW_ORDER", "oldest", _order),
                        help="which open item a reviewer gets next: the oldest, or the least confident answer "
                             "(uncertain: a short shift resolves what the model knows least) (default: REVIEW_ORDER or oldest)")
    server.add_argument("--threads", type=_whole(1), default=_setting("REVIEW_THREADS", 8, _whole(1)),
                        help="requests handled at once (default: REVIEW_THREADS or 8)")
    server.add_argument("--connection-limit", type=_whole(1), default=_setting("REVIEW_CONNECTION_LIMIT", 500, _whole(1)),
                        help="open connections at most; more wait to be accepted (default: REVIEW_CONNECTION_LIMIT or 500)")
    server.add_argument("--idle-timeout", type=_whole(1), default=_setting("REVIEW_IDLE_TIMEOUT_S", 60, _whole(1)),
                        help="seconds an idle connection stays open (default: REVIEW_IDLE_TIMEOUT_S or 60)")
    server.add_argument("--proxies", type=_whole(0), default=_setting("REVIEW_PROXIES", 0, _whole(0)),
                        help="reverse proxies in front that set X-Forwarded-For/-Proto: the client address that "
                             "login throttling counts is read from them (default: REVIEW_PROXIES or 0)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", parents=[common, server], help="the review web page, in the foreground")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("up", parents=[common, server], help="the review web page in the background (pid file and log in the state folder)")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the background review web page").set_defaults(fn=cmd_down)
    p = sub.add_parser("add-reviewer", parents=[common], help="create a reviewer account")
    p.add_argument("name", type=str, help="login name: letters, digits, '.', '_', '@', '-'")
    p.add_argument("--password-file", type=str, default=None, help="read the password from the first line of this file ('-': stdin)")
    p.add_argument("--generate-password", action="store_true", help="make a random password and print it")
    p.add_argument("--replace", action="store_true", help="set a new password for an existing reviewer")
    p.set_defaults(fn=cmd_add_reviewer)
    p = sub.add_parser("deactivate", parents=[common], help="shut a reviewer's account: no login, sessions ended at once")
    p.add_argument("name", type=str)
    p.set_defaults(fn=cmd_deactivate)
    p = sub.add_parser("reviewers", parents=[common], help="every reviewer: active, last login, decisions, open sessions")
    p.set_defaults(fn=cmd_reviewers)
    p = sub.add_parser("audit-share", parents=[common], help="the share of accepted predictions audited (default 0.02)")
    p.add_argument("share", type=_share, help="a fraction (0.02) or a percentage (2%%)")
    p.set_defaults(fn=cmd_audit_share)
    p = sub.add_parser("lead", parents=[common], help="make a reviewer a lead (the Lead page), or not with --off")
    p.add_argument("name", type=str)
    p.add_argument("--off", action="store_true", help="no longer a lead")
    p.set_defaults(fn=cmd_lead)
    p = sub.add_parser("quality", parents=[common], help="gold items and second opinions (prints the settings; "
                       "options change them)")
    p.add_argument("--gold-share", type=_share, default=None,
                   help="share of what a reviewer is shown that is a gold item, a photo of known label (default 0.02)")
    p.add_argument("--second-opinion-share", type=_share, default=None,
                   help="share of decided items (any) that also go to a second reviewer, blind (default 0)")
    p.add_argument("--second-opinion-audit", choices=("on", "off"), default=None,
                   help="every decided audit item goes to a second reviewer (default on)")
    p.set_defaults(fn=cmd_quality)
    p = sub.add_parser("gold", parents=[common], help="photos of known label, DIR/<category>/<photo>, already "
                       "taken in by the inbox, as gold items")
    p.add_argument("dir", type=Path)
    p.add_argument("--model-store", type=Path, default=os.environ.get("REVIEW_MODEL_STORE") or None,
                   help="where the archives are, for each version's category list (as for serve)")
    p.set_defaults(fn=cmd_gold)
    p = sub.add_parser("export", parents=[common], help="decided photos as a Kaggle-layout catalogue (styles.csv + images/)")
    p.add_argument("--out", type=Path, required=True, help="new folder to write styles.csv and images/ into")
    p.add_argument("--since", type=since_arg, default=datetime(1970, 1, 1, tzinfo=timezone.utc),
                   help="only decisions made at or after this ISO date or datetime (UTC unless given)")
    p.set_defaults(fn=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return args.fn(args)
    except queue.ReviewError as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
