"""The ingest job with the inference key alone, as in compose: `python -m serving up --foreground`
copies it (`TorchServe.export_inference_key`) for the ingest container, which gets neither the
management nor the API key. Against a real TorchServe with token authorization on."""
from __future__ import annotations

import json

import pytest
import requests

from serving.archive import MODEL_NAME
from serving.client import AuthError, TorchServeClient, Transient

pytestmark = pytest.mark.integration


def renew_inference_key(ts) -> None:
    """What the torchserve container's healthcheck does: a new inference key, with the API key."""
    api_key = json.loads(ts.key_file.read_text())["API"]["key"]
    r = requests.post(f"{ts.management_url}/token", params={"type": "inference"},
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    assert r.status_code == 200, r.text


def test_inference_key_alone_classifies_and_waits_for_a_renewal(secured_torchserve, tmp_path, unseen_images):
    ts = secured_torchserve
    data = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    key_file = tmp_path / "inference-key.json"
    assert ts.export_inference_key(key_file)
    assert set(json.loads(key_file.read_text())) == {"inference"}  # neither management nor API
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    client = TorchServeClient(ts.inference_url, ts.management_url, key_file=key_file)

    assert client.ping().healthy
    assert client.classify(MODEL_NAME, data).ok

    with pytest.raises(AuthError, match="holds no management key"):
        client.management("GET", "models")
    inference_key = json.loads(key_file.read_text())["inference"]["key"]
    r = requests.get(f"{ts.management_url}/models", headers={"Authorization": f"Bearer {inference_key}"}, timeout=10)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"  # TorchServe refuses it too

    renew_inference_key(ts)  # someone else renews; the copy has not followed yet
    with pytest.raises(Transient, match="holds no API key to renew it with: awaiting a renewal") as info:
        client.classify(MODEL_NAME, data)
    assert info.value.down  # retried with backoff by the job, not a KeyError, not a verdict
    with pytest.raises(AuthError, match="holds no API key"):
        client.inference("POST", f"predictions/{MODEL_NAME}", data=data)
    assert set(json.loads(key_file.read_text())) == {"inference"}  # nothing renewed or written from here

    assert ts.export_inference_key(key_file)  # the copy follows
    assert client.classify(MODEL_NAME, data).ok
    assert client.ping().healthy
