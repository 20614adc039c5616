"""TorchServe handler for the refund classifier.

Thin: TorchServe wants exactly one class in this module, so the logic lives in plain
functions in refund_inference.py and refund_preprocess.py.
"""
from __future__ import annotations

import logging
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside a model archive every file sits flat in the model dir
    from refund_inference import Prepared, error_response, error_status, format_prediction, load_meta, prepare_batch
    from refund_model import build_model
    from refund_preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, normalize
except ImportError:  # in the repository, as the `handler` package
    from handler.refund_inference import Prepared, error_response, error_status, format_prediction, load_meta, prepare_batch
    from handler.refund_model import build_model
    from handler.refund_preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, normalize

logger = logging.getLogger(__name__)


class RefundClassifierHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        model_dir = props.get("model_dir")
        manifest = context.manifest["model"]
        self.model_name = manifest.get("modelName", "refund_classifier")
        self.model_version = str(manifest.get("modelVersion", "unknown"))
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        self.meta, self.classes = load_meta(model_dir)

        self.image_size = tuple(self.meta["image_size"])
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.review_threshold = float(settings.get("review_threshold", self.meta.get("review_threshold", 0.5)))
        self.topk = int(settings.get("topk", 5))
        self.max_pixels = int(settings.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.max_bytes = int(settings.get("max_bytes", DEFAULT_MAX_BYTES))

        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        model = build_model(self.meta["arch"], len(self.classes))
        state = torch.load(os.path.join(model_dir, manifest["serializedFile"]), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        self.initialized = True
        logger.info(
            "loaded %s v%s: arch=%s classes=%d image_size=%s device=%s",
            self.model_name, self.model_version, self.meta["arch"], len(self.classes), self.image_size, self.device,
        )

    def preprocess(self, data):
        return prepare_batch(data, self.image_size, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def inference(self, prepared: Prepared, *args, **kwargs):
        if prepared.batch is None:
            return prepared, None
        with torch.inference_mode():
            x = normalize(prepared.batch, mean=self.mean, std=self.std).to(self.device)  # (G, 3, H, W)
            logits = self.model(x).float()
            probs = torch.softmax(logits / self.temperature, dim=1).cpu()
        return prepared, probs

    def postprocess(self, data):
        prepared, probs = data
        out: list[dict] = [None] * prepared.size  # type: ignore[list-item]
        for row, i in enumerate(prepared.good):
            out[i] = format_prediction(
                probs[row], self.classes, topk=self.topk, review_threshold=self.review_threshold,
                model=self.model_name, version=self.model_version,
            )
        for i, exc in prepared.errors.items():
            out[i] = error_response(exc, model=self.model_name, version=self.model_version)
            self.context.set_response_status(code=error_status(exc), phrase=exc.code, idx=i)
        return out
