"""A peer: TorchServe's own stock `image_classifier` handler on the weights of a refund archive.

Set up as TorchServe's image-classifier example does it (examples/image_classifier/resnet_18): a
model file whose one class is torchvision's ResNet with our head, the state_dict as the serialized
file, `--handler image_classifier`, index_to_name.json as an extra file, and no model-config.yaml
(one worker, batch size 1). Its preprocessing is the handler's default: Resize(256), CenterCrop(224),
ToTensor, Normalize with ImageNet statistics, fp32. Nothing is downloaded: the weights are the
archive's own, the archiver is the venv's torch-model-archiver.

The stock handler's module imports captum (for its explanations endpoint, which the bench never
calls), and captum is not among our requirements: `stub_path` gives the worker a stand-in for that
one import, so the handler's inference path runs exactly as shipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bench import common
from handler.refund_model import RESNET_SHAPES, ResNetShape

STOCK_MODEL = "refund_stock"
# torchvision's ResNet constructors: block and layers of each depth.
_RESNETS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]), "resnet101": ("Bottleneck", [3, 4, 23, 3]),
    "resnet152": ("Bottleneck", [3, 8, 36, 3]),
}


def stock_resnet(arch: str) -> tuple[str, list[int]] | None:
    """(block, layers) of torchvision's ResNet that `arch` is, or None: torchvision's own depths, and
    our shapes that keep torchvision's stem and widths (resnet26: its bottleneck blocks, 2-2-2-2)."""
    if arch in _RESNETS:
        return _RESNETS[arch]
    shape = RESNET_SHAPES.get(arch)
    if shape is None or shape != ResNetShape(shape.block, shape.layers):  # another stem or widths
        return None
    return ("BasicBlock" if shape.block == "basic" else "Bottleneck"), list(shape.layers)


_MODEL_FILE = '''from torchvision.models.resnet import {block}, ResNet


class StockResNet(ResNet):
    def __init__(self):
        super().__init__({block}, {layers}, num_classes={num_classes})
'''


_CAPTUM_STUB = '''"""Stand-in for captum.attr (not installed): TorchServe's VisionHandler imports IntegratedGradients
for explanations only; the bench asks for predictions alone."""


class IntegratedGradients:
    def __init__(self, *args, **kwargs):
        pass

    def attribute(self, *args, **kwargs):
        raise NotImplementedError("captum is not installed: explanations are not served in the bench")
'''


def stub_path(out: Path) -> Path:
    """A folder to put on the worker's PYTHONPATH: a captum stand-in, unless the real one is installed."""
    stub = out / "stub"
    (stub / "captum" / "attr").mkdir(parents=True, exist_ok=True)
    (stub / "captum" / "__init__.py").write_text("")
    (stub / "captum" / "attr" / "__init__.py").write_text(_CAPTUM_STUB)
    return stub


def worker_env(out: Path) -> dict:
    """Environment for the TorchServe serving the stock archive."""
    import importlib.util

    if importlib.util.find_spec("captum") is not None:
        return {}
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(stub_path(out)), os.environ.get("PYTHONPATH")]))}


def make_stock_archive(archive: Path, out: Path) -> Path:
    """out/model_store/refund_stock.mar, built from `archive`'s weights and class names."""
    with zipfile.ZipFile(archive) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        meta = json.loads(z.read("model_meta.json"))
        weights = z.read(manifest["serializedFile"])
        index_to_name = z.read("index_to_name.json")
    arch = meta.get("arch")
    resnet = stock_resnet(arch)
    if resnet is None:
        usable = [a for a in [*_RESNETS, *RESNET_SHAPES] if stock_resnet(a)]
        raise SystemExit(f"bench.stock: the stock handler's model file is a torchvision ResNet; the archive's arch is "
                         f"{arch!r}; use one of: {', '.join(usable)}")
    block, layers = resnet
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    num_classes = len(json.loads(index_to_name))
    (src / "model.py").write_text(_MODEL_FILE.format(block=block, layers=layers, num_classes=num_classes))
    (src / "weights.pt").write_bytes(weights)
    (src / "index_to_name.json").write_bytes(index_to_name)
    store = out / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", STOCK_MODEL, "--version", "1.0", "--model-file", str(src / "model.py"),
           "--serialized-file", str(src / "weights.pt"), "--handler", "image_classifier",
           "--extra-files", str(src / "index_to_name.json"), "--export-path", str(store), "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=common.private_tmp_env(store))
    mar = store / f"{STOCK_MODEL}.mar"
    if result.returncode != 0 or not mar.is_file():
        raise SystemExit(f"bench.stock: torch-model-archiver failed ({result.returncode}):\n{result.stderr or result.stdout}")
    return mar
