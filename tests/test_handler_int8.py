"""INT8 as a served precision: built and gated by training.export, loaded as it is by the handler,
chosen by `precision: auto` only when it passed its gate; in the handler and in a real TorchServe."""
from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import requests
import torch
import yaml

from handler.refund_inference import INT8_TIMING_ONLY, bf16_unavailable, calibrated_probs, class_bias, int8_unavailable, resolve_precision
from handler.refund_model import load_int8
from handler.refund_preprocess import normalize
from serving.archive import MODEL_NAME, archive_name
from serving.torchserve import make_torchserve
from support import extract, make_handler
from training import export as export_mod
from training import prepare as prepare_mod
from training import quantize
from training.engine import load_images

# Impossible to pass: every archive exported with it must fall back.
FAILING_GATE = quantize.Gate(min_agreement=1.01)


def with_settings(folder: Path, out: Path, **settings) -> Path:
    shutil.copytree(folder, out)
    cfg = yaml.safe_load((out / "model-config.yaml").read_text())
    cfg["handler"] = {**cfg.get("handler", {}), **settings}
    (out / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def int8_store(trained_run, tmp_path_factory) -> Path:
    """Version 1: int8 built and gated as by default; version 2: the same run with a gate it cannot pass."""
    store = tmp_path_factory.mktemp("store-int8")
    export_mod.export(trained_run, "1", model_store=store)
    export_mod.export(trained_run, "2", model_store=store, int8_gate=FAILING_GATE)
    return store


@pytest.fixture(scope="module")
def int8_folder(int8_store, tmp_path_factory) -> Path:
    return extract(int8_store / archive_name("1"), tmp_path_factory.mktemp("mar-int8"))


def val_photos(run: Path) -> list:
    return prepare_mod.read_manifest(run / "data" / "val.csv")


def test_export_builds_int8_and_records_its_gate(int8_folder, trained_run):
    meta = json.loads((int8_folder / "model_meta.json").read_text())
    int8 = meta["int8"]
    assert int8["status"] == "passed" and (int8_folder / int8["file"]).is_file()
    assert int8["requires"] == "vnni"  # 8-bit activations: the handler checks the CPU
    gate = int8["gate"]
    assert gate["split"] == "val" and gate["images"] == len(val_photos(trained_run))
    assert gate["top1_agreement"] >= gate["min_agreement"] == 0.99
    assert gate["fp32_top1"] - gate["int8_top1"] <= gate["max_top1_drop"] == 0.003
    assert gate["coverage_drop"] <= gate["max_coverage_drop"] == 0.01 and gate["coverage_resamples"] == 200
    train = prepare_mod.read_manifest(trained_run / "data" / "train.csv")
    assert int8["calibration_images"] == min(300, len(train)) and "train.csv" in int8["calibration_source"]
    # its own calibration, next to fp32's at the top level
    assert {"temperature", "class_bias", "prior_weight", "review_threshold"} <= set(int8)
    assert len(int8["class_bias"]) == meta["num_classes"]


def test_int8_handler_loads_without_quantizing_and_answers_within_the_gate(int8_folder, trained_run, tmp_path,
                                                                            monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise AssertionError("the handler quantized at start-up")

    for name in ("prepare", "convert", "quantize", "quantize_dynamic", "fuse_modules"):
        monkeypatch.setattr(torch.ao.quantization, name, refuse)
    with caplog.at_level(logging.INFO, logger="handler.refund_handler"):
        h8, ctx8 = make_handler(int8_folder)  # precision: auto
    assert h8.precision == "int8" and isinstance(h8.model, torch.jit.ScriptModule)
    assert "precision=int8" in caplog.text
    int8 = json.loads((int8_folder / "model_meta.json").read_text())["int8"]
    assert (h8.temperature, h8.review_threshold) == (int8["temperature"], int8["review_threshold"])
    h32, ctx32 = make_handler(with_settings(int8_folder, tmp_path / "fp32", precision="fp32"))
    assert h32.precision == "fp32"

    val = val_photos(trained_run)
    bodies = [{"body": r.path.read_bytes()} for r in val]
    a8, a32 = h8.handle(bodies, ctx8), h32.handle(bodies, ctx32)
    agreement = sum(x["label"] == y["label"] for x, y in zip(a8, a32)) / len(val)
    assert agreement >= int8["gate"]["min_agreement"], agreement
    assert all(a["needs_review"] is (a["confidence"] < int8["review_threshold"]) for a in a8)
    # the served answer is the archive's int8 program with the int8 calibration, nothing else
    program = load_int8(int8_folder / int8["file"], torch.zeros(1, 3, *h8.image_size))
    x = normalize(load_images(val, h8.image_size), mean=h8.mean, std=h8.std)
    with torch.inference_mode():
        probs = calibrated_probs(program(x), int8["temperature"], class_bias(int8, len(h8.classes)))
    conf, idx = probs.max(1)
    assert [a["label"] for a in a8] == [h8.classes[i] for i in idx.tolist()]
    assert max(abs(a["confidence"] - c) for a, c in zip(a8, conf.tolist())) < 1e-5


def test_a_failed_gate_is_recorded_and_the_handler_falls_back(int8_store, trained_run, tmp_path, caplog):
    folder = extract(int8_store / archive_name("2"), tmp_path / "mar")
    int8 = json.loads((folder / "model_meta.json").read_text())["int8"]
    assert int8["status"] == "failed" and "top-1 agreement with fp32" in int8["reason"] and "< 1.01" in int8["reason"]
    assert "file" not in int8 and not (folder / quantize.FILE).exists()
    assert int8["gate"]["min_agreement"] == 1.01 and 0 <= int8["gate"]["top1_agreement"] <= 1
    for setting in ("auto", "int8"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="handler.refund_handler"):
            h, ctx = make_handler(with_settings(folder, tmp_path / setting, precision=setting))
        assert h.precision in ("bf16", "fp32")
        fallback = [r for r in caplog.records if "not int8" in r.getMessage()]
        assert len(fallback) == 1 and fallback[0].levelno == logging.WARNING
        assert "int8 failed at export: top-1 agreement" in fallback[0].getMessage()
        assert h.handle([{"body": val_photos(trained_run)[0].path.read_bytes()}], ctx)[0]["label"] in h.classes


def test_int8_serves_fp32_s_rule_with_its_own_fit(trained_run, tmp_path):
    """The label adjustment and the confidence's score are fp32's (calibration.json), not chosen
    again on int8's outputs; its threshold is fitted on them."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    n = ckpt["model_config"]["num_classes"]
    (run / "calibration.json").write_text(json.dumps({
        "image_size": ckpt["preprocess"]["image_size"], "weights": "raw",
        "temperature": 1.0, "prior_weight": 0.0, "class_bias": [0.0] * n, "review_threshold": 0.5,
        "label_adjustment": 1.0, "label_bias": [0.1 * i for i in range(n)],
        "confidence_fit": {"score": "margin", "slope": 1.0, "intercept": 0.0}}))
    lenient = quantize.Gate(min_agreement=0.0, max_top1_drop=1.0, max_coverage_drop=1.0)
    export_mod.export(run, "1", model_store=tmp_path / "store", int8="on", int8_gate=lenient, sample_per_class=0)
    int8 = json.loads(zipfile.ZipFile(tmp_path / "store" / archive_name("1")).read("model_meta.json"))["int8"]
    assert int8["status"] == "passed"
    assert int8["label_adjustment"] == 1.0 and int8["confidence_fit"]["score"] == "margin"
    assert int8["review_threshold"] != 0.5  # fitted on int8's outputs


def test_the_coverage_drop_is_averaged_over_resamples_of_val():
    """Photos whose chance of a right answer rises with a latent confidence, and two models that
    see it through independent noise of the same size: equally good rankers. On the sample itself
    the second loses 1.6 points of coverage at 98 % precision, where the running precision happens
    to cross 98 % earlier; averaged over paired resamples it loses 0.7. A worse ranker still loses
    points."""
    g = torch.Generator().manual_seed(3)
    latent = torch.rand(4000, generator=g)
    correct = torch.rand(4000, generator=g) < 1 - 0.3 * (1 - latent) ** 2
    fp32, int8 = (latent + 0.01 * torch.randn(4000, generator=g) for _ in range(2))
    assert quantize.coverage_drop(fp32, correct, int8, correct, resamples=0) > 0.01  # one sample: refused
    assert quantize.coverage_drop(fp32, correct, int8, correct, resamples=200) < 0.01
    assert quantize.coverage_drop(fp32, correct, fp32, correct, resamples=200) == 0.0
    worse = latent + 0.3 * torch.randn(4000, generator=g)
    assert quantize.coverage_drop(fp32, correct, worse, correct, resamples=200) > 0.05


def test_the_gate_judges_coverage_by_the_averaged_drop():
    figures = {"top1_agreement": 0.995, "fp32_top1": 0.87, "int8_top1": 0.87,
               "fp32_coverage": 0.62, "int8_coverage": 0.605, "coverage_drop": 0.004}
    assert quantize.gate_failures(figures, quantize.Gate()) == []  # 1.5 points on val itself, 0.4 on average
    assert quantize.gate_failures({**figures, "coverage_drop": 0.012}, quantize.Gate()) == [
        "coverage at 98 % precision 0.0120 lower than fp32's on average over 200 resamples of val "
        "(at most 0.01; on val itself 0.6050 vs fp32 0.6200)"]


def test_export_logs_a_failed_gate(trained_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.export"):
        export_mod.export(trained_run, "3", model_store=tmp_path, int8_gate=FAILING_GATE, sample_per_class=0)
    assert "int8 failed its gate (top-1 agreement with fp32" in caplog.text
    assert re.search(r"coverage at 98 % precision [\d.]+ \(fp32 [\d.]+; [\d.]+ (lower|higher) on average over 200 resamples\)",
                     caplog.text)


def test_int8_off_and_unavailable(trained_run, tmp_path):
    folder = extract(export_mod.export(trained_run, "4", model_store=tmp_path, int8="off", sample_per_class=0),
                     tmp_path / "off")
    assert json.loads((folder / "model_meta.json").read_text())["int8"]["status"] == "off"
    assert not (folder / quantize.FILE).exists()
    h, _ = make_handler(folder)
    assert h.precision in ("bf16", "fp32")
    run = tmp_path / "run"  # a run whose prepared data is gone: auto exports without int8, on refuses
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("data"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["data_dir"] = str(run / "data")
    torch.save(ckpt, run / "checkpoint.pt")
    meta = json.loads(zipfile.ZipFile(export_mod.export(run, "5", model_store=tmp_path, sample_per_class=0))
                      .read("model_meta.json"))
    assert meta["int8"]["status"] == "unavailable" and "train.csv" in meta["int8"]["reason"]
    with pytest.raises(export_mod.ExportError, match="--int8 on: .*train.csv"):
        export_mod.export(run, "6", model_store=tmp_path, int8="on", sample_per_class=0)


def test_auto_picks_int8_only_when_it_passed():
    passed = {"int8": {"status": "passed", "file": quantize.FILE}}
    assert int8_unavailable(passed, device_type="cpu", backend_available=True) is None
    assert "x86" in int8_unavailable(passed, device_type="cpu", backend_available=False)
    assert "CPU only" in int8_unavailable(passed, device_type="cuda", backend_available=True)
    assert "failed at export: low" in int8_unavailable({"int8": {"status": "failed", "reason": "low"}},
                                                       device_type="cpu", backend_available=True)
    assert "no int8 model" in int8_unavailable({}, device_type="cpu", backend_available=True)
    # 8-bit activations saturate without VNNI: such a CPU falls back
    needs_vnni = {"int8": {**passed["int8"], "requires": "vnni"}}
    assert int8_unavailable(needs_vnni, device_type="cpu", backend_available=True, vnni=True) is None
    assert "VNNI" in int8_unavailable(needs_vnni, device_type="cpu", backend_available=True, vnni=False)
    for bf16_native, fallback in ((True, "bf16"), (False, "fp32")):
        assert resolve_precision("auto", device_type="cpu", bf16_native=bf16_native, int8_ready=True) == "int8"
        assert resolve_precision("int8", device_type="cpu", bf16_native=bf16_native, int8_ready=True) == "int8"
        assert resolve_precision("auto", device_type="cpu", bf16_native=bf16_native, int8_ready=False) == fallback
        assert resolve_precision("int8", device_type="cpu", bf16_native=bf16_native, int8_ready=False) == fallback
        assert resolve_precision("auto", device_type="cuda", bf16_native=bf16_native, int8_ready=True) == fallback
    assert resolve_precision("fp32", device_type="cpu", bf16_native=True, int8_ready=True) == "fp32"
    assert resolve_precision("bf16", device_type="cpu", bf16_native=False, int8_ready=True) == "bf16"


def test_an_archive_from_before_int8_serves_as_before(extracted_archive, tmp_path):
    folder = shutil.copytree(extracted_archive, tmp_path / "old")
    meta = json.loads((folder / "model_meta.json").read_text())
    meta.pop("int8", None)
    (folder / "model_meta.json").write_text(json.dumps(meta))
    h, ctx = make_handler(folder)
    assert h.precision in ("bf16", "fp32") and not isinstance(h.model, torch.jit.ScriptModule)


@pytest.mark.integration
def test_torchserve_serves_the_int8_archive(int8_store, int8_folder, trained_run, tmp_path):
    ts = make_torchserve(int8_store, tmp_path / "ts")
    ts.start([f"{MODEL_NAME}={archive_name('1')}"])
    try:
        val = val_photos(trained_run)
        url = f"{ts.inference_url}/predictions/{MODEL_NAME}"
        served = [requests.post(url, data=r.path.read_bytes(), timeout=60).json() for r in val]
        h, ctx = make_handler(int8_folder)
        expected = h.handle([{"body": r.path.read_bytes()} for r in val], ctx)
        assert [s["label"] for s in served] == [e["label"] for e in expected]
        assert max(abs(s["confidence"] - e["confidence"]) for s, e in zip(served, expected)) < 1e-5
        log = (ts.log_dir / "model_log.log").read_text()
        assert "precision=int8" in log and "Traceback" not in log
    finally:
        ts.stop()


def test_an_arch_without_a_quantizable_form_exports_without_int8(trained_run):
    assert {"tinynet", "resnet18", "resnet50"} <= set(quantize.quantizable_archs())
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    ckpt["model_config"] = {**ckpt["model_config"], "arch": "vgg11"}
    with pytest.raises(quantize.Int8Error, match="no quantizable form of arch 'vgg11'; int8 exists for: tinynet, resnet10_s2, resnet18_deep2"):
        quantize.build_int8(ckpt, ckpt["model"], image_size=(32, 32), fp32_calibration={})
    ckpt["model_config"]["arch"], ckpt["data_dir"] = "tinynet", None
    with pytest.raises(quantize.Int8Error, match="records no prepared data"):
        quantize.build_int8(ckpt, ckpt["model"], image_size=(32, 32), fp32_calibration={})


def test_auto_skips_bf16_that_failed_its_agreement(extracted_archive, tmp_path, monkeypatch, caplog):
    """The bf16 gate: auto picks bf16 only where the agreement training.evaluate recorded is >= 99.5 %."""
    from handler import refund_handler

    monkeypatch.setattr(refund_handler, "cpu_supports_bf16", lambda: True)  # as on an AVX512-BF16/AMX CPU
    assert bf16_unavailable({"calibration": {"val_bf16_fp32_top1_agreement": 0.999}}) is None
    assert bf16_unavailable({}) is None  # not measured (evaluated on a CPU without bf16): nothing against it
    for agreement, expected in ((0.999, "bf16"), (0.98, "fp32")):
        folder = shutil.copytree(extracted_archive, tmp_path / str(agreement))
        meta = json.loads((folder / "model_meta.json").read_text())
        meta["calibration"] = {**meta.get("calibration", {}), "val_bf16_fp32_top1_agreement": agreement}
        (folder / "model_meta.json").write_text(json.dumps(meta))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="handler.refund_handler"):
            h, _ = make_handler(folder)
        assert h.precision == expected
        assert ("not bf16, bf16 agreed with fp32 on 0.9800" in caplog.text) is (expected == "fp32")
    folder = with_settings(tmp_path / "0.98", tmp_path / "forced", precision="bf16")
    assert make_handler(folder)[0].precision == "bf16"  # bf16 forces it


def test_the_bench_archive_serves_the_default_network_s_int8_marked_timing_only(tmp_path, caplog):
    from bench import common
    from handler.refund_model import cpu_supports_vnni, int8_backend_available
    from training import train

    from handler.refund_model import cpu_supports_bf16

    assert common.default_arch() == train.default_arch(cpu_supports_bf16()) == \
        train.DEFAULT_ARCH["bf16" if cpu_supports_bf16() else "fp32"]
    mar = common.make_bench_archive(tmp_path / "bench", image_size=(32, 32), arch="tinynet")
    folder = extract(mar, tmp_path / "mar")
    meta = json.loads((folder / "model_meta.json").read_text())
    assert meta["int8"]["status"] == INT8_TIMING_ONLY and "never gated" in meta["int8"]["reason"]
    assert (folder / meta["int8"]["file"]).is_file() and "gate" not in meta["int8"]
    assert int8_unavailable(meta, device_type="cpu", backend_available=True, vnni=True) is None
    with caplog.at_level(logging.WARNING):
        h, ctx = make_handler(folder)
    if cpu_supports_vnni() and int8_backend_available():
        assert h.precision == "int8"
        assert "timing-only" in caplog.text and "not for answers" in caplog.text
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60, 80), (200, 40, 40)).save(buf, format="JPEG")
    answer = h.handle([{"body": buf.getvalue()}], ctx)[0]
    assert answer["label"] in h.classes and 0.0 <= answer["confidence"] <= 1.0
