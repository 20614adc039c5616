"""python -m serving up|down|status|rollout|rollback|versions|retire

TorchServe (and the private PostgreSQL when DATABASE_URL is unset), and the versions of
refund_classifier it serves (see serving/rollout.py and docs/ROLLOUTS.md)."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path

from serving import rollout
from serving.client import AuthError
from serving.postgres import Cluster, PostgresError
from serving.rollout import RolloutError
from serving.torchserve import TorchServe, TorchServeError, java_runtime


# Where `up --foreground` keeps a copy of the inference key alone (token authorization on).
INFERENCE_KEY_ENV = "RC_INFERENCE_KEY_FILE"


def embedded_db() -> bool:
    return not os.environ.get("DATABASE_URL")


def cmd_up(args: argparse.Namespace) -> int:
    ts = TorchServe(config=args.config)
    if embedded_db():
        cluster = Cluster()
        print(cluster.programs().line(), flush=True)
        t0 = time.monotonic()
        cluster.start()
        for note in cluster.notes:
            print(f"postgres: {note}")
        print(f"postgres: private cluster up on 127.0.0.1:{cluster.port} as {cluster.runs_as()} in "
              f"{time.monotonic() - t0:.1f}s (data: {cluster.data})")
    print(java_runtime().line(), flush=True)
    t0 = time.monotonic()
    version = rollout.serve(ts, args.archive)
    print(f"torchserve: up at {ts.inference_url} serving refund_classifier version {version} as the default "
          f"in {time.monotonic() - t0:.1f}s (logs: {ts.log_dir})", flush=True)
    if args.foreground:  # containers: live as long as TorchServe, stop it on SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if ts.stop() else 0))
        # A client allowed inference only (the compose ingest job) reads a copy holding that key alone.
        export_to = os.environ.get(INFERENCE_KEY_ENV)
        while True:
            if export_to and ts.token_auth:
                ts.export_inference_key(Path(export_to))
            code = ts.wait(timeout=2.0)
            if code is not None:
                break
        print(f"torchserve: exited with code {code}", file=sys.stderr)
        return 1
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    # The review desk of `python -m review up` reads this PostgreSQL: it stops first. (review.process
    # is its pid file alone, no Flask.)
    from review import process as review_process

    if review_process.stop():
        print("review: stopped")
    ts = TorchServe(config=args.config)
    print("torchserve: stopped" if ts.stop() else "torchserve: was not running")
    if embedded_db():
        print("postgres: stopped" if Cluster().stop() else "postgres: was not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    ts = TorchServe(config=args.config)
    up = ts.healthy()
    print(f"torchserve: {'healthy' if up else 'down'} at {ts.inference_url}")
    if up:
        for m in ts.models():
            print(f"  model {m['modelName']}: {m['modelUrl']}")
    if embedded_db():
        print(f"postgres: {'running' if Cluster().running() else 'down'} (private cluster, port {Cluster().port})")
    else:
        print("postgres: DATABASE_URL is set; not managed here")
    from review import process as review_process

    if review_process.running_pid() is not None:
        print(f"review: running at {review_process.address()} (python -m review down stops it)")
    return 0 if up else 3


def cmd_rollout(args: argparse.Namespace) -> int:
    ts = TorchServe(config=args.config)
    outcome = rollout.rollout(ts, args.archive, sample_dir=args.sample, tolerance=args.tolerance,
                              workers=args.workers, limit=args.limit or None)
    print(outcome.report(), file=sys.stdout if outcome.promoted else sys.stderr)
    return 0 if outcome.promoted else 4


def cmd_rollback(args: argparse.Namespace) -> int:
    was, now = rollout.rollback(TorchServe(config=args.config))
    print(f"rollback: refund_classifier default {was} -> {now} ({was} stays registered; 'retire' unregisters it)")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    ts = TorchServe(config=args.config)
    rows, live = rollout.versions(ts)
    if not live:
        print(f"torchserve: down at {ts.inference_url}; the versions recorded in "
              f"{rollout.State.load(ts.model_store).path}:")
    table = [("", "version", "archive", "registered", "promoted", "workers")]
    table += [("*" if r.default else "", r.version, r.archive, r.registered_at, r.promoted_at, r.workers) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    if not rows:
        print("(no version of refund_classifier)")
    print("* = the default: what /predictions/refund_classifier serves")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    retired = rollout.retire(TorchServe(config=args.config), args.keep)
    print(f"retire: {len(retired)} version(s) unregistered" + (f": {', '.join(retired)}" if retired else ""))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="TorchServe config.properties (default: the repository's)")
    # --config is also accepted after the command (`serving up --foreground --config X`, as compose writes it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TorchServe config.properties (default: the repository's)")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    p = add("up", help="start PostgreSQL (embedded default) and TorchServe, wait until ready")
    p.add_argument("--archive", type=str, default=None,
                   help="archive in the model store to serve as the default (default: the recorded default, else the newest version)")
    p.add_argument("--foreground", action="store_true", help="stay attached until TorchServe exits (for containers)")
    p.set_defaults(fn=cmd_up)
    add("down", help="stop the review desk (python -m review up), TorchServe and the private PostgreSQL").set_defaults(fn=cmd_down)
    add("status", help="is it up, and what does it serve").set_defaults(fn=cmd_status)
    p = add("rollout", help="register an archive as a new version, test it, promote it if it is not worse")
    p.add_argument("archive", type=str, help="model_store/refund_classifier-V.mar (or its file name in the model store)")
    p.add_argument("--sample", type=Path, default=None,
                   help="labelled Kaggle-layout folder (styles.csv with id,articleType + images/<id>.jpg), e.g. a "
                        "reviewed export (python -m review export), to compare on; images labelled 'other' count right "
                        "when answered 'other' (default: the sample inside the archive)")
    p.add_argument("--tolerance", type=float, default=rollout.DEFAULT_TOLERANCE,
                   help="how much lower (absolute top-1, e.g. 0.02) the new version may score than the default and still be "
                        "promoted; on a sample with images labelled 'other', on top-1 over all images as well")
    p.add_argument("--workers", type=int, default=None, help="workers for the new version (default: minWorkers of its model-config.yaml)")
    p.add_argument("--limit", type=int, default=rollout.DEFAULT_LIMIT, help="at most this many sample images, spread evenly (0: all)")
    p.set_defaults(fn=cmd_rollout)
    add("rollback", help="make the previous default version the default again").set_defaults(fn=cmd_rollback)
    add("versions", help="every version, the default marked, with archive and registration time").set_defaults(fn=cmd_versions)
    p = add("retire", help="unregister all versions but the latest N defaults (archives stay)")
    p.add_argument("--keep", type=int, required=True, help="how many of the latest defaults to keep registered (>= 1, the current one included)")
    p.set_defaults(fn=cmd_retire)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.config is None:
        args.config = Path(__file__).resolve().parent.parent / "config.properties"
    try:
        return args.fn(args)
    except (TorchServeError, PostgresError, RolloutError, AuthError) as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
