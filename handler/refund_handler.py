"""TorchServe handler for the refund classifier.

Thin: TorchServe wants exactly one class in this module, so the logic lives in plain
functions in refund_inference.py and refund_preprocess.py.

A request carries one photo or several (refund_requests.py): TorchServe batches requests, so
preprocess lays the batch out as photos and postprocess folds their answers back, one per request.

Handler settings come from the `handler:` section of the archive's model-config.yaml
(precision, threads, topk, max_pixels, max_bytes, max_photos, decode_timeout); calibration (temperature, per-class
logit bias, label bias, confidence fit, review_threshold) comes from model_meta.json, written by training.export: its top
level for fp32/bf16, its `int8` entry for the int8 model the archive may carry (weights_int8.pt,
quantized and gated at export; loaded here as it is).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside a model archive every file sits flat in the model dir
    from refund_inference import (DEFAULT_DECODE_TIMEOUT_S, calibrated_probs, calibration, class_bias, confidence_fit,
                                  error_response, format_prediction, keep_freed_memory, label_bias, load_meta,
                                  reject_counts, served_answers, served_precision, threads_per_worker)
    from refund_model import build_model, cpu_supports_bf16, cpu_supports_vnni, int8_backend_available, load_int8
    from refund_preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, normalize
    from refund_requests import DEFAULT_MAX_PHOTOS, Expanded, fold_answers, prepare_requests, request_errors
except ImportError:  # in the repository, as the `handler` package
    from handler.refund_inference import (DEFAULT_DECODE_TIMEOUT_S, calibrated_probs, calibration, class_bias,
                                          confidence_fit, error_response, format_prediction, keep_freed_memory,
                                          label_bias, load_meta, reject_counts, served_answers, served_precision,
                                          threads_per_worker)
    from handler.refund_model import build_model, cpu_supports_bf16, cpu_supports_vnni, int8_backend_available, load_int8
    from handler.refund_preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, normalize
    from handler.refund_requests import DEFAULT_MAX_PHOTOS, Expanded, fold_answers, prepare_requests, request_errors

logger = logging.getLogger(__name__)

# The handler's own metrics (TorchServe adds the ModelName, Level and Hostname labels).
# Seconds, so that Prometheus' default histogram buckets (5 ms .. 10 s) fit.
METRIC_IMAGES = "refund_images_total"
METRIC_REJECTS = "refund_rejects_total"  # label Reason = the error code
METRIC_BATCH_SIZE = "refund_batch_size"
METRIC_PREPROCESS = "refund_preprocess_seconds"
METRIC_INFERENCE = "refund_inference_seconds"
# Where a batch's time goes inside the worker, one histogram with label Stage (bench/serving.py
# reads it): decode (read + decode + resize every photo), assemble (stack, normalize, layout),
# forward (the model and the calibrated softmax), response (answers built and folded per request).
METRIC_STAGE = "refund_stage_seconds"
STAGES = ("decode", "assemble", "forward", "response")


def emit(metrics, name: str, value: float, unit: str, kind: str, **labels: str) -> None:
    """One handler metric through TorchServe's metrics cache (0.8+); skipped on the legacy store."""
    if not hasattr(metrics, "add_metric_to_cache"):  # the legacy MetricsStore cannot carry a type
        metrics.add_metric(name, value, unit)
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    dims = [Dimension(k, v) for k, v in labels.items()]  # a fresh list: the cache appends to it
    metrics.add_metric(name, value, unit, dimensions=dims, metric_type=MetricTypes[kind.upper()])


class RefundClassifierHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        model_dir = props.get("model_dir")
        manifest = context.manifest["model"]
        self.model_name = manifest.get("modelName", "refund_classifier")
        self.model_version = str(manifest.get("modelVersion", "unknown"))
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        settings = yaml_config.get("handler", {}) or {}
        self.meta, self.classes = load_meta(model_dir)

        self.image_size = tuple(self.meta["image_size"])
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.temperature, self.review_threshold = calibration(self.meta)
        bias, labels_bias = class_bias(self.meta, len(self.classes)), label_bias(self.meta, len(self.classes))
        margin_fit = confidence_fit(self.meta)
        self.topk = int(settings.get("topk", 5))
        self.max_pixels = int(settings.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.max_bytes = int(settings.get("max_bytes", DEFAULT_MAX_BYTES))
        self.max_photos = int(settings.get("max_photos", DEFAULT_MAX_PHOTOS))
        self.decode_timeout_s = float(settings.get("decode_timeout", DEFAULT_DECODE_TIMEOUT_S))

        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
            bf16_native = torch.cuda.is_bf16_supported()
        else:
            self.device = torch.device("cpu")
            bf16_native = cpu_supports_bf16()
            # TorchServe starts one process per worker; each gets cores // workers threads.
            cores = len(os.sched_getaffinity(0))
            workers = int(yaml_config.get("maxWorkers", yaml_config.get("minWorkers", 1)))
            torch.set_num_threads(threads_per_worker(settings.get("threads", "auto"), cores=cores, workers=workers))
        # This process is the worker's own: its batches' buffers stay allocated between batches.
        self.memory_kept = keep_freed_memory()
        setting = str(settings.get("precision", "auto"))
        self.precision, bf16_reason, int8_reason = served_precision(
            setting, self.meta, device_type=self.device.type, bf16_native=bf16_native,
            int8_backend=int8_backend_available(), vnni=cpu_supports_vnni())
        if bf16_reason:  # the agreement gate: bf16 only where it passed
            logger.warning("precision %s: not bf16, %s", setting, bf16_reason)
        if self.precision == "int8":
            int8 = self.meta["int8"]  # its own calibration, fitted on its own validation outputs
            if int8.get("status") != "passed":
                logger.warning("precision int8: %s (%s): for benchmarks, not for answers", int8["status"], int8.get("reason"))
            self.temperature, self.review_threshold = calibration(int8)
            bias, labels_bias = class_bias(int8, len(self.classes)), label_bias(int8, len(self.classes))
            margin_fit = confidence_fit(int8)
            self.model = load_int8(os.path.join(model_dir, int8["file"]), torch.zeros(1, 3, *self.image_size))
        else:
            if int8_reason and setting in ("auto", "int8"):
                failed = (self.meta.get("int8") or {}).get("status") == "failed"
                (logger.warning if setting == "int8" or failed else logger.info)(
                    "precision %s: not int8, %s: serving %s", setting, int8_reason, self.precision)
            model = build_model(self.meta["arch"], len(self.classes))
            state = torch.load(os.path.join(model_dir, manifest["serializedFile"]), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            # channels_last: oneDNN's fast convolution layout (and the layout training used).
            self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.class_bias = None if bias is None else bias.to(self.device)  # once, not per batch
        self.label_bias = labels_bias  # applied to the probabilities on the CPU
        self.confidence_fit = margin_fit
        self.initialized = True
        served = self.meta["int8"] if self.precision == "int8" else self.meta  # whose calibration is applied
        logger.info(
            "loaded %s v%s: arch=%s classes=%d image_size=%s device=%s precision=%s threads=%d keep_freed_memory=%s "
            "temperature=%.4g review_threshold=%.4g class_bias=%s label_bias=%s confidence=%s",
            self.model_name, self.model_version, self.meta["arch"], len(self.classes), self.image_size, self.device,
            self.precision, torch.get_num_threads(), self.memory_kept, self.temperature, self.review_threshold,
            "none" if self.class_bias is None else f"prior weight {served.get('prior_weight', '?')}",
            "none" if self.label_bias is None else f"tau {served.get('label_adjustment', '?')}",
            "probability" if margin_fit is None else f"margin (slope {margin_fit.slope:.4g}, intercept {margin_fit.intercept:.4g})",
        )

    def autocast(self):
        """bf16 autocast, as training.train.evaluate uses it: weights stay fp32, matmuls/convs run in bf16."""
        if self.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def preprocess(self, data):
        started = time.perf_counter()
        expanded = prepare_requests(data, self.image_size, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                    max_photos=self.max_photos, decode_timeout_s=self.decode_timeout_s)
        prepared = expanded.images
        metrics = self.context.metrics
        emit(metrics, METRIC_IMAGES, prepared.size, "count", "counter")
        emit(metrics, METRIC_BATCH_SIZE, prepared.size, "count", "histogram")
        rejects = reject_counts(prepared)
        for exc in request_errors(expanded):  # a malformed request counts once, under its own code
            rejects[exc.code] = rejects.get(exc.code, 0) + 1
        for code, n in rejects.items():
            emit(metrics, METRIC_REJECTS, n, "count", "counter", Reason=code)
        emit(metrics, METRIC_PREPROCESS, time.perf_counter() - started, "seconds", "histogram")
        emit(metrics, METRIC_STAGE, prepared.decode_s, "seconds", "histogram", Stage="decode")
        logger.info("batch of %d: %d rejected %s(%d requests)", prepared.size, len(prepared.errors),
                    f"{rejects} " if rejects else "", len(data))
        return expanded

    def inference(self, expanded: Expanded, *args, **kwargs):
        prepared = expanded.images
        if prepared.batch is None:
            return expanded, None
        metrics = self.context.metrics
        started = time.perf_counter()
        with torch.inference_mode():
            x = normalize(prepared.batch, mean=self.mean, std=self.std)  # (G, 3, H, W)
            # channels_last: oneDNN's convolution layout, and fbgemm's for int8 (faster there too, measured)
            x = x.to(self.device, memory_format=torch.channels_last)
            assembled = time.perf_counter()
            with self.autocast():
                logits = self.model(x)
            probs = calibrated_probs(logits, self.temperature, self.class_bias).cpu()  # (G, num_classes)
        done = time.perf_counter()
        emit(metrics, METRIC_INFERENCE, done - started, "seconds", "histogram")
        emit(metrics, METRIC_STAGE, prepared.assemble_s + assembled - started, "seconds", "histogram", Stage="assemble")
        emit(metrics, METRIC_STAGE, done - assembled, "seconds", "histogram", Stage="forward")
        return expanded, probs

    def postprocess(self, data):
        started = time.perf_counter()
        expanded, probs = data
        prepared = expanded.images
        answers: list[dict] = [None] * prepared.size  # type: ignore[list-item]  # one per photo
        confidences, labels = ([], []) if probs is None else \
            (t.tolist() for t in served_answers(probs, self.label_bias, self.confidence_fit))
        for row, i in enumerate(prepared.good):
            answers[i] = format_prediction(
                probs[row], self.classes, topk=self.topk, review_threshold=self.review_threshold,
                model=self.model_name, version=self.model_version, label=labels[row], confidence=confidences[row],
            )
        for i, exc in prepared.errors.items():
            answers[i] = error_response(exc, model=self.model_name, version=self.model_version)
        out = []  # one per request
        for idx, (response, status) in enumerate(fold_answers(expanded, answers, model=self.model_name,
                                                              version=self.model_version)):
            if status != 200:
                self.context.set_response_status(code=status, phrase=response["code"], idx=idx)
            out.append(response)
        emit(self.context.metrics, METRIC_STAGE, time.perf_counter() - started, "seconds", "histogram", Stage="response")
        return out
