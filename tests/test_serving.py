"""A real TorchServe started from the exported archive."""
from __future__ import annotations

import requests
import pytest

from training.catalogue import read_styles

pytestmark = pytest.mark.integration


def test_ping(torchserve):
    r = requests.get(f"{torchserve.inference_url}/ping", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"


def test_predictions_on_unseen_images(torchserve, unseen_images):
    rows, _ = read_styles(unseen_images / "styles.csv")
    correct = 0
    for row in rows:
        data = (unseen_images / "images" / f"{row['id']}.jpg").read_bytes()
        r = requests.post(f"{torchserve.inference_url}/predictions/refund_classifier", data=data, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "refund_classifier" and body["version"] == "1"
        assert set(body) >= {"label", "confidence", "topk", "needs_review"}
        correct += body["label"] == row["articleType"]
    assert correct / len(rows) >= 0.8, f"{correct}/{len(rows)} correct"


def test_bad_image_gets_a_4xx_with_a_json_error(torchserve):
    r = requests.post(f"{torchserve.inference_url}/predictions/refund_classifier", data=b"GIF89a not really", timeout=30)
    assert r.status_code == 400
    assert r.json()["code"] in ("not_an_image", "corrupt")


def test_versioned_endpoint_and_management(torchserve):
    models = torchserve.describe("refund_classifier")
    assert models[0]["modelVersion"] == "1"
    r = requests.post(f"{torchserve.inference_url}/predictions/refund_classifier/1", data=b"", timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "empty"
