"""TorchServe with token authorization on: the client reads the key file and survives key changes."""
from __future__ import annotations

import json

import pytest
import requests

from serving.archive import MODEL_NAME

pytestmark = pytest.mark.integration


def predict(ts, data: bytes) -> requests.Response:
    return ts.client.inference("POST", f"predictions/{MODEL_NAME}", data=data)


def test_requests_without_a_key_are_refused(secured_torchserve):
    r = requests.get(f"{secured_torchserve.inference_url}/ping", timeout=10)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    assert secured_torchserve.healthy()  # with the key from key_file.json


def test_prediction_with_the_key(secured_torchserve, unseen_images):
    data = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    r = predict(secured_torchserve, data)
    assert r.status_code == 200 and "label" in r.json()


def test_key_renewed_by_someone_else_is_picked_up(secured_torchserve, unseen_images):
    data = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    predict(secured_torchserve, data)  # the client now holds the current key
    api_key = json.loads(secured_torchserve.key_file.read_text())["API"]["key"]
    r = requests.post(f"{secured_torchserve.management_url}/token", params={"type": "inference"},
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    assert r.status_code == 200
    assert predict(secured_torchserve, data).status_code == 200  # stale key -> re-read the file -> retry


def test_expired_key_is_renewed_with_the_api_key(secured_torchserve, unseen_images):
    """The key file still holds a dead key (as after expiry): the client renews it itself."""
    data = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    before = secured_torchserve.key_file.read_text()
    api_key = json.loads(before)["API"]["key"]
    requests.post(f"{secured_torchserve.management_url}/token", params={"type": "inference"},
                  headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    secured_torchserve.key_file.write_text(before)  # the file now names a key TorchServe no longer accepts
    secured_torchserve.client.forget_keys()
    assert predict(secured_torchserve, data).status_code == 200
    assert json.loads(secured_torchserve.key_file.read_text())["inference"]["key"] != json.loads(before)["inference"]["key"]
