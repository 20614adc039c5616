"""python -m serving up|down|status — TorchServe (and the private PostgreSQL when DATABASE_URL is unset)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from serving.postgres import Cluster, PostgresError
from serving.torchserve import MODEL_NAME, TorchServe, TorchServeError, latest_archive


def embedded_db() -> bool:
    return not os.environ.get("DATABASE_URL")


def cmd_up(args: argparse.Namespace) -> int:
    ts = TorchServe(config=args.config)
    if embedded_db():
        Cluster().start()
        print(f"postgres: private cluster up on 127.0.0.1:{Cluster().port} ({Cluster().root})")
    archive = Path(args.archive) if args.archive else latest_archive(ts.model_store)
    if archive is None:
        print(f"serving: no {MODEL_NAME}-*.mar in {ts.model_store}: export one (python -m training.export ...)", file=sys.stderr)
        return 2
    ts.start([f"{MODEL_NAME}={archive.name}"])
    print(f"torchserve: up at {ts.inference_url} serving {archive.name} (logs: {ts.log_dir})", flush=True)
    if args.foreground:  # containers: live as long as TorchServe, stop it on SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if ts.stop() else 0))
        code = ts.wait()
        print(f"torchserve: exited with code {code}", file=sys.stderr)
        return 1
    return 0


def cmd_down(args: argparse.Namespace) -> int:
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
    return 0 if up else 3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="TorchServe config.properties (default: the repository's)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start PostgreSQL (embedded default) and TorchServe, wait until ready")
    p.add_argument("--archive", type=str, default=None, help="archive in the model store to serve (default: the newest version)")
    p.add_argument("--foreground", action="store_true", help="stay attached until TorchServe exits (for containers)")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop TorchServe and the private PostgreSQL").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="is it up, and what does it serve").set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.config is None:
        args.config = Path(__file__).resolve().parent.parent / "config.properties"
    try:
        return args.fn(args)
    except (TorchServeError, PostgresError) as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
