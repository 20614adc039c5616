"""An HTTP client for TorchServe's inference and management APIs, with token authorization.

TorchServe 0.12 writes its keys to `key_file.json` in its working directory:
    {"management": {"key", "expiration time"}, "inference": {"key", "expiration time"}, "API": {"key"}}
Inference and management keys expire after `token_expiration_min` (default 60); the API key
does not, and `POST /token?type=inference|management` with it makes a new key (TorchServe
rewrites the file). A missing, wrong or expired key is answered with 400 and
`"type": "InvalidKeyException"` — not 401 — even on /ping.

So the client: reads the key file lazily; on InvalidKeyException re-reads it (another process
may have renewed), and if the key was unchanged renews it with the API key; then retries once.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

APIS = ("inference", "management")


class AuthError(RuntimeError):
    pass


def is_invalid_key(response: requests.Response) -> bool:
    if response.status_code != 400:
        return False
    try:
        return response.json().get("type") == "InvalidKeyException"
    except ValueError:
        return False


class TorchServeClient:
    def __init__(self, inference_url: str, management_url: str, *, key_file: Path | None = None,
                 pool_size: int = 16, timeout_s: float = 60.0):
        self.urls = {"inference": inference_url.rstrip("/"), "management": management_url.rstrip("/")}
        self.key_file = Path(key_file) if key_file else None
        self.timeout_s = timeout_s
        self._keys: dict | None = None
        self._lock = threading.Lock()
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    # -- keys ----------------------------------------------------------------------------
    def _load_keys(self) -> dict:
        try:
            return json.loads(self.key_file.read_text())
        except FileNotFoundError as exc:
            raise AuthError(f"token authorization is on but the key file {self.key_file} does not exist") from exc
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot read TorchServe's key file {self.key_file}: {exc}") from exc

    def _key(self, api: str) -> str | None:
        if self.key_file is None:
            return None
        with self._lock:
            if self._keys is None:
                self._keys = self._load_keys()
            return self._keys[api]["key"]

    def forget_keys(self) -> None:
        with self._lock:
            self._keys = None

    def headers(self, api: str) -> dict:
        key = self._key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def refresh_key(self, api: str, stale: str | None) -> None:
        """Re-read the key file; if it still holds the stale key, ask TorchServe for a new one."""
        with self._lock:
            self._keys = self._load_keys()
            if self._keys[api]["key"] != stale:
                return  # someone else renewed it already
            api_key = self._keys["API"]["key"]
            r = self.session.post(f"{self.urls['management']}/token", params={"type": api},
                                  headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout_s)
            if r.status_code != 200:
                raise AuthError(f"renewing the {api} key failed: {r.status_code} {r.text[:200]}")
            self._keys = self._load_keys()

    # -- requests ------------------------------------------------------------------------
    def request(self, api: str, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        extra = kwargs.pop("headers", {}) or {}
        url = f"{self.urls[api]}/{path.lstrip('/')}"
        used = self._key(api)
        response = self.session.request(method, url, headers={**extra, **self.headers(api)}, **kwargs)
        if self.key_file is not None and is_invalid_key(response):
            self.refresh_key(api, used)
            response = self.session.request(method, url, headers={**extra, **self.headers(api)}, **kwargs)
        return response

    def inference(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.request("inference", method, path, **kwargs)

    def management(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.request("management", method, path, **kwargs)
