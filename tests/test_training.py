"""Sample catalogue -> train -> export, on tiny data."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
import yaml

from handler.refund_model import build_model
from serving.archive import MODEL_NAME, archive_name
from support import TINY, run_train
from training import export as export_mod
from training.catalogue import CatalogueError, list_items, read_styles
from training.checkpoint import CHECKPOINT, load_archive_model, load_run


def test_sample_catalogue_has_the_kaggle_layout(sample_catalogue):
    rows, skipped = read_styles(sample_catalogue / "styles.csv")
    assert len(rows) == 6 * 30 and skipped == {}
    assert {r["articleType"] for r in rows} == {"Tshirts", "Watches", "Jeans", "Casual Shoes", "Handbags", "Socks"}
    # the name column holds a comma, as in Kaggle's unquoted file, and stays whole
    assert all(r["productDisplayName"].startswith("Sample ") and ", style " in r["productDisplayName"] for r in rows)
    assert all((sample_catalogue / "images" / f"{r['id']}.jpg").is_file() for r in rows)


def test_read_styles_copes_with_kaggle_quirks(tmp_path):
    (tmp_path / "styles.csv").write_text(
        "id,gender,articleType,usage,productDisplayName\n"
        "1,Men,Tshirts,NA,Plain, crew neck, tee\n"
        "2,Women,,Casual,no label\n"
        "x,Men,Jeans,Casual,bad id\n"
        "3,Men,Jeans\n"
    )
    rows, skipped = read_styles(tmp_path / "styles.csv")
    assert [r["id"] for r in rows] == ["1", "3"]
    assert rows[0]["productDisplayName"] == "Plain, crew neck, tee"
    assert rows[0]["usage"] is None and rows[1]["productDisplayName"] is None
    assert skipped == {"no_label": 1, "bad_id": 1}


def test_missing_required_column_is_named(tmp_path):
    (tmp_path / "styles.csv").write_text("id,gender\n1,Men\n")
    with pytest.raises(CatalogueError, match="articleType"):
        read_styles(tmp_path / "styles.csv")


def test_missing_images_are_counted(sample_catalogue, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "styles.csv").write_text("id,articleType\n1,Tshirts\n2,Jeans\n")
    (tmp_path / "images" / "1.jpg").write_bytes((sample_catalogue / "images" / "10000.jpg").read_bytes())
    items, skipped = list_items(tmp_path)
    assert [i.id for i in items] == ["1"] and skipped == {"missing_image": 1}


def test_checkpoint_is_state_dicts_and_config(trained_run):
    ckpt = torch.load(trained_run / CHECKPOINT, map_location="cpu", weights_only=True)  # no pickled model
    assert ckpt["model_config"] == {"arch": "tinynet", "num_classes": 6}
    assert ckpt["classes"] == sorted(ckpt["classes"]) and len(ckpt["classes"]) == 6
    assert ckpt["preprocess"]["image_size"] == [32, 32]
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history) == 10
    # the classes are trivially separable: a tiny net learns them in a few epochs
    assert history[-1]["val_acc"] >= 0.8, history


def test_export_writes_a_versioned_archive(model_store):
    mar = model_store / "refund_classifier-1.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        index = json.loads(z.read("index_to_name.json"))
        meta = json.loads(z.read("model_meta.json"))
    assert {"refund_handler.py", "refund_inference.py", "refund_model.py", "refund_preprocess.py", "refund_requests.py",
            "weights.pt", "index_to_name.json", "model_meta.json", "model-config.yaml"} <= names
    assert not any(n.startswith("training") or n.startswith("ingest") for n in names)
    assert manifest["model"]["modelName"] == "refund_classifier" and manifest["model"]["modelVersion"] == "1"
    assert config["batchSize"] >= 1 and "handler" in config
    assert index["0"] == "Casual Shoes" and len(index) == 6
    assert meta["arch"] == "tinynet" and meta["image_size"] == [32, 32]


def test_export_refuses_to_overwrite_a_version(trained_run, model_store):
    with pytest.raises(export_mod.ExportError, match="immutable"):
        export_mod.export(trained_run, "1", model_store=model_store)


def test_export_rejects_a_bad_version(trained_run, tmp_path):
    with pytest.raises(export_mod.ExportError, match="Invalid --version"):
        export_mod.export(trained_run, "../evil", model_store=tmp_path)


def test_archive_reader_gives_back_the_trained_model(trained_run, model_store):
    """serving.archive + training.checkpoint.load_archive_model (the benches' reader) vs the run's checkpoint."""
    ckpt, model = load_run(trained_run)
    archived, archive = load_archive_model(model_store / archive_name("1"))
    assert (archive.model, archive.version, archive.name) == (MODEL_NAME, "1", f"{MODEL_NAME}-1.mar")
    assert archive.classes() == ckpt["classes"] and archive.meta["arch"] == ckpt["model_config"]["arch"]
    assert archive.config["batchSize"] >= 1 and archive.weights_file == "weights.pt"
    state = archived.state_dict()
    assert set(state) == set(ckpt["model"]) and all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    assert not archived.training and torch.allclose(archived(x), model(x), atol=1e-5)  # model: channels_last


def test_the_default_network_follows_the_precision_training_runs_in(sample_catalogue, tmp_path, caplog, monkeypatch):
    """--arch auto: ResNet-26 where training runs in bf16, ResNet-18 where it runs in float32, said in the log."""
    import logging

    from training import train

    assert train.get_args_parser().get_default("arch") == "auto"
    assert (train.default_arch(True), train.default_arch(False)) == ("resnet26", "resnet18")
    monkeypatch.setattr(train, "DEFAULT_ARCH", {"bf16": "resnet18", "fp32": "tinynet"})  # the choice, not the network's cost
    caplog.set_level(logging.INFO, logger="training.train")
    tiny = [a for a in TINY if a not in ("--arch", "tinynet")]
    run_train("--data-dir", str(sample_catalogue), "--out", str(tmp_path / "run"), "--epochs", "1", "--amp", "off", *tiny)
    assert "--arch auto: tinynet, the network for training in float32 (--amp off)" in caplog.text
    assert torch.load(tmp_path / "run" / CHECKPOINT, map_location="cpu", weights_only=True)["model_config"]["arch"] == "tinynet"
