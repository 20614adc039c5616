"""The benches' peers are built for every network training can default to: the naive baseline's
archive (bench/naive_handler.py) and the stock image_classifier's (bench/stock.py) load the
archive's weights into the same network and answer a photo."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from bench.ingestion import make_naive_archive
from bench.stock import make_stock_archive, stock_resnet
from review_support import image_bytes
from support import extract
from training import train


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(set(train.DEFAULT_ARCH.values())))
def archive(request, tmp_path_factory) -> Path:
    """A random archive of each default network (bf16's and float32's), as `make bench` makes one."""
    return common.make_bench_archive(tmp_path_factory.mktemp("bench"), image_size=(32, 32), arch=request.param,
                                     int8="off")


def test_the_naive_baseline_serves_the_archive_s_network(archive, tmp_path, monkeypatch):
    folder = extract(make_naive_archive(archive, tmp_path), tmp_path / "naive")
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    monkeypatch.syspath_prepend(str(folder))  # TorchServe runs the handler in the archive's folder
    monkeypatch.delitem(sys.modules, "refund_model", raising=False)
    handler = load_module(folder / manifest["model"]["handler"], "naive_handler_under_test")
    ctx = type("Context", (), {"system_properties": {"model_dir": str(folder)}, "manifest": manifest})()
    classes = json.loads((folder / "naive_meta.json").read_text())["classes"]
    [answer] = handler.handle([{"body": image_bytes(0)}], ctx)
    assert answer["label"] in classes and 0 <= answer["confidence"] <= 1


def test_the_stock_handler_s_model_file_is_the_archive_s_network(archive, tmp_path):
    folder = extract(make_stock_archive(archive, tmp_path), tmp_path / "stock")
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    model_file = load_module(folder / manifest["model"]["modelFile"], "stock_model_under_test")
    net = model_file.StockResNet()
    net.load_state_dict(torch.load(folder / manifest["model"]["serializedFile"], map_location="cpu", weights_only=True))
    assert net.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, len(json.loads((folder / "index_to_name.json").read_text())))


def test_the_stock_handler_names_the_networks_it_can_build():
    assert stock_resnet("resnet26") == ("Bottleneck", [2, 2, 2, 2])
    assert stock_resnet("resnet50") == ("Bottleneck", [3, 4, 6, 3])
    assert stock_resnet("resnet18_s2") is None and stock_resnet("wide_resnet18") is None  # another stem or width
