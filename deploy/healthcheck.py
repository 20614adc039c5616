"""python -m deploy.healthcheck — the container's HEALTHCHECK: GET /ping on TorchServe's inference API.

With token authorization on (deploy/config.properties), TorchServe 0.12 answers /ping only to the
inference key (400 InvalidKeyException otherwise), and that key expires after token_expiration_min.
serving.client.TorchServeClient reads the key file, and when the key is refused re-reads it (the
ingest job may have renewed it) or renews it with the API key; a renewal rewrites the same file,
which is how the ingest job sees it too.

Exit status 0 when TorchServe says Healthy, 1 otherwise (Docker's HEALTHCHECK contract).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from serving.client import TorchServeClient
from serving.paths import REPO_ROOT
from serving.torchserve import TorchServe

KEY_FILE_ENV = "TORCHSERVE_KEY_FILE"


def local_url(address: str) -> str:
    """A bind address as a URL to call from the same machine: 0.0.0.0 (any) becomes 127.0.0.1."""
    parts = urlsplit(address)
    if parts.hostname in ("0.0.0.0", "::", "[::]"):
        parts = parts._replace(netloc=f"127.0.0.1:{parts.port}" if parts.port else "127.0.0.1")
    return urlunsplit(parts).rstrip("/")


def check(config: Path, key_file: Path | None = None, *, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, one line saying why) for the TorchServe that `config` describes."""
    ts = TorchServe(config=config)
    if ts.token_auth:
        key_file = Path(key_file or os.environ.get(KEY_FILE_ENV) or ts.key_file)
    client = TorchServeClient(local_url(ts.inference_url), local_url(ts.management_url),
                              key_file=key_file if ts.token_auth else None, timeout_s=timeout)
    url = f"{client.urls['inference']}/ping"
    try:
        ping = client.ping()
    except requests.RequestException as exc:  # any failure, even a malformed address, is "unhealthy" here
        return False, f"{url}: {exc.__class__.__name__}: {exc}"
    return ping.healthy, f"{url}: {'Healthy' if ping.healthy else ping.detail}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "config.properties",
                        help="TorchServe config.properties (default: /app/config.properties in the image)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"TorchServe's key_file.json (default: ${KEY_FILE_ENV}, else TorchServe's state folder)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    ok, why = check(args.config, args.key_file, timeout=args.timeout)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
