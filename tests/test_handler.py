"""The handler, without a server: TorchServe's MockContext and the tiny exported model."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from handler.refund_handler import RefundClassifierHandler
from handler.refund_inference import extract_payload
from handler.refund_preprocess import ImageError, load_for_model, normalize
from training.train import load_images
from training.catalogue import list_items


class RecordingContext(MockContext):
    """MockContext plus the per-request status TorchServe's real Context keeps."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = (code, phrase)


@pytest.fixture(scope="module")
def handler(extracted_archive):
    ctx = RecordingContext(model_pt_file="weights.pt", model_dir=str(extracted_archive), model_file=None,
                           model_name="refund_classifier", model_yaml_config_file="model-config.yaml")
    ctx.manifest["model"].update(modelName="refund_classifier", modelVersion="1")
    h = RefundClassifierHandler()
    h.initialize(ctx)
    return h, ctx


def jpeg_bytes(path) -> bytes:
    return path.read_bytes()


def test_batch_order_and_mixed_good_and_bad(handler, unseen_images):
    h, ctx = handler
    ctx.statuses.clear()
    good = sorted((unseen_images / "images").glob("*.jpg"))[:3]
    data = [{"body": good[0].read_bytes()}, {"body": b""}, {"data": good[1].read_bytes()},
            {"body": b"this is text, not a JPEG"}, {"body": base64.b64encode(good[2].read_bytes()).decode()}]
    out = h.handle(data, ctx)
    assert len(out) == 5
    assert [("label" in o) for o in out] == [True, False, True, False, True]
    assert out[1]["code"] == "empty" and out[3]["code"] == "not_an_image"
    assert ctx.statuses == {1: (400, "empty"), 3: (400, "not_an_image")}
    for o in (out[0], out[2], out[4]):
        assert o["model"] == "refund_classifier" and o["version"] == "1"
        assert 0 <= o["confidence"] <= 1 and o["topk"][0]["label"] == o["label"]
        ps = [t["p"] for t in o["topk"]]
        assert len(ps) == 5 and ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-6
    # each good answer is the same as that image alone
    alone = h.handle([{"body": good[1].read_bytes()}], ctx)[0]
    assert alone["label"] == out[2]["label"] and abs(alone["confidence"] - out[2]["confidence"]) < 1e-5


def test_truncated_image_is_rejected(handler, unseen_images):
    h, ctx = handler
    ctx.statuses.clear()
    data = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    out = h.handle([{"body": data[: len(data) // 2]}], ctx)
    assert out[0]["code"] == "corrupt" and ctx.statuses[0][0] == 400


def test_base64_errors_are_named():
    with pytest.raises(ImageError) as err:
        extract_payload({"body": "not base64!!"})
    assert err.value.code == "bad_base64"
    with pytest.raises(ImageError) as err:
        extract_payload({"other": b"x"})
    assert err.value.code == "no_image"


def test_pixel_limit():
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), "white").save(buf, "PNG")
    with pytest.raises(ImageError) as err:
        load_for_model(buf.getvalue(), (32, 32), max_pixels=1_000_000)
    assert err.value.code == "too_many_pixels"


def test_training_and_handler_preprocess_identically(handler, sample_catalogue):
    """One definition: training's cached tensors equal the handler's for the same files."""
    h, _ = handler
    items = list_items(sample_catalogue)[0][:5]
    cached = normalize(load_images(items, h.image_size), mean=h.mean, std=h.std)
    served = h.preprocess([{"body": it.path.read_bytes()} for it in items])
    assert torch.equal(cached, normalize(served.batch, mean=h.mean, std=h.std))
