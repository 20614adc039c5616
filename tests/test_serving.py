"""A real TorchServe started from the exported archive and the repository's config.properties."""
from __future__ import annotations

import base64
import gc
import gzip
import os
import re
import signal
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pytest
import requests
import torch

from handler.refund_inference import calibrated_probs, resolve_precision
from handler.refund_model import build_model, cpu_supports_bf16
from handler.refund_preprocess import normalize
from serving.torchserve import TorchServeError, _ephemeral_range, free_port, load_properties, make_torchserve
from serving.metrics import parse as parse_metrics, total
from serving.paths import REPO_ROOT
from training import export as export_mod
from training.catalogue import list_items, read_styles
from training.checkpoint import CHECKPOINT
from training.engine import load_images

pytestmark = pytest.mark.integration

PREDICT = "predictions/refund_classifier"
def scrape(ts) -> dict[tuple[str, frozenset], float]:
    """TorchServe's /metrics -> {(sample name, labels without Hostname): value}."""
    r = requests.get(f"{ts.metrics_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:200]
    return parse_metrics(r.text)


def post_all(ts, bodies: list, *, threads: int = 16) -> list[requests.Response]:
    url = f"{ts.inference_url}/{PREDICT}"
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda body: requests.post(url, data=body, timeout=60), bodies))


def unseen(unseen_images: Path) -> list[Path]:
    return sorted((unseen_images / "images").glob("*.jpg"))


def wait_for(predicate, timeout_s: float = 15.0):
    """Metrics reach the frontend as worker log lines, a moment after the answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_ping(torchserve):
    r = requests.get(f"{torchserve.inference_url}/ping", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"


def test_predictions_on_unseen_images(torchserve, unseen_images):
    rows, _ = read_styles(unseen_images / "styles.csv")
    correct = 0
    for row in rows:
        data = (unseen_images / "images" / f"{row['id']}.jpg").read_bytes()
        r = requests.post(f"{torchserve.inference_url}/{PREDICT}", data=data, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "refund_classifier" and body["version"] == "1"
        assert set(body) >= {"label", "confidence", "topk", "needs_review"}
        correct += body["label"] == row["articleType"]
    assert correct / len(rows) >= 0.8, f"{correct}/{len(rows)} correct"


def test_bad_image_gets_a_4xx_with_a_json_error(torchserve):
    r = requests.post(f"{torchserve.inference_url}/{PREDICT}", data=b"GIF89a not really", timeout=30)
    assert r.status_code == 400
    assert r.json()["code"] in ("not_an_image", "corrupt") and r.json()["error"]


def test_versioned_endpoint_and_management(torchserve):
    models = torchserve.describe("refund_classifier")
    assert models[0]["modelVersion"] == "1"
    r = requests.post(f"{torchserve.inference_url}/{PREDICT}/1", data=b"", timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "empty"


def whole_log(log_dir: Path, name: str) -> str:
    """A TorchServe log with what its daily roll-over has moved aside (NAME.<day>.log.gz) before it:
    a server started before midnight keeps its start-up lines there."""
    stem = name.removesuffix(".log")
    rolled = sorted(log_dir.glob(f"{stem}.*.log.gz"), key=lambda p: p.stat().st_mtime)
    return "".join(gzip.decompress(p.read_bytes()).decode() for p in rolled) + (log_dir / name).read_text()


def test_archive_settings_reach_torchserve(torchserve):
    """batchSize / maxBatchDelay / workers come from handler/model-config.yaml inside the archive."""
    model = torchserve.describe("refund_classifier", "1")[0]
    # a lone request waits the whole maxBatchDelay in TorchServe's queue: it must stay short
    assert model["batchSize"] == 8 and model["maxBatchDelay"] == 2
    assert model["minWorkers"] == model["maxWorkers"] == 2 and len(model["workers"]) == 2
    log = whole_log(torchserve.log_dir, "model_log.log")
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert re.search(rf"loaded refund_classifier v1: .* threads={threads} ", log), "workers x threads != cores"


def test_payload_forms(torchserve, unseen_images):
    """Raw bytes, a multipart field, base64 as text, as a raw body and in JSON: the same answer."""
    data = unseen(unseen_images)[0].read_bytes()
    b64 = base64.b64encode(data).decode()
    url = f"{torchserve.inference_url}/{PREDICT}"
    answers = [
        requests.post(url, data=data, timeout=30),
        requests.post(url, files={"photo": ("x.jpg", data, "image/jpeg")}, timeout=30),
        requests.post(url, data=b64, headers={"Content-Type": "text/plain"}, timeout=30),
        requests.post(url, data=b64.encode(), timeout=30),
        requests.post(url, json={"b64": b64}, timeout=30),
    ]
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    labels = {r.json()["label"] for r in answers}
    confidences = [r.json()["confidence"] for r in answers]
    assert len(labels) == 1 and max(confidences) - min(confidences) < 1e-2


def test_concurrent_requests_are_batched(torchserve, unseen_images):
    before = scrape(torchserve)
    images = [p.read_bytes() for p in unseen(unseen_images)] * 2
    answers = post_all(torchserve, images)
    assert all(r.status_code == 200 for r in answers)

    def grew():
        after = scrape(torchserve)
        n = total(after, "refund_batch_size_sum") - total(before, "refund_batch_size_sum")
        return (n, total(after, "refund_batch_size_count") - total(before, "refund_batch_size_count")) \
            if n >= len(images) else None

    seen = wait_for(grew)
    assert seen, "the handler's batch-size metric did not count the requests"
    n_images, n_batches = seen
    assert n_images == len(images) and n_batches < n_images, f"{n_images} images came in {n_batches} batches"


def test_a_bad_image_in_a_batch_fails_alone(torchserve, unseen_images):
    good = [p.read_bytes() for p in unseen(unseen_images)]
    bad = [b"", b"not an image at all", good[0][: len(good[0]) // 2]]
    bodies = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5], good[6]]
    log = torchserve.log_dir / "model_log.log"
    for attempt in range(3):  # batching depends on timing: retry until one batch held both kinds
        start = log.stat().st_size
        answers = post_all(torchserve, bodies)
        codes = [r.status_code for r in answers]
        assert codes == [200 if b in good else 400 for b in bodies], codes
        for body, r in zip(bodies, answers):
            assert ("label" in r.json()) is (body in good)
        assert [r.json()["code"] for r in answers if r.status_code == 400] == ["empty", "not_an_image", "corrupt"]
        batches = [(int(n), int(k)) for n, k in re.findall(r"batch of (\d+): (\d+) rejected", log.read_text()[start:])]
        if any(0 < k < n for n, k in batches):
            return
    pytest.fail(f"no batch mixed good and bad images: {batches}")


def test_several_photos_in_one_request_get_a_list_in_order(torchserve, unseen_images):
    good = [p.read_bytes() for p in unseen(unseen_images)[:3]]
    url = f"{torchserve.inference_url}/{PREDICT}"
    alone = [requests.post(url, data=g, timeout=60).json() for g in good]
    corrupt = good[1][: len(good[1]) // 2]
    # multipart, parts photos[i], sent out of order: the index decides the place
    files = [("photos[1]", ("b.jpg", corrupt)), ("photos[0]", ("a.jpg", good[0])), ("photos[2]", ("c.jpg", good[2]))]
    r = requests.post(url, files=files, timeout=60)
    assert r.status_code == 200, r.text[:300]
    first, bad, last = r.json()
    assert (first["label"], last["label"]) == (alone[0]["label"], alone[2]["label"])
    assert abs(first["confidence"] - alone[0]["confidence"]) < 5e-3
    assert (bad["code"], bad["status"]) == ("corrupt", 400)
    # JSON, the same photos as base64
    r = requests.post(url, json={"instances": [base64.b64encode(g).decode() for g in good]}, timeout=60)
    assert r.status_code == 200 and [i["label"] for i in r.json()] == [a["label"] for a in alone]
    # the client's own form, read through ANSWERS
    answers = torchserve.client.classify_many("refund_classifier", [good[0], corrupt, b"", good[2]])
    assert [(a.ok, a.body.get("label") or a.body["code"]) for a in answers] == \
        [(True, alone[0]["label"]), (False, "corrupt"), (False, "empty"), (True, alone[2]["label"])]
    # a malformed request of several: one clear error, 400
    r = requests.post(url, files=[("photos[0]", ("a.jpg", good[0])), ("photos[2]", ("c.jpg", good[2]))], timeout=60)
    assert r.status_code == 400 and r.json()["code"] == "bad_request" and "photos[i]" in r.json()["error"]


def test_metrics_endpoint_exposes_handler_metrics(torchserve, unseen_images):
    requests.post(f"{torchserve.inference_url}/{PREDICT}", data=b"", timeout=30)  # at least one reject
    requests.post(f"{torchserve.inference_url}/{PREDICT}", data=unseen(unseen_images)[0].read_bytes(), timeout=30)
    text = requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).text
    for name, kind in [("refund_images_total", "counter"), ("refund_rejects_total", "counter"),
                       ("refund_batch_size", "histogram"), ("refund_preprocess_seconds", "histogram"),
                       ("refund_inference_seconds", "histogram"), ("refund_stage_seconds", "histogram"),
                       ("ts_inference_requests_total", "counter")]:
        assert f"# TYPE {name} {kind}" in text, name
    samples = wait_for(lambda: (s := scrape(torchserve)) and total(s, "refund_rejects_total", Reason="empty")
                       and total(s, "refund_stage_seconds_count", Stage="response") >= 2 and s)
    assert total(samples, "refund_rejects_total", Reason="empty", ModelName="refund_classifier") >= 1
    assert total(samples, "refund_images_total") >= total(samples, "refund_batch_size_count") >= 1
    assert total(samples, "refund_inference_seconds_count") >= 1
    for stage in ("decode", "assemble", "forward", "response"):  # where the time goes (bench/serving.py)
        assert total(samples, "refund_stage_seconds_count", Stage=stage) >= 1, stage


def test_requests_write_an_access_line_each_and_nothing_more_to_the_logs(torchserve, unseen_images):
    """TorchServe's own default logging writes tens of lines a request into ts_log.log and to
    standard output (console.log, which nothing rotates); serving/log4j2.xml keeps one access line
    a request, the handler's lines in model_log.log, and TorchServe's events."""
    logs = {name: torchserve.log_dir / name for name in ("ts_log.log", "console.log", "access_log.log", "model_log.log")}
    bodies = [p.read_bytes() for p in unseen(unseen_images)] * 4

    def lines() -> dict[str, int]:
        return {name: len(path.read_bytes().splitlines()) for name, path in logs.items()}

    def one_round() -> None:
        start = lines()["access_log.log"]
        assert all(r.status_code == 200 for r in post_all(torchserve, bodies))
        assert wait_for(lambda: lines()["access_log.log"] - start >= len(bodies))
        time.sleep(1)  # the metrics' lines reach the frontend a moment after the answers

    # A fresh TorchServe logs "Registering auto detected backend metric" once per new metric, at
    # its first requests: a warm-up round first, so that what is counted is what every request costs.
    one_round()
    before = lines()
    one_round()
    grew = {name: n - before[name] for name, n in lines().items()}
    assert grew["access_log.log"] == len(bodies), grew
    assert grew["ts_log.log"] <= 2 and grew["console.log"] <= 2, grew
    assert 1 <= grew["model_log.log"] <= len(bodies), grew  # the handler's line per batch, nothing per request
    assert "precision=" in whole_log(torchserve.log_dir, "model_log.log")  # the handler's start-up line is kept
    assert "Backend received inference" not in logs["model_log.log"].read_text()


def test_no_train_serve_skew(torchserve, trained_run, unseen_images):
    """The served answer equals the offline path: training's decode cache + normalize + the checkpoint's model."""
    ckpt = torch.load(trained_run / CHECKPOINT, map_location="cpu", weights_only=True)
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model = model.eval().to(memory_format=torch.channels_last)
    pre, cal = ckpt["preprocess"], ckpt["calibration"]
    items = list_items(unseen_images)[0]
    x = normalize(load_images(items, tuple(pre["image_size"])), mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    bf16 = resolve_precision("auto", device_type="cpu", bf16_native=cpu_supports_bf16()) == "bf16"
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(x.contiguous(memory_format=torch.channels_last))
        probs = calibrated_probs(logits, cal["temperature"], None)
    conf, idx = probs.max(1)
    answers = post_all(torchserve, [it.path.read_bytes() for it in items])
    served = [r.json() for r in answers]
    assert [s["label"] for s in served] == [ckpt["classes"][i] for i in idx.tolist()]
    diffs = [abs(s["confidence"] - c) for s, c in zip(served, conf.tolist())]
    assert max(diffs) < (1e-2 if bf16 else 1e-4), diffs
    assert [s["needs_review"] for s in served] == [c < cal["review_threshold"] for c in conf.tolist()]


def test_request_over_max_request_size_is_refused(torchserve):
    limit = int(load_properties(REPO_ROOT / "config.properties")["max_request_size"])
    r = requests.post(f"{torchserve.inference_url}/{PREDICT}", data=b"\xff" * (limit + 1), timeout=60)
    assert r.status_code == 413


def test_register_from_the_model_store_by_file_name(torchserve, trained_run, model_store):
    """The rollout registers `refund_classifier-V.mar` by file name; allowed_urls refuses every URL."""
    archive = export_mod.export(trained_run, "2", model_store=model_store, force=True)
    try:
        r = torchserve.client.management("POST", "models", params={"url": archive.name, "initial_workers": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert {m["modelVersion"] for m in torchserve.describe("refund_classifier")} == {"1", "2"}
        for url in (f"file://{archive}", "http://127.0.0.1:9/refund_classifier-3.mar", "file:///etc/passwd"):
            r = torchserve.client.management("POST", "models", params={"url": url}, timeout=30)
            assert r.status_code == 404 and "does not match any allowed URL" in r.json()["message"], url
    finally:
        torchserve.client.management("DELETE", "models/refund_classifier/2", timeout=60)
        archive.unlink(missing_ok=True)
    assert [m["modelVersion"] for m in torchserve.describe("refund_classifier")] == ["1"]


def test_free_ports_come_from_outside_the_ephemeral_range():
    """An outgoing connection (to PostgreSQL, to TorchServe) takes an ephemeral port: a port picked
    from that range can be gone before the server binds it."""
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]


def test_a_start_that_fails_on_a_taken_port_says_so_and_reaps_its_process(model_store, tmp_path):
    """TorchServe binds its gRPC port after loading the model: it dies after /ping answered. The
    error names the port, and the process is collected (no 'still running' left to the garbage collector)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ts = make_torchserve(model_store, tmp_path / "ts", grpc_management_port=str(port))
        with pytest.raises(TorchServeError, match="Address already in use"):
            ts.start(["refund_classifier=refund_classifier-1.mar"], wait_s=120)
    assert ts._proc.returncode is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del ts
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_a_torchserve_that_dies_on_its_own_is_collected(start_torchserve):
    ts = start_torchserve(models=["refund_classifier=refund_classifier-1.mar"])
    os.killpg(ts.pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while ts.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ts.pid() is None and not ts.stop()
    assert ts._proc.returncode == -signal.SIGKILL
