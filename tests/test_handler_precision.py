"""bench/precision_agreement.py on the tiny trained run: the measurement the `precision: auto` gate relies on."""
from __future__ import annotations

import json

from bench import precision_agreement


def test_precision_agreement_on_the_validation_split(trained_run, tmp_path):
    out = tmp_path / "agreement.json"
    args = precision_agreement.get_args_parser().parse_args(["--run", str(trained_run), "--out", str(out)])
    code = precision_agreement.main(args)
    result = json.loads(out.read_text())
    val = (trained_run / "data" / "val.csv").read_text().splitlines()[1:]  # training.prepare's manifest
    assert result["split"] == "val" and result["images"] == len(val) > 0
    assert 0.0 <= result["top1_agreement"] <= 1.0 and result["max_abs_dp"] < 0.05
    assert result["disagreements"] == round((1 - result["top1_agreement"]) * len(val))
    assert code == (0 if result["top1_agreement"] >= 0.995 else 1)
    assert {"fp32_top1_acc", "bf16_top1_acc", "fp32_ms_per_image", "bf16_ms_per_image"} <= set(result)


def test_split_needs_a_run(sample_catalogue, capsys):
    args = precision_agreement.get_args_parser().parse_args(
        ["--random-init", "--arch", "tinynet", "--data-dir", str(sample_catalogue), "--split", "val"])
    assert precision_agreement.main(args) == 2
    assert "prepared manifests" in capsys.readouterr().err
