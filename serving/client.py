"""An HTTP client for TorchServe's inference and management APIs, with token authorization.

TorchServe 0.12 writes its keys to `key_file.json` in its working directory:
    {"management": {"key", "expiration time"}, "inference": {"key", "expiration time"}, "API": {"key"}}
Inference and management keys expire after `token_expiration_min` (default 60); the API key
does not, and `POST /token?type=inference|management` with it makes a new key (TorchServe
rewrites the file). A missing, wrong or expired key is answered with 400 and
`"type": "InvalidKeyException"` — not 401 — even on /ping.

So the client: reads the key file lazily; on InvalidKeyException re-reads it (another process
may have renewed), and if the key was unchanged renews it with the API key; then retries once.

It also reads TorchServe's answers, in one place for every caller (ingestion, rollout's smoke test,
the container healthcheck): `classify()` returns an `Answer` about the photo (a prediction, or the
handler's rejection of that photo) or raises `Transient` (ask again later), `Refused` (not about the
photo: no such model, or a token is required and there is no key file: stop) or `Unexpected`
(an answer that is neither: give up on this photo). `ping()` returns a `Ping`.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

APIS = ("inference", "management")


class AuthError(RuntimeError):
    pass


# No answer, but the server may well come back: a refused or dropped connection, a timeout, or a
# key file that cannot be read (TorchServe rewrites it while it restarts).
UNREACHABLE = (requests.ConnectionError, requests.Timeout, AuthError)

TOKEN_REQUIRED = ("TorchServe requires a token (400 InvalidKeyException): "
                  "give its key_file.json with --key-file or TORCHSERVE_KEY_FILE")


def body_of(response: requests.Response) -> dict:
    """The JSON object TorchServe answered, or {"error": text} when the answer is not one."""
    try:
        body = response.json()
    except ValueError:
        return {"error": response.text[:500]}
    return body if isinstance(body, dict) else {"error": str(body)[:500]}


def is_invalid_key(response: requests.Response) -> bool:
    """TorchServe's answer to a missing, wrong or expired key: 400 (not 401) with this type."""
    return response.status_code == 400 and body_of(response).get("type") == "InvalidKeyException"


# -- answers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """TorchServe's verdict on one photo: a prediction (ok) or the handler's rejection of that photo.

    body is what to record: {"label","confidence","topk","needs_review","model","version"} when ok,
    else {"code","error"} (e.g. code "corrupt", "too_large")."""

    ok: bool
    body: dict


class Transient(Exception):
    """No verdict now; asking again later may get one. down: TorchServe itself is unavailable
    (unreachable, 503/507, 408/429, token refused), as opposed to a 5xx about this request."""

    def __init__(self, reason: str, *, down: bool):
        super().__init__(reason)
        self.reason, self.down = reason, down


class Refused(Exception):
    """Not about one photo and not going away by itself: no such model, or a token is required
    and this client has no key file. Asking again with another photo gets the same."""


class Unexpected(Exception):
    """An answer that is neither a verdict on the photo nor a known server state."""


def read_answer(response: requests.Response, *, model: str, has_key_file: bool) -> Answer:
    """Map TorchServe's answer to POST /predictions/`model` onto an Answer, or raise Transient,
    Refused or Unexpected. The order of the checks matters: see each comment."""
    body, code = body_of(response), response.status_code
    if code == 200 and "label" in body:
        return Answer(True, body)
    if is_invalid_key(response):
        # The client already re-read the key file and renewed the key: this is not about the photo.
        if not has_key_file:
            raise Refused(TOKEN_REQUIRED)
        raise Transient(f"token refused: {body.get('message', body)}", down=True)
    if code >= 500:  # 503: no worker free / model loading; 507: out of memory -- TorchServe is down for now
        raise Transient(f"HTTP {code}: {body.get('message') or body.get('error') or body}", down=code in (503, 507))
    if code == 404:
        raise Refused(f"TorchServe has no model {model!r}: {body.get('message', body)}")
    if code in (408, 429):
        raise Transient(f"HTTP {code}", down=True)
    if 400 <= code < 500 and isinstance(body.get("code"), str) and "error" in body:
        return Answer(False, body)  # the handler's answer about this photo
    if code == 413:  # TorchServe's own limit (max_request_size), before the handler sees it
        return Answer(False, {"code": "too_large", "error": f"TorchServe refused the request as too large: {body.get('message', body)}"})
    raise Unexpected(f"unexpected answer HTTP {code}: {str(body)[:300]}")


@dataclass(frozen=True)
class Ping:
    """TorchServe's answer to GET /ping. status_code None: no answer (`detail` says why)."""

    status_code: int | None
    detail: str
    invalid_key: bool = False
    status: str | None = None  # "Healthy", "Unhealthy", "Partial Healthy"

    @property
    def healthy(self) -> bool:
        return self.status_code == 200 and self.status == "Healthy"


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

    # -- answers -------------------------------------------------------------------------
    def classify(self, model: str, data: bytes, *, timeout: float | tuple[float, float] | None = None) -> Answer:
        """POST one photo to predictions/`model` (NAME or NAME/VERSION): an Answer, or raises
        Transient, Refused or Unexpected (see read_answer)."""
        try:
            r = self.inference("POST", f"predictions/{model}", data=data,
                               headers={"Content-Type": "application/octet-stream"}, timeout=timeout or self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}", down=True) from exc
        except AuthError as exc:  # e.g. the key file is rewritten while TorchServe restarts
            raise Transient(f"authorization: {exc}", down=True) from exc
        return read_answer(r, model=model, has_key_file=self.key_file is not None)

    def ping(self, *, timeout: float | tuple[float, float] | None = None) -> Ping:
        """GET /ping. No answer (UNREACHABLE) is a Ping too; any other requests error (e.g. a URL
        without http://) is raised: it is a mistake in the settings, not a server state."""
        try:
            r = self.inference("GET", "ping", timeout=timeout or self.timeout_s)
        except UNREACHABLE as exc:
            return Ping(None, f"{type(exc).__name__}: {exc}")
        body = body_of(r)
        return Ping(r.status_code, f"HTTP {r.status_code} {r.text.strip()[:200]}", invalid_key=is_invalid_key(r),
                    status=body.get("status") if isinstance(body.get("status"), str) else None)
