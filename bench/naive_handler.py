"""The naive baseline's TorchServe handler: how the original project served the model.

One image per request (batchSize 1), PIL decode, torchvision Resize to 224x224, fp32, torch.no_grad(),
contiguous memory format. Deliberately not the project's handler: the baseline must stay naive
whatever the production handler learns. Module-level `handle`, TorchServe's plain entry point.
"""
import io
import json
import os

import torch
from PIL import Image
from refund_model import build_model  # the network's definition, shipped beside this file (not the handler)
from torchvision import transforms

_state = {}


def _initialize(context) -> None:
    model_dir = context.system_properties["model_dir"]
    with open(os.path.join(model_dir, "naive_meta.json")) as f:
        meta = json.load(f)
    model = build_model(meta["arch"], len(meta["classes"]))
    serialized = context.manifest["model"]["serializedFile"]
    model.load_state_dict(torch.load(os.path.join(model_dir, serialized), map_location="cpu", weights_only=True))
    _state["model"] = model.eval()
    _state["classes"] = meta["classes"]
    _state["transform"] = transforms.Compose([
        transforms.Resize(tuple(meta["image_size"])),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def handle(data, context):
    if "model" not in _state:
        _initialize(context)
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("data") or row.get("body")
        x = _state["transform"](Image.open(io.BytesIO(body)).convert("RGB")).unsqueeze(0)  # (1, 3, 224, 224)
        with torch.no_grad():
            probs = torch.softmax(_state["model"](x), dim=1)[0]
        p, idx = probs.topk(5)
        top = [{"label": _state["classes"][j], "p": float(q)} for q, j in zip(p.tolist(), idx.tolist())]
        out.append({"label": top[0]["label"], "confidence": top[0]["p"], "topk": top})
    return out
