"""python -m deploy.healthcheck — the container's HEALTHCHECK: GET /ping on TorchServe's inference API.

With token authorization on (deploy/config.properties), TorchServe 0.12 answers /ping only to the
inference key (400 InvalidKeyException otherwise), and that key expires after token_expiration_min.
So: read the key file and ping with the inference key. When the key is refused, read the file again
(the ingest job may have renewed it meanwhile); if the key in it has expired, renew it with the API
key (GET /token?type=inference on the management API, as TorchServe documents) and ping once more.
A renewal writes the new key into the same file, which is how the ingest job sees it too.

Exit status 0 when TorchServe says Healthy, 1 otherwise (Docker's HEALTHCHECK contract).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from serving.paths import REPO_ROOT, state_dir
from serving.torchserve import load_properties

KEY_FILE_ENV = "TORCHSERVE_KEY_FILE"


@dataclass(frozen=True)
class Keys:
    inference: str
    inference_expires: datetime | None
    api: str | None


def default_key_file() -> Path:
    """TORCHSERVE_KEY_FILE, else key_file.json in TorchServe's state folder (its working directory)."""
    return Path(os.environ.get(KEY_FILE_ENV) or state_dir() / "torchserve" / "key_file.json")


def local_url(address: str) -> str:
    """A bind address as a URL to call from the same machine: 0.0.0.0 (any) becomes 127.0.0.1."""
    parts = urlsplit(address)
    if parts.hostname in ("0.0.0.0", "::", "[::]"):
        parts = parts._replace(netloc=f"127.0.0.1:{parts.port}" if parts.port else "127.0.0.1")
    return urlunsplit(parts).rstrip("/")


def token_auth_enabled(props: dict[str, str]) -> bool:
    # TorchServe 0.12 enforces it unless told otherwise.
    return props.get("disable_token_authorization", "false").strip().lower() != "true"


def read_keys(path: Path) -> Keys | None:
    """The keys TorchServe wrote, or None when the file is absent or half-written."""
    try:
        data = json.loads(Path(path).read_text())
        inference = data["inference"]
    except (FileNotFoundError, PermissionError, ValueError, KeyError, TypeError):
        return None
    expires = inference.get("expiration time")
    try:
        # TorchServe writes nanoseconds ("...T10:48:37.994450934Z"); Python keeps microseconds.
        expires = datetime.fromisoformat(expires) if expires else None
    except ValueError:
        expires = None
    return Keys(inference=inference["key"], inference_expires=expires, api=(data.get("API") or {}).get("key"))


def expired(keys: Keys, now: datetime | None = None) -> bool:
    if keys.inference_expires is None:
        return False
    return (now or datetime.now(timezone.utc)) >= keys.inference_expires


def ping(inference_url: str, key: str | None, timeout: float) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(f"{inference_url}/ping", headers=headers, timeout=timeout)


def refused(r: requests.Response) -> bool:
    """TorchServe's answer to a missing, wrong or expired key (a 400, not a 401)."""
    try:
        return r.status_code in (400, 401) and r.json().get("type") == "InvalidKeyException"
    except ValueError:
        return False


def renew(management_url: str, api_key: str, timeout: float) -> None:
    r = requests.get(f"{management_url}/token", params={"type": "inference"},
                     headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    r.raise_for_status()


def check(config: Path, key_file: Path | None = None, *, timeout: float = 5.0, allow_renew: bool = True) -> tuple[bool, str]:
    """(healthy, one line saying why) for the TorchServe that `config` describes."""
    props = load_properties(config)
    inference_url = local_url(props.get("inference_address", "http://127.0.0.1:8080"))
    management_url = local_url(props.get("management_address", "http://127.0.0.1:8081"))
    keys = None
    if token_auth_enabled(props):
        key_file = Path(key_file or default_key_file())
        keys = read_keys(key_file)
        if keys is None:
            return False, f"no readable TorchServe key file at {key_file} (not started yet?)"
    try:
        r = ping(inference_url, keys and keys.inference, timeout)
        if keys is not None and refused(r):
            again = read_keys(key_file)
            if again is not None and again.inference != keys.inference:
                keys = again  # someone renewed it since we read it
            elif again is not None and expired(again) and again.api and allow_renew:
                renew(management_url, again.api, timeout)
                keys = read_keys(key_file) or again
            r = ping(inference_url, keys.inference, timeout)
    except requests.RequestException as exc:
        return False, f"{inference_url}/ping: {exc.__class__.__name__}: {exc}"
    try:
        status = r.json().get("status")
    except ValueError:
        status = None
    if r.status_code == 200 and status == "Healthy":
        return True, f"{inference_url}/ping: Healthy"
    return False, f"{inference_url}/ping: HTTP {r.status_code} {r.text.strip()[:200]}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "config.properties",
                        help="TorchServe config.properties (default: /app/config.properties in the image)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"TorchServe's key_file.json (default: ${KEY_FILE_ENV}, else $RC_STATE_DIR/torchserve/key_file.json)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")
    parser.add_argument("--no-renew", action="store_true", help="never renew an expired inference key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    ok, why = check(args.config, args.key_file, timeout=args.timeout, allow_renew=not args.no_renew)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
