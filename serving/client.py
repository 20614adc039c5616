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
handler's rejection of that photo) or raises `Transient` (ask again later) or `Refused` (not about
the photo, and asking again cannot help: stop), following `ANSWERS`, the one table of what an
answer means. `classify_many()` sends several photos in one request and reads each item of the
list it gets through the same table (`read_answers`). `ping()` returns a `Ping`.

A key file may hold the inference key alone (the compose ingest container's copy, written by
`python -m serving up --foreground`): such a client cannot renew a refused key itself; it re-reads
the file, which follows TorchServe's renewals within seconds, and meanwhile the refusal is transient.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
from requests.adapters import HTTPAdapter

APIS = ("inference", "management")


class AuthError(RuntimeError):
    pass


# No answer, but the server may well come back: a refused or dropped connection, a timeout, or a
# key file that cannot be read (TorchServe rewrites it while it restarts).
UNREACHABLE = (requests.ConnectionError, requests.Timeout, AuthError)

# Read timeout of one request: above TorchServe's responseTimeout (120 s: handler/model-config.yaml,
# config.properties' default_response_timeout), so that TorchServe, not the client, gives up on a slow
# batch first. A client giving up sooner would send the photo again while the first request still
# occupies the worker -- twice the work exactly when the worker is slowest -- and would read a
# timeout where TorchServe answers what happened (a restarted worker, 507).
READ_TIMEOUT_S = 150.0

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
    (see ANSWERS), as opposed to an answer about this one request. worker_died: TorchServe's
    "Worker died.": the worker process that held this request's batch crashed, or was killed for
    not answering within responseTimeout, and is being restarted (a photo in the batch may be the
    cause: ingest.predict isolates it)."""

    def __init__(self, reason: str, *, down: bool, worker_died: bool = False):
        super().__init__(reason)
        self.reason, self.down, self.worker_died = reason, down, worker_died


WORKER_DIED = "Worker died."  # TorchServe's message (WorkerThread) for the batch a dying worker held


class Refused(Exception):
    """Not about one photo and not going away by itself: no such model, or a token is required
    and this client has no key file. Asking again with another photo gets the same."""


@dataclass(frozen=True)
class Rule:
    """One row of ANSWERS: when TorchServe's answer is `what` (`matches`), it `means` one of:
    ok / rejected  a verdict on the photo: record it (the photo leaves the inbox);
    refused        about this run's settings, not the photo: stop the run now (Refused);
    down           TorchServe is unavailable: ask again with backoff (Transient(down=True));
    transient      no verdict now: ask again with backoff (Transient(down=False))."""

    what: str
    matches: Callable[[int, dict, bool], bool]  # (status code, body_of(response), has_key_file)
    means: str


def _handler_code(body: dict) -> bool:
    """The handler's own rejection carries a string `code` and an `error`; TorchServe's frontend
    answers with an integer `code`, a `type` and a `message` (ModelNotFoundException, ...)."""
    return isinstance(body.get("code"), str) and "error" in body


def _invalid_key(code: int, body: dict) -> bool:
    return code == 400 and body.get("type") == "InvalidKeyException"


# What TorchServe's answer to POST /predictions/MODEL means: the one rule, first matching row wins.
# Only a 4xx carrying the handler's own `code`, or the frontend's 413 for an over-size request, is a
# verdict on the photo (quarantine); a 200 with a label is the prediction. A missing model or a
# missing key file stops the run. Every other answer is transient: asked again with backoff; when
# the retries run out, `down` stops the run (TorchServe unavailable, exit 3) and `transient` leaves
# the photo in the inbox for the next run (exit 1) -- never quarantined.
# No answer at all (connection refused or dropped, a timeout, a key file that cannot be read or
# holds no key to renew with) is `down` too: see TorchServeClient.classify.
# A request carrying several photos (classify_many) is answered with a list, and each item goes
# through these same rows on its own; an answer that is not that list is about the whole request
# and a verdict on none of its photos (read_answers).
ANSWERS: tuple[Rule, ...] = (
    Rule("200 with a label: the prediction",
         lambda code, body, keyed: code == 200 and "label" in body, "ok"),
    Rule("4xx with the handler's own string `code` and `error`: its rejection of this photo",
         lambda code, body, keyed: 400 <= code < 500 and _handler_code(body), "rejected"),
    Rule("413 from the frontend: the request is over max_request_size (the handler never saw it)",
         lambda code, body, keyed: code == 413, "rejected"),
    Rule("404: no such model or version",
         lambda code, body, keyed: code == 404, "refused"),
    Rule("400 InvalidKeyException and no key file: a token is required",
         lambda code, body, keyed: _invalid_key(code, body) and not keyed, "refused"),
    Rule("400 InvalidKeyException with a key file, already re-read (and renewed if it could be)",
         lambda code, body, keyed: _invalid_key(code, body), "down"),
    Rule("503 (no worker free, queue full), 507 (worker died, out of memory), 408, 429",
         lambda code, body, keyed: code in (503, 507, 408, 429), "down"),
    Rule("500 'Worker died.': the worker died holding the batch (TorchServe's frontend answers 507 only "
         "when it has already seen the process killed, else 500) and is being restarted",
         lambda code, body, keyed: code == 500 and body.get("message") == WORKER_DIED, "down"),
    Rule("anything else: 500, 502, 504, a 4xx without the handler's code, a body that is not "
         "TorchServe's, a 200 without a label",
         lambda code, body, keyed: True, "transient"),
)


def read_answer(response: requests.Response, *, model: str, has_key_file: bool) -> Answer:
    """Map TorchServe's answer to POST /predictions/`model` onto an Answer, or raise Transient or
    Refused, by the first row of ANSWERS that matches."""
    return _answer(response.status_code, body_of(response), model=model, has_key_file=has_key_file)


def _answer(code: int, body: dict, *, model: str, has_key_file: bool) -> Answer:
    """(status, body) -> an Answer, or Transient or Refused, by the first row of ANSWERS that matches."""
    rule = next(r for r in ANSWERS if r.matches(code, body, has_key_file))
    detail = body.get("message") or body.get("error") or body
    if rule.means == "ok":
        return Answer(True, body)
    if rule.means == "rejected":
        if _handler_code(body):
            return Answer(False, body)
        return Answer(False, {"code": "too_large", "error": f"TorchServe refused the request as too large: {detail}"})
    if rule.means == "refused":
        raise Refused(TOKEN_REQUIRED if _invalid_key(code, body) else f"TorchServe has no model {model!r}: {detail}")
    if _invalid_key(code, body):
        raise Transient(f"token refused: {detail}", down=True)
    raise Transient(f"HTTP {code}: {str(detail)[:300]}", down=rule.means == "down",
                    worker_died=code >= 500 and body.get("message") == WORKER_DIED)


def read_answers(response: requests.Response, n: int, *, model: str, has_key_file: bool) -> list[Answer | Transient]:
    """TorchServe's answer to a request carrying `n` photos -> one Answer or Transient per photo, in
    order; raises Refused (about the run, not the photos).

    A 200 with a list of n items is read item by item through ANSWERS, each with its own `status`
    (200 when absent: the handler gives every error item the status it would have got alone), so
    that a per-item rejection is a verdict on that photo exactly as it would be alone. Any other
    answer is about the request as a whole: Refused stops the run as it would for one photo, and
    everything else -- a rejection of the whole request (bad_request, too_many_photos, the
    frontend's 413 for a request over max_request_size) included -- is a verdict on none of its
    photos: Transient for every one of them (down when ANSWERS says TorchServe is down)."""
    code = response.status_code
    try:
        items = response.json()
    except ValueError:
        items = None
    if code == 200 and isinstance(items, list) and len(items) == n:
        out: list[Answer | Transient] = []
        for item in items:
            if not isinstance(item, dict):
                out.append(Transient(f"an item of the answer is not an object: {str(item)[:200]}", down=False))
                continue
            status = item.get("status", 200)
            try:
                out.append(_answer(status if isinstance(status, int) else 0, item, model=model, has_key_file=has_key_file))
            except Transient as exc:
                out.append(exc)
            except Refused as exc:  # an item cannot stop the run: not an answer we understand
                out.append(Transient(f"an item of the answer is not a verdict: {exc}", down=False))
        return out
    try:
        answer = read_answer(response, model=model, has_key_file=has_key_file)
        reason = (f"HTTP {code} for the whole request of {n} photos, a verdict on none of them: "
                  f"{str(answer.body.get('error') or answer.body)[:300]}")
        return [Transient(reason, down=False)] * n
    except Transient as exc:
        if code == 200:
            return [Transient(f"a 200 that is not a list of {n} answers: {exc.reason}", down=False)] * n
        return [exc] * n


class MultipartPhotos:
    """A multipart/form-data body with one part per photo, named photos[0], photos[1], ... (the
    handler's multi-photo form, handler/refund_requests.py). Re-iterable (a request sent again
    after a key renewal sends it whole) and sized (Content-Length, not chunked).

    Iterating yields the body in pieces of at least COALESCE_BYTES where the photos are small:
    each piece is one send, and one read for TorchServe's frontend (piece by piece, a request of
    8 catalogue photos would be 25 sends of a few hundred bytes to a few KB). A photo of COALESCE_BYTES or more is
    sent from its own bytes, never copied, so the job's --max-in-flight-bytes bound holds to within
    a few COALESCE_BYTES of copies a request (a piece is under 2 x COALESCE_BYTES, and the one being
    sent is held while the next is joined)."""

    COALESCE_BYTES = 256 * 1024

    def __init__(self, photos: list[bytes]):
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._chunks: list[bytes] = []
        for i, data in enumerate(photos):
            self._chunks += [(f'--{boundary}\r\nContent-Disposition: form-data; name="photos[{i}]"; filename="{i}"\r\n'
                              f"Content-Type: application/octet-stream\r\n\r\n").encode(), data, b"\r\n"]
        self._chunks.append(f"--{boundary}--\r\n".encode())

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def __iter__(self):
        pending: list[bytes] = []
        size = 0
        for chunk in self._chunks:
            if len(chunk) >= self.COALESCE_BYTES:
                if pending:
                    yield b"".join(pending)
                    pending, size = [], 0
                yield chunk
                continue
            pending.append(chunk)
            size += len(chunk)
            if size >= self.COALESCE_BYTES:
                yield b"".join(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending)


# Bytes of framing a part adds to a MultipartPhotos body, rounded up (boundary and headers take
# about 180): callers keep sum(len(photo) + this) under TorchServe's max_request_size.
MULTIPART_PART_OVERHEAD = 256


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
                 pool_size: int = 16, timeout_s: float = READ_TIMEOUT_S):
        self.urls = {"inference": inference_url.rstrip("/"), "management": management_url.rstrip("/")}
        self.key_file = Path(key_file) if key_file else None
        self.timeout_s = timeout_s
        self._keys: dict | None = None
        self._lock = threading.Lock()
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The environment's proxies (HTTP(S)_PROXY, NO_PROXY) and CA bundle are read once, here:
        # with trust_env, requests walks the whole environment twice for every request (the largest
        # single item in a CPU profile of the ingest job). .netrc is not consulted: the keys are headers.
        self.session.trust_env = False
        self.proxies = {api: requests.utils.get_environ_proxies(url) for api, url in self.urls.items()}
        self.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

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
            return self._key_in(self._keys, api)

    def _key_in(self, keys: dict, api: str) -> str:
        """keys[api]["key"]; AuthError when the file holds none (an inference-only copy asked for management)."""
        entry = keys.get(api) if isinstance(keys, dict) else None
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key:
            raise AuthError(f"the key file {self.key_file} holds no {api} key")
        return key

    def forget_keys(self) -> None:
        with self._lock:
            self._keys = None

    def headers(self, api: str) -> dict:
        key = self._key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def refresh_key(self, api: str, stale: str | None) -> None:
        """Re-read the key file; if it still holds the stale key, ask TorchServe for a new one with
        the API key. A file without an API key (the inference key alone: a least-privilege copy that
        follows TorchServe's own renewals) cannot renew: AuthError, which callers treat as transient."""
        with self._lock:
            self._keys = self._load_keys()
            if self._key_in(self._keys, api) != stale:
                return  # someone else renewed it already
            try:
                api_key = self._key_in(self._keys, "API")
            except AuthError:
                raise AuthError(f"TorchServe refused the {api} key in {self.key_file}, which holds no API key to "
                                f"renew it with: awaiting a renewal by TorchServe's side (the copy follows it)") from None
            r = self.session.post(f"{self.urls['management']}/token", params={"type": api}, proxies=self.proxies["management"],
                                  headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout_s)
            if r.status_code != 200:
                raise AuthError(f"renewing the {api} key failed: {r.status_code} {r.text[:200]}")
            self._keys = self._load_keys()

    # -- requests ------------------------------------------------------------------------
    def request(self, api: str, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        kwargs.setdefault("proxies", self.proxies[api])
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
        Transient or Refused (see ANSWERS)."""
        try:
            r = self.inference("POST", f"predictions/{model}", data=data,
                               headers={"Content-Type": "application/octet-stream"}, timeout=timeout or self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}", down=True) from exc
        except AuthError as exc:  # the key file is rewritten while TorchServe restarts, or holds no key to renew with
            raise Transient(f"authorization: {exc}", down=True) from exc
        return read_answer(r, model=model, has_key_file=self.key_file is not None)

    def classify_many(self, model: str, photos: list[bytes], *,
                      timeout: float | tuple[float, float] | None = None) -> list[Answer | Transient]:
        """POST several photos in one request (multipart, parts photos[0..n-1]) to predictions/`model`:
        one Answer or Transient per photo, in order (see read_answers); raises Refused."""
        body = MultipartPhotos(photos)
        try:
            r = self.inference("POST", f"predictions/{model}", data=body,
                               headers={"Content-Type": body.content_type}, timeout=timeout or self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            return [Transient(f"{type(exc).__name__}: {exc}", down=True)] * len(photos)
        except AuthError as exc:
            return [Transient(f"authorization: {exc}", down=True)] * len(photos)
        return read_answers(r, len(photos), model=model, has_key_file=self.key_file is not None)

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
