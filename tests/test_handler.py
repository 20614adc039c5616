"""The handler, without a server: TorchServe's MockContext and the tiny exported model."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageOps
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from handler.refund_handler import (METRIC_BATCH_SIZE, METRIC_IMAGES, METRIC_INFERENCE, METRIC_PREPROCESS,
                                    METRIC_REJECTS, METRIC_STAGE, STAGES, RefundClassifierHandler)
from handler.refund_inference import (MarginFit, calibrated_probs, calibration, class_bias, confidence_fit, extract_payload,
                                      label_bias, label_margin, prepare_batch,
                                      resolve_precision, served_answers, served_labels, threads_per_worker)
from handler.refund_preprocess import ImageError, decode_image, load_for_model, normalize
from support import make_handler
from training.catalogue import list_items
from training.engine import load_images

@pytest.fixture(scope="module")
def handler(extracted_archive):
    return make_handler(extracted_archive)


def variant(archive: Path, tmp_path: Path, *, meta: dict | None = None, settings: dict | None = None) -> Path:
    """A copy of the extracted archive with model_meta.json keys / handler settings replaced."""
    out = tmp_path / "archive"
    shutil.copytree(archive, out)
    if meta:
        m = json.loads((out / "model_meta.json").read_text())
        (out / "model_meta.json").write_text(json.dumps({**m, **meta}))
    if settings:
        cfg = yaml.safe_load((out / "model-config.yaml").read_text())
        cfg["handler"] = {**cfg.get("handler", {}), **settings}
        (out / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    return out


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(40, 30)) -> Image.Image:
    """An RGB picture with distinct quadrants, so rotations and crops show."""
    w, h = size
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((30, 200, 30), (w // 2, 0, w, h // 2))
    img.paste((30, 30, 200), (0, h // 2, w // 2, h))
    return img


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (grayscale, 8 bit) with no pixel data: a bomb's header, instantly."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def pixel(img: Image.Image, xy) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel(xy)


def close(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# -- formats and modes -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                                    ("TIFF", {}), ("GIF", {})])
def test_every_format_decodes_to_rgb(fmt, kw):
    img = decode_image(encode(photo(), fmt, **kw))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert close(pixel(img, (2, 2)), (200, 30, 30), tol=40)
    assert close(pixel(img, (38, 2)), (30, 200, 30), tol=40)


def test_gif_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert close(pixel(decode_image(buf.getvalue()), (5, 5)), (255, 0, 0), tol=5)


def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert close(pixel(decode_image(buf.getvalue()), (5, 5)), (255, 0, 0), tol=5)


def test_grayscale_and_bilevel():
    assert pixel(decode_image(encode(Image.new("L", (8, 8), 77), "PNG")), (1, 1)) == (77, 77, 77)
    assert pixel(decode_image(encode(Image.new("1", (8, 8), 1), "PNG")), (1, 1)) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    pal = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert close(pixel(decode_image(encode(pal, "PNG")), (2, 2)), (200, 30, 30))
    # transparent palette entry -> white, like every other transparency
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (4, 0, 8, 8))
    data = encode(p, "PNG", transparency=0)
    img = decode_image(data)
    assert pixel(img, (1, 1)) == (255, 255, 255) and pixel(img, (6, 1)) == (255, 0, 0)


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (4, 0, 8, 8))
    img = decode_image(encode(rgba, "PNG"))
    assert pixel(img, (1, 1)) == (255, 255, 255) and pixel(img, (6, 1)) == (0, 0, 255)
    half = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert close(pixel(half, (1, 1)), (127, 127, 127), tol=2)  # half-transparent black on white
    la = decode_image(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"))
    assert pixel(la, (1, 1)) == (255, 255, 255)
    webp = decode_image(encode(rgba, "WEBP", lossless=True))
    assert pixel(webp, (1, 1)) == (255, 255, 255)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("JPEG", "TIFF"):
        assert close(pixel(decode_image(encode(cmyk, fmt)), (4, 4)), (255, 0, 0), tol=20), fmt


def test_16_bit_grayscale_is_scaled_not_clipped():
    import numpy as np

    ramp = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257))  # 0..65535, mode I;16
    assert ramp.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        img = decode_image(encode(ramp, fmt))
        values = sorted({pixel(img, (x, y))[0] for x in range(16) for y in range(16)})
        assert values[0] == 0 and values[-1] == 255 and len(values) > 200, fmt


def test_float_image():
    img = decode_image(encode(Image.new("F", (4, 4), 100.0), "TIFF"))
    assert pixel(img, (1, 1)) == (100, 100, 100)


@pytest.mark.parametrize("orientation,expected_size,red_corner", [
    (1, (40, 30), (0, 0)),     # as stored
    (3, (40, 30), (39, 29)),   # rotated 180
    (6, (30, 40), (29, 0)),    # stored rotated 90 CCW: the red top-left ends top-right
    (8, (30, 40), (0, 39)),    # stored rotated 90 CW: the red top-left ends bottom-left
])
def test_exif_orientation_is_applied(orientation, expected_size, red_corner):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image(encode(photo(), "JPEG", quality=95, exif=exif))
    assert img.size == expected_size
    assert close(pixel(img, red_corner), (200, 30, 30), tol=40)


def test_a_readable_orientation_turns_the_photo_even_where_the_rest_of_the_exif_is_broken():
    """Pillow turns the pixels, then fails to write back an EXIF block that holds a zero denominator."""
    ifd = (struct.pack(">H", 2) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)  # orientation 6
           + struct.pack(">HHII", 282, 5, 1, 38) + struct.pack(">I", 0) + struct.pack(">II", 1, 0))  # XResolution 1/0
    data = encode(photo(), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd)
    with pytest.raises(ZeroDivisionError):  # the premise: Pillow's own copying transpose gives up
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    img = decode_image(data)
    assert img.size == (30, 40) and close(pixel(img, (29, 0)), (200, 30, 30), tol=40)


def test_broken_exif_does_not_reject_a_readable_photo(monkeypatch):
    from handler import refund_preprocess

    def boom(img, **kwargs):
        raise ValueError("bad EXIF")

    monkeypatch.setattr(refund_preprocess.ImageOps, "exif_transpose", boom)
    assert decode_image(encode(photo(), "PNG")).size == (40, 30)


# -- bad inputs ------------------------------------------------------------------------------

def code_of(data: bytes, **limits) -> str:
    with pytest.raises(ImageError) as err:
        decode_image(data, **limits)
    assert err.value.message
    return err.value.code


def test_bad_inputs_are_named():
    jpeg = encode(photo((200, 200)), "JPEG")
    png = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "PNG")
    assert code_of(b"") == "empty"
    assert code_of(b"this is text, not an image") == "not_an_image"
    assert code_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) == "not_an_image"  # a header and nothing sane after it
    for cut in (jpeg[: len(jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(ImageError, match="truncated") as err:
            decode_image(cut)
        assert err.value.code == "corrupt"
    assert code_of(jpeg, max_bytes=1000) == "too_large"


def test_decompression_bombs():
    # PNG headers of bombs (a real 20000 x 20000 1-bit PNG is 49 kB and 400 MP; encoding one takes seconds)
    # above PIL's own limit (2 x Image.MAX_IMAGE_PIXELS): PIL's DecompressionBombError, named the same
    assert code_of(png_header(30000, 30000)) == "too_many_pixels"
    # between PIL's warning and error thresholds: our limit (50 MP) refuses it, and no warning leaks
    assert code_of(png_header(10000, 10000)) == "too_many_pixels"
    # the limit is configurable
    assert code_of(png_header(2000, 2000), max_pixels=1_000_000) == "too_many_pixels"
    assert code_of(encode(Image.new("RGB", (1000, 1000), "white"), "PNG"), max_pixels=999_999) == "too_many_pixels"


def test_payloads_and_base64():
    jpeg = encode(photo(), "JPEG")
    b64 = base64.b64encode(jpeg)
    assert extract_payload({"body": bytearray(jpeg)}) == jpeg                    # raw body
    assert extract_payload({"data": jpeg}) == jpeg                               # multipart field "data"
    assert extract_payload({"photo": bytearray(jpeg)}) == jpeg                   # a single field of any name
    assert extract_payload({"body": b64.decode()}) == jpeg                       # text/plain body
    assert extract_payload({"body": bytearray(b64)}) == jpeg                     # base64 sent as raw bytes
    assert extract_payload({"body": bytearray(b64[:40] + b"\n" + b64[40:])}) == jpeg  # wrapped lines
    assert extract_payload({"body": "data:image/jpeg;base64," + b64.decode()}) == jpeg
    assert extract_payload({"body": {"b64": b64.decode()}}) == jpeg              # JSON body
    for bad, code in [({"body": "not base64!!"}, "bad_base64"), ({}, "no_image"),
                      ({"a": b"x", "b": b"y"}, "no_image"), ({"body": {"nothing": 1}}, "no_image"),
                      ({"body": 12}, "no_image")]:
        with pytest.raises(ImageError) as err:
            extract_payload(bad)
        assert err.value.code == code, bad


# -- the handler -----------------------------------------------------------------------------

def test_batch_order_and_mixed_good_and_bad(handler, unseen_images):
    h, ctx = handler
    ctx.statuses.clear()
    good = sorted((unseen_images / "images").glob("*.jpg"))[:4]
    big = png_header(8000, 7000)  # 56 MP > the 50 MP limit
    data = [{"body": good[0].read_bytes()}, {"body": b""}, {"data": good[1].read_bytes()},
            {"body": b"this is text, not a JPEG"}, {"body": base64.b64encode(good[2].read_bytes()).decode()},
            {"body": good[3].read_bytes()[: good[3].stat().st_size // 2]}, {"body": big}, {"file": good[3].read_bytes()}]
    out = h.handle(data, ctx)
    assert len(out) == len(data)
    assert [("label" in o) for o in out] == [True, False, True, False, True, False, False, True]
    assert ctx.statuses == {1: (400, "empty"), 3: (400, "not_an_image"), 5: (400, "corrupt"),
                            6: (413, "too_many_pixels")}
    for i in (1, 3, 5, 6):
        assert set(out[i]) >= {"error", "code"} and out[i]["code"] == ctx.statuses[i][1]
    for o in (out[0], out[2], out[4], out[7]):
        assert o["model"] == "refund_classifier" and o["version"] == "1"
        assert 0 <= o["confidence"] <= 1 and o["topk"][0]["label"] == o["label"] and o["topk"][0]["p"] == o["confidence"]
        assert isinstance(o["needs_review"], bool)
        ps = [t["p"] for t in o["topk"]]
        assert len(ps) == 5 and ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-6
    # each answer is that image's own, wherever it sat in the batch
    for i, path in [(0, good[0]), (2, good[1]), (7, good[3])]:
        alone = h.handle([{"body": path.read_bytes()}], ctx)[0]
        assert alone["label"] == out[i]["label"] and abs(alone["confidence"] - out[i]["confidence"]) < 5e-3


def test_batch_of_only_bad_inputs(handler):
    h, ctx = handler
    ctx.statuses.clear()
    out = h.handle([{"body": b""}, {"body": b"x"}], ctx)
    assert [o["code"] for o in out] == ["empty", "not_an_image"] and set(ctx.statuses) == {0, 1}


# -- several photos per request ---------------------------------------------------------------

def test_a_request_of_several_photos_gets_a_list_in_order(handler, unseen_images):
    h, ctx = handler
    ctx.statuses.clear()
    good = sorted((unseen_images / "images").glob("*.jpg"))[:2]
    corrupt = good[1].read_bytes()[: good[1].stat().st_size // 2]
    # multipart parts in any order: the index in the name is the place in the answer
    request = {"photos[2]": bytearray(good[1].read_bytes()), "photos[0]": bytearray(good[0].read_bytes()),
               "photos[1]": bytearray(corrupt)}
    out = h.handle([request], ctx)
    assert len(out) == 1 and isinstance(out[0], list) and len(out[0]) == 3
    first, bad, last = out[0]
    assert ctx.statuses == {}  # the request itself is fine: 200, errors are per item
    assert bad["code"] == "corrupt" and bad["status"] == 400 and "truncated" in bad["error"]
    for item, path in ((first, good[0]), (last, good[1])):
        alone = h.handle([{"body": path.read_bytes()}], ctx)[0]
        assert "status" not in item and item["label"] == alone["label"]
        assert abs(item["confidence"] - alone["confidence"]) < 5e-3


def test_several_photo_and_single_photo_requests_in_one_batch(handler, unseen_images):
    h, ctx = handler
    ctx.statuses.clear()
    ctx.metrics.recorded.clear()
    good = [p.read_bytes() for p in sorted((unseen_images / "images").glob("*.jpg"))[:3]]
    b64 = [base64.b64encode(g).decode() for g in good]
    data = [{"body": good[0]},                                                  # one photo, raw
            {"body": {"instances": [b64[1], {"b64": b64[2]}, "", "not base64!"]}},  # JSON, 4 photos
            {"body": b""},                                                      # one photo, empty
            {"body": [b64[0]]},                                                 # a bare JSON list of one
            {"photos[0]": good[2], "photos[1]": png_header(8000, 7000)}]        # multipart, 2 photos
    out = h.handle(data, ctx)
    assert len(out) == 5
    assert "label" in out[0] and out[2]["code"] == "empty"
    assert [i.get("label") is not None for i in out[1]] == [True, True, False, False]
    assert [(i["code"], i["status"]) for i in out[1][2:]] == [("empty", 400), ("bad_base64", 400)]
    assert isinstance(out[3], list) and out[3][0]["label"] == out[0]["label"]
    assert "label" in out[4][0] and (out[4][1]["code"], out[4][1]["status"]) == ("too_many_pixels", 413)
    assert ctx.statuses == {2: (400, "empty")}  # only the single-photo request has a status of its own
    assert ctx.metrics.values(METRIC_IMAGES) == [9]  # photos, not requests
    assert ctx.metrics.values(METRIC_REJECTS, Reason="empty") == [2]


@pytest.mark.parametrize("request_, code", [
    ({"body": {"instances": "photo"}}, "bad_request"),
    ({"body": {"instances": []}}, "bad_request"),
    ({"body": []}, "bad_request"),
    ({"photos[0]": b"x", "photos[2]": b"y"}, "bad_request"),  # photos[1] is missing
    ({"photos[1]": b"x"}, "bad_request"),
    ({"body": {"instances": ["x"] * 65}}, "too_many_photos"),
])
def test_a_malformed_request_of_several_photos_gets_one_clear_error(handler, unseen_images, request_, code):
    h, ctx = handler
    ctx.statuses.clear()
    good = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    out = h.handle([{"body": good}, request_], ctx)
    assert "label" in out[0]  # its batch-mate is answered as usual
    assert isinstance(out[1], dict) and out[1]["code"] == code and ctx.statuses == {1: (400, code)}
    assert out[1]["error"]


def test_metrics_per_batch(handler, unseen_images):
    h, ctx = handler
    ctx.metrics.recorded.clear()
    good = next((unseen_images / "images").glob("*.jpg")).read_bytes()
    h.handle([{"body": good}, {"body": b""}, {"body": b""}, {"body": b"nope"}, {"body": good}], ctx)
    m = ctx.metrics
    assert m.values(METRIC_IMAGES) == [5] and m.values(METRIC_BATCH_SIZE) == [5]
    assert m.values(METRIC_REJECTS, Reason="empty") == [2] and m.values(METRIC_REJECTS, Reason="not_an_image") == [1]
    assert len(m.values(METRIC_PREPROCESS)) == 1 and len(m.values(METRIC_INFERENCE)) == 1
    assert 0 < m.values(METRIC_PREPROCESS)[0] < 10 and 0 < m.values(METRIC_INFERENCE)[0] < 10


def test_stage_metrics_split_the_batch_time(handler, unseen_images):
    """decode, assemble, forward, response: once per batch each, together within the handler's own time."""
    h, ctx = handler
    ctx.metrics.recorded.clear()
    good = [p.read_bytes() for p in sorted((unseen_images / "images").glob("*.jpg"))[:4]]
    started = time.perf_counter()
    h.handle([{"body": good[0]}, {"body": b""}, {"body": {"instances": [base64.b64encode(g).decode() for g in good[1:]]}}], ctx)
    wall = time.perf_counter() - started
    m = ctx.metrics
    stages = {stage: m.values(METRIC_STAGE, Stage=stage) for stage in STAGES}
    assert all(len(v) == 1 and v[0] > 0 for v in stages.values()), stages
    assert sum(v[0] for v in stages.values()) <= wall
    # the old two figures are the same time, split: preprocess holds decode, inference holds forward
    assert stages["decode"][0] <= m.values(METRIC_PREPROCESS)[0]
    assert stages["forward"][0] <= m.values(METRIC_INFERENCE)[0]
    # a batch with no photo to run: only decode and response
    ctx.metrics.recorded.clear()
    h.handle([{"body": b""}], ctx)
    assert {s: len(m.values(METRIC_STAGE, Stage=s)) for s in STAGES} == {"decode": 1, "assemble": 0, "forward": 0, "response": 1}


def test_handler_limits_come_from_model_config(extracted_archive, tmp_path):
    h, ctx = make_handler(variant(extracted_archive, tmp_path, settings={"max_pixels": 1000, "max_bytes": 5000, "topk": 2}))
    small = encode(photo((30, 30)), "PNG")
    out = h.handle([{"body": small}, {"body": encode(photo((40, 30)), "PNG")},
                    {"body": encode(Image.effect_noise((60, 60), 80).convert("RGB"), "PNG")}], ctx)
    assert len(out[0]["topk"]) == 2
    assert out[1]["code"] == "too_many_pixels" and out[2]["code"] == "too_large"
    assert ctx.statuses[1][0] == 413 and ctx.statuses[2][0] == 413


def test_temperature_and_review_threshold_from_model_meta(handler, extracted_archive, tmp_path, unseen_images):
    h1, ctx1 = handler
    h2, ctx2 = make_handler(variant(extracted_archive, tmp_path, meta={"temperature": 3.0, "review_threshold": 0.99}))
    assert (h2.temperature, h2.review_threshold) == (3.0, 0.99)
    images = sorted((unseen_images / "images").glob("*.jpg"))[:4]
    for path in images:
        a = h1.handle([{"body": path.read_bytes()}], ctx1)[0]
        b = h2.handle([{"body": path.read_bytes()}], ctx2)[0]
        assert a["label"] == b["label"]  # temperature scaling never changes the ranking
        assert b["confidence"] < a["confidence"]  # a softer distribution
        assert b["needs_review"] is True
        assert a["needs_review"] is (a["confidence"] < h1.review_threshold)
    # the calibrated probabilities are softmax(logits / T)
    x = normalize(load_images(list_items(unseen_images)[0][:1], h1.image_size), mean=h1.mean, std=h1.std)
    with torch.inference_mode():
        logits = h1.model.float()(x.to(h1.device)).float().cpu()
    expected = torch.softmax(logits / 3.0, 1).max().item()
    got = h2.handle([{"body": list_items(unseen_images)[0][0].path.read_bytes()}], ctx2)[0]["confidence"]
    assert abs(got - expected) < 2e-2  # bf16 on CPUs that have it


def test_class_bias_from_model_meta_shifts_the_answer(handler, extracted_archive, tmp_path, unseen_images):
    h1, ctx1 = handler
    favoured = 2
    bias = [0.0] * len(h1.classes)
    bias[favoured] = 50.0
    h2, ctx2 = make_handler(variant(extracted_archive, tmp_path, meta={"class_bias": bias}))
    body = list_items(unseen_images)[0][0].path.read_bytes()
    assert h1.handle([{"body": body}], ctx1)[0]["confidence"] < 1.0
    assert h2.handle([{"body": body}], ctx2)[0]["label"] == h1.classes[favoured]
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert calibrated_probs(logits, 2.0, torch.tensor([0.0, 0.0, -1.0]))[0].tolist() == pytest.approx(
        torch.softmax(torch.tensor([0.5, 1.0, 0.5]), 0).tolist())
    assert calibrated_probs(logits, 1.0, None)[0].tolist() == pytest.approx(torch.softmax(logits[0], 0).tolist())


def test_a_label_bias_chooses_the_label_and_the_confidence_stays_its_calibrated_probability(
        handler, extracted_archive, tmp_path, unseen_images):
    h1, ctx1 = handler
    body = list_items(unseen_images)[0][0].path.read_bytes()
    plain = h1.handle([{"body": body}], ctx1)[0]
    runner_up = plain["topk"][1]
    bias = [0.0] * len(h1.classes)
    bias[h1.classes.index(runner_up["label"])] = 50.0
    h2, ctx2 = make_handler(variant(extracted_archive, tmp_path, meta={"label_bias": bias, "label_adjustment": 0.5}))
    got = h2.handle([{"body": body}], ctx2)[0]
    assert got["label"] == runner_up["label"]
    assert got["confidence"] == pytest.approx(runner_up["p"], abs=2e-2)  # bf16 on CPUs that have it
    assert got["needs_review"] is (got["confidence"] < h2.review_threshold)
    assert [t["label"] for t in got["topk"]] == [t["label"] for t in plain["topk"]]  # still the most probable first
    assert h2.label_bias is not None and h1.label_bias is None


def test_a_margin_fit_serves_the_confidence_and_needs_review_follows_it(handler, extracted_archive, tmp_path, unseen_images):
    h1, ctx1 = handler
    bodies = [item.path.read_bytes() for item in list_items(unseen_images)[0][:4]]
    plain = h1.handle([{"body": b} for b in bodies], ctx1)
    fit = {"score": "margin", "slope": 2.0, "intercept": -1.0}
    margins = [math.log(a["topk"][0]["p"] / a["topk"][1]["p"]) for a in plain]
    threshold = 1 / (1 + math.exp(-(2.0 * sorted(margins)[1] - 1.0))) + 1e-6  # two of the four go to review
    h2, ctx2 = make_handler(variant(extracted_archive, tmp_path, meta={"confidence_fit": fit, "review_threshold": threshold}))
    got = h2.handle([{"body": b} for b in bodies], ctx2)
    for a, m, b in zip(got, margins, plain):
        assert a["label"] == b["label"] and a["topk"] == pytest.approx(b["topk"], abs=2e-2)  # bf16 where the CPU has it
        assert a["confidence"] == pytest.approx(1 / (1 + math.exp(-(2.0 * m - 1.0))), abs=2e-2)
        assert a["needs_review"] is (a["confidence"] < threshold)
    assert sum(a["needs_review"] for a in got) == 2
    assert h1.confidence_fit is None and h2.confidence_fit == MarginFit(2.0, -1.0)


def test_served_answers_reads_the_confidence_from_the_margin_with_a_margin_fit():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    assert label_margin(probs, torch.tensor([0, 0, 1])).tolist() == pytest.approx(
        [math.log(2), math.log(18), math.log(0.3 / 0.5)], abs=1e-5)
    conf, labels = served_answers(probs, torch.tensor([0.0, 1.0, 0.0]), MarginFit(1.5, 0.5))
    assert labels.tolist() == [1, 0, 1]  # the label bias still chooses the label; the margin is that label's
    expected = [1.5 * math.log(0.3 / 0.6) + 0.5, 1.5 * math.log(0.9 / 0.05) + 0.5, 1.5 * math.log(0.3 / 0.5) + 0.5]
    assert conf.tolist() == pytest.approx([1 / (1 + math.exp(-z)) for z in expected], abs=1e-6)
    assert confidence_fit({}) is None
    for bad in ({"score": "margin", "slope": 0.0, "intercept": 0.0}, {"score": "entropy", "slope": 1, "intercept": 0},
                {"score": "margin", "slope": "x", "intercept": 0}, {"score": "margin"}, [1, 2]):
        with pytest.raises(ValueError, match="confidence_fit"):
            confidence_fit({"confidence_fit": bad})


def test_a_photo_whose_decode_outlasts_its_time_limit_is_answered_on_its_own():
    width, height = 3000, 3000  # 9 MP: under max_pixels, but tens of milliseconds to decode
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buf, "PNG")
    slow = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), "red").save(buf, "PNG")
    quick = buf.getvalue()
    started = time.perf_counter()
    prepared = prepare_batch([{"body": slow}, {"body": quick}], (80, 60), max_pixels=50_000_000, max_bytes=100_000_000,
                             decode_timeout_s=0.005)
    assert prepared.good == [1] and prepared.errors[0].code == "decode_timeout"
    assert "longer than 0.005s" in prepared.errors[0].message and time.perf_counter() - started < 5
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert prepare_batch([{"body": slow}], (80, 60), max_pixels=50_000_000, max_bytes=100_000_000,
                         decode_timeout_s=None).good == [0]  # no limit: decoded


def test_served_labels_is_the_argmax_of_log_probabilities_plus_the_label_bias():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.05, 0.05, 0.9]])
    assert served_labels(probs).tolist() == [0, 2]
    bias = torch.tensor([0.0, 0.0, 1.2])  # log(0.6 / 0.1) = 1.79 > 1.2: the first row keeps its label
    assert served_labels(probs, bias).tolist() == [0, 2]
    bias = torch.tensor([0.0, 0.8, 0.0])  # log(0.6 / 0.3) = 0.69 < 0.8: class 1 wins the first row
    conf, labels = served_answers(probs, bias)
    assert labels.tolist() == [1, 2] and conf.tolist() == pytest.approx([0.3, 0.9])
    with pytest.raises(ValueError, match="label_bias .* 3 numbers"):
        label_bias({"label_bias": [0.0, 1.0]}, 3)
    assert label_bias({}, 3) is None


def test_invalid_calibration_and_settings_are_refused():
    with pytest.raises(ValueError, match="class_bias .* 3 numbers"):
        class_bias({"class_bias": [0.0, 1.0]}, 3)
    with pytest.raises(ValueError, match="finite"):
        class_bias({"class_bias": [0.0, float("nan"), 1.0]}, 3)
    assert class_bias({}, 3) is None
    with pytest.raises(ValueError, match="temperature"):
        calibration({"temperature": 0})
    with pytest.raises(ValueError, match="review_threshold"):
        calibration({"review_threshold": 1.5})
    assert calibration({}) == (1.0, 0.5)
    with pytest.raises(ValueError, match="choose one of: auto, fp32, bf16"):
        resolve_precision("fp16", device_type="cpu", bf16_native=True)


def test_precision_and_threads():
    assert resolve_precision("auto", device_type="cpu", bf16_native=True) == "bf16"
    assert resolve_precision("auto", device_type="cpu", bf16_native=False) == "fp32"
    assert resolve_precision("fp32", device_type="cpu", bf16_native=True) == "fp32"
    assert resolve_precision("bf16", device_type="cuda", bf16_native=False) == "bf16"
    assert threads_per_worker("auto", cores=2, workers=1) == 2
    assert threads_per_worker("auto", cores=2, workers=2) == 1
    assert threads_per_worker("auto", cores=2, workers=4) == 1
    assert threads_per_worker(3, cores=2, workers=1) == 3
    with pytest.raises(ValueError):
        threads_per_worker(-1, cores=2, workers=1)


def test_a_worker_keeps_what_a_batch_frees_instead_of_faulting_it_in_again(handler):
    """A forward pass's big blocks go back to the kernel when freed and fault in again, page by page, in the
    next batch; keep_freed_memory (called by the handler's initialize) stops that. In a fresh interpreter,
    as a worker is: the setting lasts for the process."""
    assert handler[0].memory_kept, "initialize did not keep freed memory"
    script = textwrap.dedent("""
        import resource, torch, torchvision
        from handler.refund_inference import keep_freed_memory
        torch.set_num_threads(1)
        model = torchvision.models.resnet18(num_classes=30).eval().to(memory_format=torch.channels_last)
        def faults_in_a_round():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.inference_mode():
                for b in (4, 32, 8, 64):  # batch sizes change, as TorchServe's do
                    model(torch.rand(b, 3, 80, 60).contiguous(memory_format=torch.channels_last))
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults_in_a_round()
        plain = faults_in_a_round()
        assert keep_freed_memory()
        faults_in_a_round()
        print(plain, faults_in_a_round())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plain, kept = map(int, out.stdout.split())
    assert plain > 1000 and kept < plain / 20, (plain, kept)


def test_fp32_archive_setting(extracted_archive, tmp_path, handler, unseen_images):
    h32, ctx32 = make_handler(variant(extracted_archive, tmp_path, settings={"precision": "fp32"}))
    workers = 2  # handler/model-config.yaml's maxWorkers: threads auto = cores // workers
    assert h32.precision == "fp32" and torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // workers)
    h, ctx = handler
    data = [{"body": p.read_bytes()} for p in sorted((unseen_images / "images").glob("*.jpg"))]
    a, b = h.handle(data, ctx), h32.handle(data, ctx32)
    agree = sum(x["label"] == y["label"] for x, y in zip(a, b)) / len(a)
    assert agree >= 0.9, agree


def test_training_and_handler_preprocess_identically(handler, sample_catalogue):
    """One definition: training's cached tensors equal the handler's for the same files."""
    h, _ = handler
    items = list_items(sample_catalogue)[0][:5]
    cached = normalize(load_images(items, h.image_size), mean=h.mean, std=h.std)
    served = prepare_batch([{"body": it.path.read_bytes()} for it in items], h.image_size,
                           max_pixels=h.max_pixels, max_bytes=h.max_bytes)
    assert torch.equal(cached, normalize(served.batch, mean=h.mean, std=h.std))


def test_a_served_batch_is_channels_last_and_normalizes_bit_for_bit_as_the_formula():
    """The handler stacks photos in the model's layout and normalizes them there; the values are those of
    (x / 255 - mean) / std on the plain (B, 3, H, W) batch, as training computes them."""
    rgba = Image.new("RGBA", (40, 30), (10, 200, 90, 128))
    photos = [encode(photo(), "JPEG", quality=90), encode(photo((64, 48)), "PNG"), encode(rgba, "PNG"),
              encode(Image.linear_gradient("L").resize((40, 30)), "PNG")]
    served = prepare_batch([{"body": b} for b in photos], (30, 40), max_pixels=10**6, max_bytes=10**6)
    assert served.batch.shape == (4, 3, 30, 40) and served.batch.is_contiguous(memory_format=torch.channels_last)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalize(served.batch, mean=mean, std=std)
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = served.batch.contiguous()
    formula = (plain.float() / 255.0 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.equal(x, formula) and torch.equal(normalize(plain, mean=mean, std=std), formula)
    assert torch.equal(served.batch[1], load_for_model(photos[1], (30, 40)))


def test_load_for_model_shape_and_dtype():
    t = load_for_model(encode(photo(), "PNG"), (24, 16))
    assert t.shape == (3, 24, 16) and t.dtype == torch.uint8


def test_plain_mock_context_and_legacy_metrics_store(extracted_archive, unseen_images):
    """TorchServe's own MockContext (legacy MetricsStore, no per-request status) still works for good images."""
    ctx = MockContext(model_pt_file="weights.pt", model_dir=str(extracted_archive), model_file=None,
                      model_name="refund_classifier", model_yaml_config_file="model-config.yaml")
    h = RefundClassifierHandler()
    h.initialize(ctx)
    out = h.handle([{"body": p.read_bytes()} for p in sorted((unseen_images / "images").glob("*.jpg"))[:2]], ctx)
    assert [("label" in o) for o in out] == [True, True]
    assert {m.name for m in ctx.metrics.store} >= {METRIC_IMAGES, METRIC_INFERENCE}
