"""The handler's model-independent logic, as plain functions unit tests call without a server.

One bad photo never fails the rest of its batch: `prepare_batch` sets it aside with its
ImageError, and `error_response` / `error_status` turn that into its own 4xx answer.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

try:  # inside a model archive every file sits flat in the model dir
    from refund_preprocess import ImageError, load_for_model
except ImportError:  # in the repository, as the `handler` package
    from handler.refund_preprocess import ImageError, load_for_model

META_FILE = "model_meta.json"
INDEX_TO_NAME_FILE = "index_to_name.json"
# The class a model learns from catalogue photos outside the refund categories (training.train
# --other class): its answer is "not a refund category". The one definition training and the
# handler share; serving.archive.OTHER_LABEL repeats it for the torch-free side.
OTHER_LABEL = "other"
# Keys under which a multipart form or a JSON body may carry the image.
PAYLOAD_KEYS = ("data", "body", "file", "image", "b64")


def extract_payload(request: dict) -> bytes:
    """One TorchServe request row -> the image bytes.

    TorchServe hands a raw body over as {"body": bytearray}, a multipart form as one key per
    field, a JSON body as a dict and a text/plain body as str. Text, and bytes that are
    entirely base64 characters (no image format starts that way), are base64-decoded.
    """
    value = None
    for key in PAYLOAD_KEYS:
        if request.get(key) is not None:
            value = request[key]
            break
    if value is None and len(request) == 1:  # a multipart form with one field of any name
        value = next(iter(request.values()))
    if value is None:
        raise ImageError("no_image", f"the request carries no image; send the bytes as the body or as one of the fields {', '.join(PAYLOAD_KEYS)}")
    if isinstance(value, dict):  # JSON body: {"b64": "..."} or {"image": "..."}
        for key in PAYLOAD_KEYS:
            if isinstance(value.get(key), str):
                return _b64decode(value[key])
        raise ImageError("no_image", f"the JSON body has none of the fields {', '.join(PAYLOAD_KEYS)} as a base64 string")
    if isinstance(value, str):
        return _b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if value and _B64_BYTES.fullmatch(value):
            try:
                return _b64decode(value.decode("ascii"))
            except ImageError:
                pass  # plain ASCII that is not base64 either: let the decoder name it
        return value
    raise ImageError("no_image", f"unsupported payload type {type(value).__name__}")


# Base64 text sent as a raw body (no Content-Type): only the base64 alphabet, or a data URL.
_B64_BYTES = re.compile(rb"(data:[\w/+.-]+;base64,)?[A-Za-z0-9+/=\s]+")


def _b64decode(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_base64", f"the text payload is not valid base64: {exc}") from exc


@dataclass
class Prepared:
    """A batch with its bad rows set aside: `batch` holds the good rows in order. `decode_s`: seconds
    spent reading and decoding the photos; `assemble_s`: stacking them into `batch`."""

    batch: torch.Tensor | None  # uint8 (G, 3, H, W), channels_last
    good: list[int] = field(default_factory=list)
    errors: dict[int, ImageError] = field(default_factory=dict)
    size: int = 0
    decode_s: float = 0.0
    assemble_s: float = 0.0


# Seconds one photo's decode (and resize) may take before it is answered `decode_timeout`.
DEFAULT_DECODE_TIMEOUT_S = 10.0


class _Expired(BaseException):  # not Exception: the decoder's "except Exception" must not take it for a corrupt image
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise _Expired in the block after `seconds` of wall time, by SIGALRM: in the process's main
    thread only (where TorchServe's worker calls the handler); elsewhere, or with None, no limit.
    PIL decodes in a Python loop over the file's chunks, so the alarm stops a slow decode between two."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _Expired()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def prepare_batch(requests: list[dict], image_size: tuple[int, int], *, max_pixels: int, max_bytes: int,
                  decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S) -> Prepared:
    """Each request's photo decoded and resized; a photo that fails (ImageError) or takes longer
    than decode_timeout_s (code decode_timeout) is set aside with its error, the rest go on."""
    tensors, good, errors = [], [], {}
    started = time.perf_counter()
    for i, request in enumerate(requests):
        try:
            try:
                with time_limit(decode_timeout_s):
                    tensor = load_for_model(extract_payload(request), image_size, max_pixels=max_pixels, max_bytes=max_bytes)
            except _Expired:
                raise ImageError("decode_timeout", f"decoding this photo took longer than {decode_timeout_s:g}s") from None
            tensors.append(tensor)
            good.append(i)
        except ImageError as exc:
            errors[i] = exc
    decoded = time.perf_counter()
    # Stacked in the pixels' own (H, W, 3) order, so the batch is channels_last, the model's layout,
    # without a transposing copy here or a second one after normalizing.
    batch = torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2) if tensors else None
    return Prepared(batch=batch, good=good, errors=errors, size=len(requests),
                    decode_s=decoded - started, assemble_s=time.perf_counter() - decoded)


def format_prediction(
    probs: torch.Tensor, classes: list[str], *, topk: int, review_threshold: float, model: str, version: str,
    label: int | None = None, confidence: float | None = None,
) -> dict:
    """probs: (num_classes,) calibrated probabilities for one image; label: the answer's class
    index where it is chosen with a label bias (served_labels), else the most probable class.
    `topk` lists the most probable classes, so with a label bias the label may be its second.
    confidence: the answer's served confidence (served_answers) where it is not the label's
    probability (a margin fit); needs_review compares it with the threshold.

    A model with the `other` output (OTHER_LABEL among its classes) answers it like any class,
    plus `in_category`: false for "not a refund category", true otherwise. needs_review is the
    same rule for every answer: a confident "other" is answered "other", an unconfident one goes
    to review like an unconfident category. A model without that output answers as it always did
    (no `in_category`)."""
    k = min(topk, probs.numel())
    p, idx = probs.topk(k)
    top = [{"label": classes[j], "p": round(float(q), 6)} for q, j in zip(p.tolist(), idx.tolist())]
    chosen = top[0] if label is None else {"label": classes[label], "p": round(float(probs[label]), 6)}
    if confidence is not None:
        chosen = {"label": chosen["label"], "p": round(float(confidence), 6)}
    answer = {
        "label": chosen["label"],
        "confidence": chosen["p"],
        "topk": top,
        "needs_review": chosen["p"] < review_threshold,
        "model": model,
        "version": version,
    }
    if OTHER_LABEL in classes:
        answer["in_category"] = answer["label"] != OTHER_LABEL
    return answer


def error_response(exc: ImageError, *, model: str, version: str) -> dict:
    return {"error": exc.message, "code": exc.code, "model": model, "version": version}


def error_status(exc: ImageError) -> int:
    """413 for inputs over a size limit, 400 for the rest."""
    return 413 if exc.code in ("too_large", "too_many_pixels") else 400


def load_meta(model_dir: str) -> tuple[dict, list[str]]:
    with open(os.path.join(model_dir, META_FILE)) as f:
        meta = json.load(f)
    with open(os.path.join(model_dir, INDEX_TO_NAME_FILE)) as f:
        index_to_name = json.load(f)
    classes = [index_to_name[str(i)] for i in range(len(index_to_name))]
    return meta, classes


# -- settings ---------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "int8")


def resolve_precision(setting: str, *, device_type: str, bf16_native: bool, int8_ready: bool = False) -> str:
    """The archive's `precision` setting -> "int8", "bf16" or "fp32" for this device.

    auto: the fastest that the archive and the hardware allow: int8 where the archive carries an
    int8 model that passed its gate at export (CPU only: the x86 quantized kernels), else bf16
    where the hardware computes it natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32
    (emulated bf16 is slower than fp32). int8 asks for int8 and falls back as auto does without
    it; bf16 forces bf16; fp32 forbids both.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"Invalid handler precision {setting!r}; choose one of: {', '.join(PRECISIONS)}")
    if setting in ("auto", "int8"):
        if int8_ready and device_type == "cpu":
            return "int8"
        return "bf16" if bf16_native else "fp32"
    return setting


# model_meta.json's keys (top level, and under `int8` for the int8 model) that the served answer
# applies: training.evaluate fits them, training.export and training.quantize copy them.
SERVED_CALIBRATION = ("temperature", "review_threshold", "class_bias", "prior_weight", "label_bias", "label_adjustment",
                      "confidence_fit")
# int8 statuses the handler serves: a passed gate, or the benchmarks' untrained model (training.export --int8 timing).
INT8_TIMING_ONLY = "timing-only"
INT8_SERVABLE = ("passed", INT8_TIMING_ONLY)


def int8_unavailable(meta: dict, *, device_type: str, backend_available: bool, vnni: bool = True) -> str | None:
    """Why this archive cannot serve int8 here (None: it can). model_meta.json's `int8` entry is
    training.export's: status passed (with the file), failed (its gate, and the figures), unavailable
    or off; or timing-only (the benchmarks' untrained model: served, and the handler says so)."""
    info = meta.get("int8")
    if not info:
        return "the archive carries no int8 model (exported before int8 existed)"
    if info.get("status") not in INT8_SERVABLE:
        return f"int8 {info.get('status', 'missing')} at export: {info.get('reason', 'no reason recorded')}"
    if device_type != "cpu":
        return f"int8 runs on the CPU only (the x86 quantized kernels); this worker has a {device_type} device"
    if not backend_available:
        return "this torch has no x86 quantized engine"
    if info.get("requires") == "vnni" and not vnni:
        return "the int8 model uses 8-bit activations, which saturate on a CPU without VNNI; this CPU has none"
    return None


def served_precision(setting: str, meta: dict, *, device_type: str, bf16_native: bool, int8_backend: bool,
                     vnni: bool) -> tuple[str, str | None, str | None]:
    """(precision, why not bf16, why not int8): the archive's `precision` setting resolved for this
    device after both gates (int8's at export, bf16's agreement on val). The handler serves it; the
    bench names the ceiling it is compared with. A reason is None where nothing stood against it;
    the bf16 one is given only where the gate, not the hardware or the setting, ruled bf16 out."""
    bf16_reason = bf16_unavailable(meta) if bf16_native and setting in ("auto", "int8") else None
    int8_reason = int8_unavailable(meta, device_type=device_type, backend_available=int8_backend, vnni=vnni)
    precision = resolve_precision(setting, device_type=device_type, bf16_native=bf16_native and bf16_reason is None,
                                  int8_ready=int8_reason is None)
    return precision, bf16_reason, int8_reason


# bf16's bar against fp32 (bench.precision_agreement's default): top-1 agreement on val.
BF16_MIN_AGREEMENT = 0.995


def bf16_unavailable(meta: dict) -> str | None:
    """Why `auto` should not pick bf16 for this archive (None: nothing against it): the top-1
    agreement with fp32 that training.evaluate measured on val, where the CPU had bf16, and
    training.export recorded under `calibration`, below BF16_MIN_AGREEMENT."""
    agreement = (meta.get("calibration") or {}).get("val_bf16_fp32_top1_agreement")
    if agreement is not None and agreement < BF16_MIN_AGREEMENT:
        return f"bf16 agreed with fp32 on {agreement:.4f} of val top-1 answers (< {BF16_MIN_AGREEMENT})"
    return None


def threads_per_worker(setting: int | str, *, cores: int, workers: int) -> int:
    """torch intra-op threads per worker so that workers x threads = cores (at least 1)."""
    if setting in ("auto", None, 0):
        return max(1, cores // max(1, workers))
    threads = int(setting)
    if threads < 1:
        raise ValueError(f"Invalid handler threads {setting!r}; use a positive integer or 'auto'")
    return threads


# glibc's largest mmap threshold on 64-bit: blocks up to this size come from the heap.
KEEP_BLOCKS_UP_TO = 32 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what a batch frees for the next batch. Returns False where it cannot
    (a C library without mallopt).

    A forward pass allocates blocks of megabytes whose sizes change with the batch; glibc maps such
    blocks from the kernel and gives them back when they are freed (its mmap threshold adapts, and
    its heap is trimmed once more than twice that is free at the top), so the next batch faults the
    same memory in again, page by page. Measured in a TorchServe worker at 16 photos a request and
    8 in flight: 20 to 65 minor page faults an image, about 2 µs each on the 2-core machine; none with
    this, for the int8 model, whose blocks are all under 32 MiB (larger blocks are still mapped each
    time). The cost: between batches the worker holds up to its largest batch's memory, and up to
    256 MiB free at the top of its heap. Under another allocator (LD_PRELOAD jemalloc, say) this
    returns True and changes nothing."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except Exception:  # OSError, AttributeError (musl, macOS), TypeError (Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, KEEP_BLOCKS_UP_TO)) and bool(mallopt(m_trim_threshold, 8 * KEEP_BLOCKS_UP_TO))


def _per_class(meta: dict, key: str, num_classes: int) -> torch.Tensor | None:
    values = meta.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != num_classes:
        raise ValueError(f"Invalid {key} in {META_FILE}: expected a list of {num_classes} numbers, one per class")
    out = torch.tensor([float(b) for b in values])
    if not torch.isfinite(out).all():
        raise ValueError(f"Invalid {key} in {META_FILE}: every entry must be a finite number")
    return out


def class_bias(meta: dict, num_classes: int) -> torch.Tensor | None:
    """The per-class logit bias from model_meta.json (None when absent): `training.evaluate` fits
    it on validation to undo the prior shift that class-weighted training leaves in the logits."""
    return _per_class(meta, "class_bias", num_classes)


def label_bias(meta: dict, num_classes: int) -> torch.Tensor | None:
    """The per-class bias the answer's label is chosen with (model_meta.json `label_bias`, None
    when absent: the label is the most probable class). See served_labels."""
    return _per_class(meta, "label_bias", num_classes)


def served_labels(probs: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) calibrated probabilities -> (N,) the index of each answer's label.

    Without a label bias: the most probable class. With one (-tau * log class prior, fitted by
    training.evaluate): the argmax of log p + bias, logit adjustment (Menon et al. 2021, "Long-tail
    learning via logit adjustment"), which trades a little accuracy on the large classes for
    recall on the small ones. The confidence stays the calibrated probability of that label, so
    the review threshold still means "this answer is right with that probability"."""
    if bias is None:
        return probs.argmax(1)
    return (probs.clamp(min=1e-30).log() + bias.to(probs.device)).argmax(1)


@dataclass(frozen=True)
class MarginFit:
    """The answer's confidence read from its margin: sigmoid(slope * margin + intercept), the
    probability that the answer is right, fitted on validation (training.evaluate) and stored in
    model_meta.json as {"score": "margin", "slope": .., "intercept": ..} under `confidence_fit`."""
    slope: float
    intercept: float


def label_margin(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) log p(label) - log p(the most probable other class): how far the answer is ahead of
    its runner-up, in calibrated logits."""
    logp = probs.clamp(min=1e-30).log()
    runner_up = logp.scatter(1, labels[:, None], float("-inf")).max(1).values
    return logp.gather(1, labels[:, None])[:, 0] - runner_up


def confidence_fit(meta: dict) -> MarginFit | None:
    """model_meta.json's `confidence_fit` (None when absent: the confidence is the label's
    calibrated probability)."""
    fit = meta.get("confidence_fit")
    if fit is None:
        return None
    try:
        slope, intercept = float(fit["slope"]), float(fit["intercept"])
        ok = fit.get("score") == "margin" and slope > 0 and abs(intercept) < 1e6
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid confidence_fit in {META_FILE}: expected "
                         '{"score": "margin", "slope": a number > 0, "intercept": a finite number}')
    return MarginFit(slope, intercept)


def served_answers(probs: torch.Tensor, bias: torch.Tensor | None = None,
                   fit: MarginFit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, label index) of each row, as served: the label as served_labels chooses it;
    the confidence is that label's calibrated probability, or, with a margin fit, the probability
    that the answer is right given its margin over the runner-up (MarginFit).

    Why a margin: a network trained to the end with label smoothing caps its probabilities, so
    its right and wrong answers reach the same top probability and no threshold on it is 98 %
    precise; how far the runner-up trails still tells them apart. training.evaluate keeps the
    probability unless the margin answers more photos on validation photos it was not fitted on."""
    labels = served_labels(probs, bias)
    if fit is None:
        return probs.gather(1, labels[:, None])[:, 0], labels
    z = fit.slope * label_margin(probs, labels).double() + fit.intercept
    return torch.sigmoid(z).to(probs.dtype), labels


def calibrated_probs(logits: torch.Tensor, temperature: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) logits -> calibrated probabilities softmax(logits / T + bias), in float32.

    The one definition: the handler serves it, and training.evaluate fits T, the bias and the
    review threshold through it.
    """
    z = logits.float() / temperature
    if bias is not None:
        z = z + bias.to(z.device)
    return torch.softmax(z, dim=1)


def calibration(meta: dict) -> tuple[float, float]:
    """(temperature, review_threshold) from model_meta.json; 1.0 and 0.5 when absent."""
    temperature = float(meta.get("temperature", 1.0))
    threshold = float(meta.get("review_threshold", 0.5))
    if not temperature > 0:
        raise ValueError(f"Invalid temperature {temperature!r} in {META_FILE}: must be > 0")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Invalid review_threshold {threshold!r} in {META_FILE}: must be in [0, 1]")
    return temperature, threshold


def reject_counts(prepared: Prepared) -> dict[str, int]:
    """{error code: how many} for the rows of a batch set aside."""
    counts: dict[str, int] = {}
    for exc in prepared.errors.values():
        counts[exc.code] = counts.get(exc.code, 0) + 1
    return counts
