"""TorchServe's answers, read without a TorchServe: serving.client's mapping of HTTP answers onto
Answer / Transient / Refused (the rule table, ANSWERS), its ping, the ingest job's retry loop on top of them
(ingest.predict) and rollout's smoke-test counts. Fake responses and fake clients only: no services.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from ingest import predict as predict_mod
from ingest.outcomes import FileFailed, TorchServeDown, TorchServeRefused
from ingest.predict import Predictor
from ingest.settings import Settings
from serving import rollout
from serving.client import (ANSWERS, READ_TIMEOUT_S, TOKEN_REQUIRED, Answer, AuthError, MultipartPhotos, Ping, Refused,
                            TorchServeClient, Transient, read_answer, read_answers)

PREDICTION = {"label": "Tshirts", "confidence": 0.91, "topk": [["Tshirts", 0.91]], "needs_review": False,
              "model": "refund_classifier", "version": "1"}
INVALID_KEY = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}


def response(code: int, body=None, *, text: str | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = code
    r._content = (text if text is not None else json.dumps(body)).encode()
    r.encoding = "utf-8"
    return r


def read(code: int, body=None, *, text: str | None = None, has_key_file: bool = False):
    return read_answer(response(code, body, text=text), model="refund_classifier", has_key_file=has_key_file)


# -- the mapping ------------------------------------------------------------------------------

def test_a_prediction_is_an_ok_answer():
    assert read(200, PREDICTION) == Answer(True, PREDICTION)


@pytest.mark.parametrize("code", [400, 413, 415, 422])
def test_the_handlers_4xx_about_the_photo_is_a_rejection_to_record(code):
    body = {"code": "corrupt", "error": "the image data is truncated"}
    assert read(code, body) == Answer(False, body)


def test_torchserves_own_413_is_a_too_large_rejection():
    answer = read(413, {"code": 413, "type": "ServiceUnavailableException", "message": "request too large"})
    assert not answer.ok and answer.body["code"] == "too_large" and "request too large" in answer.body["error"]


@pytest.mark.parametrize("code, down", [(503, True), (507, True), (500, False), (502, False), (504, False),
                                        (408, True), (429, True)])
def test_transient_answers(code, down):
    with pytest.raises(Transient) as info:
        read(code, {"code": code, "type": "X", "message": "busy"})
    assert info.value.down is down and f"HTTP {code}" in info.value.reason


def test_a_5xx_that_is_not_json_is_transient_with_its_text():
    with pytest.raises(Transient, match="HTTP 500: <html>oops"):
        read(500, text="<html>oops</html>")


def test_torchserves_worker_death_and_out_of_memory_are_down_not_a_verdict():
    """What TorchServe 0.12 answers when the worker dies mid-batch (507 when its frontend has already
    seen the process killed, else 500), or the handler raises MemoryError."""
    for code, body in ((507, {"code": 507, "type": "InternalServerException", "message": "Worker died."}),
                       (500, {"code": 500, "type": "InternalServerException", "message": "Worker died."}),
                       (507, {"code": 507, "type": "ServiceUnavailableException", "message": "Out of resources"})):
        with pytest.raises(Transient) as info:
            read(code, body)
        assert info.value.down and info.value.reason == f"HTTP {code}: {body['message']}"
        assert info.value.worker_died is (body["message"] == "Worker died.")  # isolated, not retried whole


def test_unknown_model_is_refused_not_a_rejected_photo():
    with pytest.raises(Refused, match="no model 'refund_classifier'"):
        read(404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: refund_classifier"})


def test_invalid_key_is_refused_without_a_key_file_and_transient_with_one():
    with pytest.raises(Refused) as info:
        read(400, INVALID_KEY, has_key_file=False)
    assert str(info.value) == TOKEN_REQUIRED
    with pytest.raises(Transient, match="token refused") as info:
        read(400, INVALID_KEY, has_key_file=True)
    assert info.value.down


@pytest.mark.parametrize("code, body", [(200, {"no": "label"}), (400, {"message": "bad request"}), (302, {}),
                                        (400, ["not", "an", "object"]), (418, {"code": 418, "error": "teapot"}),
                                        (400, {"code": 400, "type": "BadRequestException", "message": "Parameter data is required"}),
                                        (422, {"error": "no code"}), (415, {"code": "", "message": "x"}),
                                        (401, {"code": 401, "type": "X", "message": "proxy auth"}), (403, {})])
def test_an_answer_that_is_not_a_verdict_is_transient_and_not_down(code, body):
    """Only the handler's own code makes a 4xx a verdict: a bare 400 from the frontend, a proxy's
    403 or a 200 without a label says nothing about the photo. Asked again; after the retries the
    photo stays in the inbox (never quarantined) and the run goes on."""
    with pytest.raises(Transient) as info:
        read(code, body)
    assert not info.value.down and info.value.reason.startswith(f"HTTP {code}: ")


@pytest.mark.parametrize("code", [200, 302, 400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504, 507])
@pytest.mark.parametrize("body", [{"code": "corrupt", "error": "truncated"}, {"code": 400, "type": "X", "message": "m"},
                                  {"error": "<html>"}, {}])
@pytest.mark.parametrize("has_key_file", [False, True])
def test_the_rule_table_decides_every_answer(code, body, has_key_file):
    """read_answer does what the first matching row of ANSWERS says, for any status and body, and a
    verdict on the photo comes only from a 200 with a label, the handler's own 4xx or the frontend's 413."""
    rule = next(r for r in ANSWERS if r.matches(code, body, has_key_file))
    try:
        outcome = read(code, body, has_key_file=has_key_file)
    except Transient as exc:
        means = "down" if exc.down else "transient"
    except Refused:
        means = "refused"
    else:
        means = "ok" if outcome.ok else "rejected"
    assert means == rule.means, rule.what
    verdict = means in ("ok", "rejected")
    handlers = 400 <= code < 500 and isinstance(body.get("code"), str)
    assert verdict == (handlers or code == 413), (code, body)
    assert means != "refused" or code == 404


# -- several photos in one request ------------------------------------------------------------

CORRUPT = {"error": "the image data is truncated", "code": "corrupt", "status": 400, "model": "refund_classifier", "version": "1"}
TOO_BIG = {"error": "too many pixels", "code": "too_many_pixels", "status": 413, "model": "refund_classifier", "version": "1"}


def read_many(code: int, body=None, n: int = 3, *, text: str | None = None, has_key_file: bool = False):
    return read_answers(response(code, body, text=text), n, model="refund_classifier", has_key_file=has_key_file)


def test_each_item_of_a_list_is_read_by_the_same_rules_as_a_single_answer():
    items = [PREDICTION, CORRUPT, TOO_BIG, {"no": "label"}, {"code": "corrupt", "error": "x", "status": 500}, "text"]
    got = read_many(200, items, n=6)
    assert got[:3] == [Answer(True, PREDICTION), Answer(False, CORRUPT), Answer(False, TOO_BIG)]
    # the same item alone, with the status it carries, means the same thing
    for item, answer in zip(items[:5], got):
        try:
            alone = read(item.get("status", 200), item)
        except Transient as exc:
            alone = exc
        assert type(alone) is type(answer) and (not isinstance(alone, Answer) or alone == answer), item
    assert all(isinstance(a, Transient) and not a.down for a in got[3:])


@pytest.mark.parametrize("code, body, down", [
    (400, {"code": "bad_request", "error": "the parts photos[i] must be numbered 0..2"}, False),  # the handler, whole request
    (413, {"code": 413, "type": "TooLongFrameException", "message": "too large"}, False),         # the frontend, whole request
    (200, PREDICTION, False),                       # one answer for three photos
    (200, [PREDICTION, PREDICTION], False),         # a list of the wrong length
    (500, {"message": "boom"}, False),
    (503, {"message": "busy"}, True),
    (507, {"message": "worker died"}, True),
])
def test_an_answer_about_the_whole_request_is_a_verdict_on_none_of_its_photos(code, body, down):
    got = read_many(code, body, n=3)
    assert len(got) == 3 and all(isinstance(a, Transient) and a.down == down for a in got), got


def test_no_such_model_for_a_request_of_several_is_refused():
    with pytest.raises(Refused, match="no model"):
        read_many(404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found"})


def test_classify_many_posts_one_multipart_part_per_photo():
    client = client_with(response(200, [PREDICTION, CORRUPT]))
    assert client.classify_many("refund_classifier/2", [b"jpeg one", b"\r\n--two"], timeout=(1, 2)) == \
        [Answer(True, PREDICTION), Answer(False, CORRUPT)]
    (method, url, kw), = client.session.asked
    assert (method, url, kw["timeout"]) == ("POST", "http://ts.invalid:8080/predictions/refund_classifier/2", (1, 2))
    body = kw["data"]
    assert isinstance(body, MultipartPhotos) and kw["headers"]["Content-Type"] == body.content_type
    raw = b"".join(body)
    assert len(raw) == len(body) and b"".join(body) == raw  # sized, and sent whole again on a retry
    # parsed back by the standard library's multipart reader: the parts, named by index, bytes intact
    from email.parser import BytesParser
    from email.policy import HTTP
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + raw)
    parts = [(p.get_param("name", header="content-disposition"), p.get_payload(decode=True)) for p in msg.iter_parts()]
    assert parts == [("photos[0]", b"jpeg one"), ("photos[1]", b"\r\n--two")]


def test_a_multipart_body_of_small_photos_is_one_send_and_a_large_photo_is_never_copied():
    small = [bytes([i]) * 1500 for i in range(8)]
    body = MultipartPhotos(small)
    assert len(list(body)) == 1  # one send (and one read for the frontend), not 25
    large = b"L" * MultipartPhotos.COALESCE_BYTES
    body = MultipartPhotos([small[0], large, small[1]])
    pieces = list(body)
    assert len(pieces) == 3 and any(p is large for p in pieces)  # sent from the photo's own bytes
    assert b"".join(pieces) == b"".join(body._chunks) and len(b"".join(pieces)) == len(body)
    many = MultipartPhotos([b"m" * (MultipartPhotos.COALESCE_BYTES // 3)] * 7)
    assert max(map(len, many)) < 2 * MultipartPhotos.COALESCE_BYTES  # copies stay bounded
    assert sum(map(len, many)) == len(many)


def test_classify_many_without_a_connection_is_transient_and_down_for_every_photo():
    got = client_with(requests.ConnectionError("refused")).classify_many("m", [b"a", b"b"])
    assert len(got) == 2 and all(isinstance(a, Transient) and a.down for a in got)


# -- the client: transport errors and ping --------------------------------------------------

class FakeSession:
    """Answers (or raises) the given things in order; records what was asked."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked: list[tuple[str, str, dict]] = []

    def request(self, method, url, headers=None, **kwargs):
        self.asked.append((method, url, {"headers": headers, **kwargs}))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def client_with(*answers, key_file=None) -> TorchServeClient:
    client = TorchServeClient("http://ts.invalid:8080", "http://ts.invalid:8081", key_file=key_file)
    client.session = FakeSession(*answers)
    return client


def test_classify_posts_the_bytes_to_the_model():
    client = client_with(response(200, PREDICTION))
    assert client.classify("refund_classifier/2", b"jpeg", timeout=(1, 2)) == Answer(True, PREDICTION)
    (method, url, kw), = client.session.asked
    assert (method, url, kw["data"], kw["timeout"]) == ("POST", "http://ts.invalid:8080/predictions/refund_classifier/2", b"jpeg", (1, 2))
    assert kw["headers"]["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize("error", [requests.ConnectionError("refused"), requests.Timeout("read timed out")])
def test_no_connection_or_a_timeout_is_transient_and_down(error):
    with pytest.raises(Transient) as info:
        client_with(error).classify("m", b"x")
    assert info.value.down and info.value.reason == f"{type(error).__name__}: {error}"


def test_an_unreadable_key_file_is_transient(tmp_path):
    """TorchServe rewrites its key file while it restarts: not a reason to give up on the photo."""
    with pytest.raises(Transient, match="authorization: .*does not exist") as info:
        client_with(response(200, PREDICTION), key_file=tmp_path / "key_file.json").classify("m", b"x")
    assert info.value.down


def test_ping():
    assert client_with(response(200, {"status": "Healthy"})).ping().healthy
    assert not client_with(response(200, text="<html>a proxy's page</html>")).ping().healthy
    p = client_with(response(500, {"status": "Unhealthy"})).ping()
    assert not p.healthy and p.status_code == 500 and p.detail.startswith("HTTP 500")
    p = client_with(requests.ConnectionError("refused")).ping()
    assert (p.status_code, p.detail, p.healthy) == (None, "ConnectionError: refused", False)
    assert client_with(response(400, INVALID_KEY)).ping().invalid_key
    with pytest.raises(requests.exceptions.MissingSchema):  # a mistake in the settings, not a server state
        client_with(requests.exceptions.MissingSchema("no scheme")).ping()



def test_the_environments_proxy_is_used_and_no_proxy_honoured(monkeypatch):
    """The client reads HTTP_PROXY / NO_PROXY once, when it is made, and still sends through the proxy."""
    import http.server

    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a proxy is asked for the absolute URL
            seen.append(self.path)
            body = b'{"status": "Healthy"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
        client = TorchServeClient("http://torchserve.invalid:8080", "http://torchserve.invalid:8081")
        monkeypatch.delenv("http_proxy")  # read once: a later change of the environment does not matter
        monkeypatch.delenv("HTTP_PROXY")
        assert client.ping(timeout=5).healthy
        assert seen == ["http://torchserve.invalid:8080/ping"]

        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("NO_PROXY", "torchserve.invalid")
        direct = TorchServeClient("http://torchserve.invalid:8080", "http://torchserve.invalid:8081")
        assert direct.ping(timeout=5).status_code is None  # went direct: no such host
        assert len(seen) == 1
    finally:
        server.shutdown()
        server.server_close()

def test_an_inference_only_key_file_waits_for_a_renewal_instead_of_crashing(tmp_path):
    """The compose ingest container's key file holds the inference key alone: a refused key cannot be
    renewed from it; the client re-reads the file and says so (transient) until the copy changes."""
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "old", "expiration time": "x"}}))
    client = client_with(response(400, INVALID_KEY), response(400, INVALID_KEY), key_file=key_file)
    with pytest.raises(Transient, match="holds no API key to renew it with: awaiting a renewal") as info:
        client.classify("m", b"x")
    assert info.value.down
    asked = [kw["headers"]["Authorization"] for _, _, kw in client.session.asked]
    assert asked == ["Bearer old"]  # not sent again with the same key
    key_file.write_text(json.dumps({"inference": {"key": "new", "expiration time": "y"}}))  # the copy follows
    client.session = FakeSession(response(400, INVALID_KEY), response(200, PREDICTION))
    assert client.classify("m", b"x") == Answer(True, PREDICTION)
    assert [kw["headers"]["Authorization"] for _, _, kw in client.session.asked] == ["Bearer old", "Bearer new"]
    with pytest.raises(AuthError, match="holds no management key"):
        client.management("GET", "models")


def _response_timeouts() -> dict[str, float]:
    """TorchServe's responseTimeout as this repository configures it, per file."""
    import yaml

    from serving.paths import REPO_ROOT
    from serving.torchserve import load_properties

    found = {"handler/model-config.yaml": yaml.safe_load((REPO_ROOT / "handler/model-config.yaml").read_text())["responseTimeout"]}
    for name in ("config.properties", "deploy/config.properties"):
        found[name] = load_properties(REPO_ROOT / name)["default_response_timeout"]
    return {k: float(v) for k, v in found.items()}


def test_the_read_timeout_is_above_torchserves_response_timeout():
    """TorchServe must give up on a slow batch (and say so) before the job does and sends it again."""
    from ingest.settings import BY_NAME

    timeouts = _response_timeouts()
    assert timeouts and all(t > 0 for t in timeouts.values())
    for default in (BY_NAME["timeout"].default, Settings(inbox=".", database_url="x").timeout,
                    TorchServeClient("http://a", "http://b").timeout_s, READ_TIMEOUT_S):
        assert default > max(timeouts.values()), (default, timeouts)
    assert "responseTimeout" in BY_NAME["timeout"].help


# -- the ingest job's retries ---------------------------------------------------------------

class FakeClient:
    """classify() raises the given exceptions in order, then gives the answer; ping() likewise."""

    def __init__(self, *failures, answer: Answer | None = None, pings=(), key_file=None):
        self.failures, self.answer, self.pings, self.key_file = list(failures), answer, list(pings), key_file
        self.calls = 0

    def classify(self, model, data, *, timeout=None):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.answer

    def ping(self, *, timeout=None):
        self.calls += 1
        return self.pings.pop(0)


def predictor(tmp_path, client, *, retries=4, stop=None):
    s = Settings(inbox=tmp_path, database_url="unused", torchserve_url="http://ts.invalid:8080",
                 retries=retries, backoff=0, backoff_max=0)
    retried = []
    p = Predictor(s, client, stop or threading.Event(), on_retry=lambda: retried.append(1))
    return p, retried


def test_fails_n_times_then_answers(tmp_path):
    answer = Answer(True, PREDICTION)
    client = FakeClient(Transient("HTTP 503: busy", down=True), Transient("ConnectionError: x", down=True), answer=answer)
    p, retried = predictor(tmp_path, client)
    assert p.predict(b"x", "a.jpg") == answer
    assert client.calls == 3 and len(retried) == 2


def test_down_through_every_attempt_stops_the_run(tmp_path):
    client = FakeClient(*[Transient("HTTP 503: busy", down=True)] * 4)
    p, retried = predictor(tmp_path, client)
    with pytest.raises(TorchServeDown, match="stays unavailable after 4 attempts: HTTP 503: busy"):
        p.predict(b"x", "a.jpg")
    assert client.calls == 4 and len(retried) == 3


def test_a_5xx_about_this_request_through_every_attempt_fails_only_the_photo(tmp_path):
    client = FakeClient(*[Transient("HTTP 500: boom", down=False)] * 4)
    p, _ = predictor(tmp_path, client)
    with pytest.raises(FileFailed, match="HTTP 500: boom"):
        p.predict(b"x", "a.jpg")
    assert client.calls == 4


def test_refused_stops_at_once(tmp_path):
    client = FakeClient(Refused("TorchServe has no model 'm'"))
    with pytest.raises(TorchServeRefused, match="no model"):
        predictor(tmp_path, client)[0].predict(b"x", "a.jpg")
    assert client.calls == 1


def test_an_answer_that_is_not_a_verdict_is_asked_again_then_the_photo_fails(tmp_path):
    """A 302 or a bare 400 is retried like a 500: the second attempt may well get the verdict."""
    answer = Answer(True, PREDICTION)
    client = FakeClient(Transient("HTTP 302: {}", down=False), Transient("HTTP 400: bad request", down=False), answer=answer)
    p, retried = predictor(tmp_path, client)
    assert p.predict(b"x", "a.jpg") == answer and len(retried) == 2
    client = FakeClient(*[Transient("HTTP 400: bad request", down=False)] * 4)
    with pytest.raises(FileFailed, match="HTTP 400: bad request"):
        predictor(tmp_path, client)[0].predict(b"x", "a.jpg")
    assert client.calls == 4


def test_a_stop_ends_the_retries(tmp_path):
    stop = threading.Event()
    stop.set()
    client = FakeClient(*[Transient("HTTP 503: busy", down=True)] * 4, answer=Answer(True, PREDICTION))
    with pytest.raises(FileFailed, match=r"stopped before an answer \(HTTP 503: busy\)"):
        predictor(tmp_path, client, stop=stop)[0].predict(b"x", "a.jpg")
    assert client.calls == 1


class FakeManyClient:
    """classify_many() gives the given per-photo lists in order (or raises); records how many photos each request carried."""

    def __init__(self, *answers, key_file=None):
        self.answers, self.key_file, self.sent = list(answers), key_file, []

    def classify_many(self, model, photos, *, timeout=None):
        self.sent.append(list(photos))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_a_request_of_several_asks_again_only_for_the_photos_without_a_verdict(tmp_path):
    ok, rejected = Answer(True, PREDICTION), Answer(False, CORRUPT)
    client = FakeManyClient([ok, Transient("HTTP 200: an item that is not a verdict", down=False), rejected],
                            [Transient("HTTP 503: busy", down=True)] * 1, [ok])
    p, retried = predictor(tmp_path, client)
    assert p.predict_many([b"a", b"b", b"c"], ["a.jpg", "b.jpg", "c.jpg"]) == [ok, ok, rejected]
    assert client.sent == [[b"a", b"b", b"c"], [b"b"], [b"b"]] and len(retried) == 2


def test_a_request_of_several_ends_each_photo_as_it_would_alone(tmp_path):
    ok = Answer(True, PREDICTION)
    down, boom = Transient("HTTP 503: busy", down=True), Transient("HTTP 500: boom", down=False)
    client = FakeManyClient([ok, down, boom], *[[down, boom]] * 3)
    got = predictor(tmp_path, client)[0].predict_many([b"a", b"b", b"c"], ["a.jpg", "b.jpg", "c.jpg"])
    assert got[0] == ok
    assert isinstance(got[1], TorchServeDown) and "after 4 attempts: HTTP 503" in str(got[1])
    assert isinstance(got[2], FileFailed) and "HTTP 500: boom" in str(got[2])
    client = FakeManyClient(Refused("TorchServe has no model 'm'"))
    got = predictor(tmp_path, client)[0].predict_many([b"a", b"b"], ["a.jpg", "b.jpg"])
    assert all(isinstance(g, TorchServeRefused) for g in got) and len(client.sent) == 1


def test_a_request_of_one_photo_is_a_single_photo_request(tmp_path):
    answer = Answer(True, PREDICTION)
    client = FakeClient(Transient("HTTP 500: boom", down=False), answer=answer)
    assert predictor(tmp_path, client)[0].predict_many([b"x"], ["a.jpg"]) == [answer] and client.calls == 2
    client = FakeClient(*[Transient("HTTP 500: boom", down=False)] * 4)
    got, = predictor(tmp_path, client)[0].predict_many([b"x"], ["a.jpg"])
    assert isinstance(got, FileFailed)


def test_backoff_doubles_up_to_the_longest_with_equal_jitter(monkeypatch):
    monkeypatch.setattr(predict_mod.random, "uniform", lambda lo, hi: hi)
    assert [predict_mod.backoff(a, 0.5, 3.0) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    monkeypatch.setattr(predict_mod.random, "uniform", lambda lo, hi: lo)
    assert [predict_mod.backoff(a, 0.5, 3.0) for a in (1, 2, 3)] == [0.25, 0.5, 1.0]


def test_ping_retries_until_healthy(tmp_path):
    client = FakeClient(pings=[Ping(None, "ConnectionError: refused"), Ping(503, "HTTP 503"), Ping(200, "HTTP 200", status="Healthy")])
    p, _ = predictor(tmp_path, client)
    p.ping()
    assert client.calls == 3
    client = FakeClient(pings=[Ping(None, "ConnectionError: refused")] * 4)
    with pytest.raises(TorchServeDown, match="after 4 attempts: ConnectionError: refused"):
        predictor(tmp_path, client)[0].ping()
    client = FakeClient(pings=[Ping(None, "ConnectionError: refused")] * 3 + [Ping(500, "HTTP 500", status="Unhealthy")])
    with pytest.raises(TorchServeDown, match="after 4 attempts: /ping answered HTTP 500"):
        predictor(tmp_path, client)[0].ping()


def test_ping_wanting_a_token_without_a_key_file_is_refused(tmp_path):
    client = FakeClient(pings=[Ping(400, "HTTP 400", invalid_key=True)])
    with pytest.raises(TorchServeRefused, match="requires a token"):
        predictor(tmp_path, client)[0].ping()
    assert client.calls == 1


# -- rollout's smoke test -------------------------------------------------------------------

def test_smoke_test_counts_correct_rejected_and_failed():
    class Answers:
        def classify(self, model, data, *, timeout=None):
            assert model == f"{rollout.MODEL_NAME}/2"
            kind = data.decode()
            if kind == "right":
                return Answer(True, {**PREDICTION, "version": "2"})
            if kind == "other-version":
                return Answer(True, {**PREDICTION, "version": "1"})
            if kind == "rejected":
                return Answer(False, {"code": "corrupt", "error": "truncated"})
            if kind == "busy":
                raise Transient("HTTP 503: busy", down=True)
            raise Refused("TorchServe has no model")

    class FakeTorchServe:
        client = Answers()

    sample = [rollout.Example(f"{kind}.jpg", "Tshirts", kind.encode())
              for kind in ("right", "right", "other-version", "rejected", "busy", "gone")]
    score = rollout.score(FakeTorchServe(), "2", sample, concurrency=2)
    assert (score.n, score.correct, score.rejected, score.failed) == (6, 2, 1, 3)
    assert any("answered by version '1'" in e for e in score.errors)
    assert any("busy.jpg: HTTP 503: busy" == e for e in score.errors)


def test_smoke_test_compares_like_with_like_on_out_of_category_images():
    """A candidate with the `other` output against a default without it, on a sample holding
    out-of-category images (labelled other): top-1 over the in-category images only, for both;
    what each did with the others is counted apart."""
    def answers(version, other: bool):
        class Answers:
            def classify(self, model, data, *, timeout=None):
                kind = data.decode()
                body = {**PREDICTION, "version": version}
                if kind == "shirt":
                    return Answer(True, body)
                if kind == "shirt-wrong":
                    return Answer(True, {**body, "label": "other" if other else "Tops"})
                if kind == "sure-outside":  # the default can only call it some category
                    return Answer(True, {**body, "label": "other", "in_category": False} if other else body)
                return Answer(True, {**body, "label": "Wallets" if not other else "other", "needs_review": True})

        class FakeTorchServe:
            client = Answers()

        return FakeTorchServe()

    sample = [rollout.Example(f"{i}.jpg", label, kind.encode()) for i, (label, kind) in enumerate(
        [("Tshirts", "shirt"), ("Tshirts", "shirt"), ("Tshirts", "shirt"), ("Tshirts", "shirt-wrong"),
         ("other", "sure-outside"), ("other", "sure-outside"), ("other", "unsure-outside")])]
    candidate = rollout.score(answers("2", other=True), "2", sample)
    default = rollout.score(answers("1", other=False), "1", sample)
    for s in (candidate, default):
        assert (s.n, s.in_category, s.outside, s.correct, s.accuracy) == (7, 4, 3, 3, 0.75)
    assert (candidate.outside_other, candidate.outside_review, candidate.outside_handled) == (2, 1, 1.0)
    assert (default.outside_other, default.outside_review) == (0, 1) and default.outside_handled == pytest.approx(1 / 3)
    promoted, reason = rollout.judge(candidate, default, 0.0)
    assert promoted and "0.750 vs the default's 0.750" in reason
    table = rollout.comparison_table(candidate, default)
    assert "outside: other / review" in table and "2 / 1 of 3" in table and "0 / 1 of 3" in table and "3/4" in table


def test_a_reviewed_sample_counts_other_right_when_answered_other():
    """On a sample with photos reviewed as "not a refund category" (labelled other): an answer
    `other` (in_category false) is right on them, sent to review or not; the figure over all images
    is printed and gates the rollout, so a candidate that lost the `other` output is refused even
    where it ties on the refund categories."""
    def answers(version, other: bool):
        class Answers:
            def classify(self, model, data, *, timeout=None):
                body = {**PREDICTION, "version": version}
                if data == b"shirt":
                    return Answer(True, {**body, "in_category": True} if other else body)
                if not other:  # without the output it can only call it some category
                    return Answer(True, {**body, "label": "Handbags", "needs_review": data == b"unsure"})
                return Answer(True, {**body, "label": "other", "in_category": False, "needs_review": data == b"unsure"})

        class FakeTorchServe:
            client = Answers()

        return FakeTorchServe()

    sample = [rollout.Example(f"{i}.jpg", label, kind) for i, (label, kind) in enumerate(
        [("Tshirts", b"shirt")] * 4 + [("other", b"sure")] * 3 + [("other", b"unsure")])]
    with_other = rollout.score(answers("1", other=True), "1", sample)
    without = rollout.score(answers("2", other=False), "2", sample)
    assert (with_other.accuracy, with_other.outside_correct, with_other.overall) == (1.0, 4, 1.0)
    assert (without.accuracy, without.outside_correct, without.overall) == (1.0, 0, 0.5)
    promoted, reason = rollout.judge(without, with_other, 0.02)
    assert not promoted and reason == ("top-1 over all images ('other' right when answered 'other') 0.500 is 0.500 "
                                       "below the default's 1.000 (tolerance 0.020)")
    table = rollout.comparison_table(without, with_other)
    assert "all, other right" in table and "8/8 1.000" in table and "4/8 0.500" in table, table
    promoted, reason = rollout.judge(with_other, without, 0.02)
    assert promoted and "0.500 vs" not in reason and "1.000 vs the default's 0.500" in reason, reason


# -- a photo that kills the worker ------------------------------------------------------------

class DyingWorkerClient:
    """A TorchServe whose worker dies on any request holding b"kill" (after `hang_s` for b"hang"), or on
    every request where `all_die`; answers the rest. Records each request's photos and how many other
    requests were in flight while it was."""

    DIED = {"code": 500, "type": "InternalServerException", "message": "Worker died."}

    def __init__(self, *, all_die=False, hang_s=0.0):
        self.all_die, self.hang_s, self.key_file = all_die, hang_s, None
        self.sent, self.beside, self.in_flight, self.lock = [], [], 0, threading.Lock()

    def _answers(self, photos):
        with self.lock:
            self.sent.append(list(photos))
            self.beside.append(self.in_flight)
            self.in_flight += 1
        try:
            time.sleep(0.01)
            if any(b"hang" in p for p in photos):
                time.sleep(self.hang_s)
            if self.all_die or any(b"kill" in p or b"hang" in p for p in photos):
                died = Transient("HTTP 500: Worker died.", down=True, worker_died=True)
                return [died] * len(photos)
            return [Answer(True, {**PREDICTION}) for _ in photos]
        finally:
            with self.lock:
                self.in_flight -= 1

    def classify_many(self, model, photos, *, timeout=None):
        return self._answers(photos)

    def classify(self, model, data, *, timeout=None):
        (answer,) = self._answers([data])
        if isinstance(answer, Transient):
            raise answer
        return answer

    def ping(self, *, timeout=None):
        return Ping(200, "HTTP 200", status="Healthy")


def isolating_predictor(tmp_path, client, **kw):
    s = Settings(inbox=tmp_path, database_url="unused", torchserve_url="http://ts.invalid:8080", retries=4,
                 backoff=0, backoff_max=0, **kw)
    return Predictor(s, client, threading.Event())


def test_a_request_the_worker_died_on_is_halved_down_to_the_photo_and_the_rest_answered(tmp_path):
    client = DyingWorkerClient()
    p = isolating_predictor(tmp_path, client)
    photos = [b"p%d" % i for i in range(8)]
    photos[5] = b"p5 kill"
    got = p.predict_many(photos, [f"{i}.png" for i in range(8)])
    assert [g.ok for g in got] == [True] * 5 + [False] + [True] * 2
    assert got[5].body["code"] == "worker_crash" and "2 times with this photo alone" in got[5].body["error"]
    sizes = [len(r) for r in client.sent if r != [predict_mod.CANARY]]
    assert sizes[:3] == [8, 4, 4] and sizes.count(1) >= 2  # whole, halves, ..., the photo alone twice
    assert client.sent.count([predict_mod.CANARY]) == 2
    bad = predict_mod._content_key(photos[5])
    assert p.crashes.alone[bad] == 2 and all(n == 0 for key, n in p.crashes.alone.items() if key != bad)


def test_a_photo_that_outlasts_the_response_timeout_is_a_worker_timeout(tmp_path):
    client = DyingWorkerClient(hang_s=0.1)
    p = isolating_predictor(tmp_path, client, response_timeout=0.1)
    got = p.predict_many([b"a", b"b hang", b"c"], ["a.png", "b.png", "c.png"])
    assert [g.ok for g in got] == [True, False, True]
    assert got[1].body["code"] == "worker_timeout" and "responseTimeout" in got[1].body["error"]


def test_photos_the_worker_died_on_go_alone_while_other_requests_wait(tmp_path):
    client = DyingWorkerClient()
    p = isolating_predictor(tmp_path, client)
    groups = [[b"g%d-%d" % (g, i) for i in range(4)] for g in range(6)]
    groups[2][1] = b"kill"
    threads = [threading.Thread(target=p.predict_many, args=(g, [f"{i}" for i in range(4)])) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    isolated = [beside for photos, beside in zip(client.sent, client.beside)
                if len(photos) < 4 or photos == [predict_mod.CANARY]]
    assert isolated and all(beside == 0 for beside in isolated)


def test_a_worker_that_dies_on_the_test_image_too_is_an_outage_not_the_photo(tmp_path):
    client = DyingWorkerClient(all_die=True)
    p = isolating_predictor(tmp_path, client)
    got = p.predict_many([b"a", b"b", b"c"], ["a.png", "b.png", "c.png"])
    assert all(isinstance(g, TorchServeDown) for g in got)
    assert "plain test image" in str(got[0]) and "not the photo" in str(got[0])
    assert all(n == 0 for n in p.crashes.alone.values())
