"""INT8 at export time: post-training static quantization of a trained model for the handler.

    entry, model = build_int8(ckpt, state_dict, image_size=..., fp32_calibration=...)  # training.export
    save_int8(model, "weights_int8.pt")   # the archive carries it; the handler only loads it (load_int8)

The method is PyTorch's eager-mode post-training quantization for the x86 backend (fbgemm/oneDNN
kernels, no compiler at serving time): the architecture's quantizable form (torchvision's
`torchvision.models.quantization` ResNets etc.; for our ResNet shapes (handler.refund_model
RESNET_SHAPES) the same shape built of torchvision's quantizable blocks; `QuantizableTinyNet`
for the test model) with
the weights loaded, conv + bn (+ relu) fused, observers fitted on a few hundred training photos,
then converted to int8 modules. Activations are quint8 over the full 8 bits (0..255), weights
qint8 per output channel, symmetric. `get_default_qconfig("x86")` keeps activations to 7 bits
because CPUs without VNNI saturate on 8-bit products; with VNNI they do not, and the 8th bit
matters: on a real run's val split, top-1 agreement with fp32 rose from 0.977 to 0.990. So the
archive records that its int8 model needs VNNI (`requires`), and the handler serves it only on a
CPU that has it (handler.refund_inference.int8_unavailable), falling back to bf16/fp32 elsewhere.

Why this path: in torch 2.14 it is the only int8 path that runs on a CPU without a compiler.
PT2E (prepare_pt2e / X86InductorQuantizer) moved to torchao, which is not installed; and an
exported (torch.export) graph cannot hold the eager int8 modules' packed weights. Both eager
quantization and TorchScript, which stores the converted model so that the handler loads it
without quantizing, are deprecated in this torch, without a maintained replacement short of
torchao: `quietly()` (handler.refund_model.int8_deprecations_silenced) silences exactly those
deprecation notices around the calls that raise them, and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.ao.quantization import DeQuantStub, HistogramObserver, PerChannelMinMaxObserver, QConfig, QuantStub
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableBottleneck, QuantizableResNet

from handler.refund_model import INT8_BACKEND as BACKEND
from handler.refund_model import RESNET_SHAPES, ResNetShape, TinyNet, int8_backend_available, shape_resnet
from handler.refund_model import int8_deprecations_silenced as quietly
from handler.refund_inference import (INT8_TIMING_ONLY, SERVED_CALIBRATION, calibrated_probs, calibration, class_bias,
                                      confidence_fit, label_bias, served_answers)
from handler.refund_preprocess import normalize
from training import prepare as prepare_mod
from training.checkpoint import model_from
from training.engine import load_images, predict
from training.evaluate import fit_served, review_threshold, served_rule, train_log_prior

METHOD = ("eager post-training static quantization (torch.ao.quantization), x86 backend: fused conv+bn+relu, "
          "quint8 activations over 8 bits (HistogramObserver), qint8 per-channel symmetric weights; stored as TorchScript")
# 8-bit activations saturate on x86 CPUs without VNNI: the handler serves the model only where the CPU has it.
REQUIRES = "vnni"


class Int8Error(RuntimeError):
    pass


class QuantizableTinyNet(TinyNet):
    """TinyNet with the quantize/dequantize stubs and fusion eager quantization needs; same state_dict keys."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.quant, self.dequant = QuantStub(), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.dequant(self.fc(torch.flatten(self.features(self.quant(x)), 1)))

    def fuse_model(self, is_qat: bool = False) -> None:
        torch.ao.quantization.fuse_modules(self.features, [["0", "1", "2"], ["3", "4", "5"]], inplace=True)


class QuantizableShapedResNet(QuantizableResNet):
    """torchvision's quantizable ResNet that also fuses the deep stem (conv1 a Sequential of three
    convs, the last one's BN and ReLU still bn1 and relu)."""

    def fuse_model(self, is_qat: bool | None = None) -> None:
        if not isinstance(self.conv1, nn.Sequential):
            return super().fuse_model(is_qat)
        torch.ao.quantization.fuse_modules(self, [["conv1.0", "conv1.1", "conv1.2"], ["conv1.3", "conv1.4", "conv1.5"],
                                                  ["conv1.6", "bn1", "relu"]], inplace=True)
        for m in self.modules():
            if isinstance(m, (QuantizableBasicBlock, QuantizableBottleneck)):
                m.fuse_model(is_qat)


def quantizable_shape(shape: ResNetShape, num_classes: int) -> nn.Module:
    """A ResNet shape of handler.refund_model in quantizable form: same state_dict keys."""
    block = QuantizableBasicBlock if shape.block == "basic" else QuantizableBottleneck
    return shape_resnet(shape, num_classes, resnet_class=QuantizableShapedResNet, block_class=block)


def quantizable_archs() -> list[str]:
    """The archs with an int8 form: TinyNet, our ResNet shapes and torchvision's quantizable ones
    (registered as quantized_<arch>)."""
    names = {n.removeprefix("quantized_") for n in torchvision.models.list_models(module=torchvision.models.quantization)}
    return ["tinynet"] + sorted(RESNET_SHAPES) + sorted(names - set(RESNET_SHAPES))


def quantizable_model(arch: str, num_classes: int, state: dict) -> nn.Module:
    """The float model in its quantizable form with `state` loaded, fused, in eval mode."""
    if arch == "tinynet":
        model = QuantizableTinyNet(num_classes)
    elif arch in RESNET_SHAPES:
        model = quantizable_shape(RESNET_SHAPES[arch], num_classes)
    elif arch in quantizable_archs():
        model = torchvision.models.get_model(f"quantized_{arch}", weights=None, quantize=False, num_classes=num_classes)
    else:
        raise Int8Error(f"no quantizable form of arch {arch!r}; int8 exists for: {', '.join(quantizable_archs())}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise Int8Error(f"the {arch} weights do not fit its quantizable form: {exc}") from exc
    model.eval()
    model.fuse_model(is_qat=False)
    return model


def qconfig() -> QConfig:
    """get_default_qconfig("x86") with activations over all 8 bits (0..255): served on VNNI CPUs only."""
    return QConfig(activation=HistogramObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255),
                   weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))


def quantize_int8(arch: str, num_classes: int, state: dict, batches) -> torch.jit.ScriptModule:
    """The int8 model as a TorchScript program; `batches`: normalized float (B, 3, H, W) calibration inputs."""
    if not int8_backend_available():
        raise Int8Error(f"this torch has no {BACKEND} quantized engine (it has: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = BACKEND
    model = quantizable_model(arch, num_classes, state)
    model.qconfig = qconfig()
    with quietly():
        torch.ao.quantization.prepare(model, inplace=True)
        seen = 0
        with torch.inference_mode():
            for x in batches:
                model(x)
                seen += len(x)
        if not seen:
            raise Int8Error("no calibration images")
        torch.ao.quantization.convert(model, inplace=True)
        return torch.jit.script(model)


def build_int8_for_timing(ckpt: dict, state: dict, *, image_size, fp32_calibration: dict, batches: int = 4,
                          batch_size: int = 16, seed: int = 0) -> tuple[dict, torch.jit.ScriptModule]:
    """-> (the "int8" entry, the int8 program) of a model that has no data to calibrate or gate on
    (the benchmarks' untrained archive): observers fitted on seeded random inputs, no gate, the
    fp32 calibration copied. Its status `timing-only` says so; the handler serves it with a warning."""
    arch, num_classes = ckpt["model_config"]["arch"], ckpt["model_config"]["num_classes"]
    if arch not in quantizable_archs():
        raise Int8Error(f"no quantizable form of arch {arch!r}; int8 exists for: {', '.join(quantizable_archs())}")
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch_size, 3, *image_size, generator=g) for _ in range(batches)]  # (B, 3, H, W), normalized
    entry = {"status": INT8_TIMING_ONLY, "file": FILE, "method": METHOD, "backend": BACKEND, "requires": REQUIRES,
             "reason": "built for timing: calibrated on random inputs, never gated on data",
             "calibration_images": batches * batch_size, "calibration_source": "random normal inputs",
             **{k: fp32_calibration[k] for k in SERVED_CALIBRATION if k in fp32_calibration}}
    return entry, quantize_int8(arch, num_classes, state, inputs)


def save_int8(model: torch.jit.ScriptModule, path) -> None:
    with quietly():
        torch.jit.save(model, str(path))


# -- the archive's int8 model and its gate ---------------------------------------------------------

FILE = "weights_int8.pt"


@dataclass(frozen=True)
class Gate:
    """What int8 must keep of fp32 on the validation split for the archive to serve it: top-1
    agreement of the served answers, and no more than these drops (absolute) in top-1 and in the
    coverage at 98 % precision, the latter averaged over `coverage_resamples` paired resamples of
    val (`coverage_drop`). A gain is no reason to refuse, so the drops are one-sided."""

    min_agreement: float = 0.99
    max_top1_drop: float = 0.003
    max_coverage_drop: float = 0.01
    coverage_resamples: int = 200


def calibration_records(prepared: Path, n: int) -> tuple[list, str]:
    """Up to n training photos spread evenly over train.csv (sorted by class, so every class is
    represented) and the out-of-category outside-train.csv, in proportion: what the observers see."""
    records = prepare_mod.read_manifest(prepared / "train.csv")
    outside = prepared / "outside-train.csv"
    if outside.is_file():
        records = records + prepare_mod.read_manifest(outside)
    records = [r for r in records if Path(r.path).is_file()]
    k = min(n, len(records))
    picked = [records[i * len(records) // k] for i in range(k)] if k else []
    return picked, f"{prepared / 'train.csv'}" + (f" + {outside.name}" if outside.is_file() else "")


def coverage_drop(conf32, correct32, conf8, correct8, *, resamples: int, seed: int = 0) -> float:
    """fp32's coverage at 98 % precision minus int8's, each with its own threshold, averaged over
    `resamples` bootstrap resamples of the photos (the same photos for both; seeded, so an export
    is reproducible); 0 resamples: on the photos as they are.

    On one sample the figure is jumpy: the threshold sits where the running precision last crosses
    98 %, and a few answers near it move that crossing by points. On real runs' val splits the
    one-sample drop had a standard deviation of 0.6-1.3 points over resamples, as much as the
    gate's tolerance, and refused an int8 model whose mean drop was 0.4 points (1.2 on the sample
    itself). On synthetic pairs of equally good rankers, averaging over resamples (bagging) cut
    that spread by half (1.0-1.4 points to 0.4-0.7)."""
    def drop(i) -> float:  # i: the photos, as an index
        return review_threshold(conf32[i], correct32[i])["coverage"] - review_threshold(conf8[i], correct8[i])["coverage"]

    n = len(conf32)
    if resamples < 1 or n == 0:
        return drop(slice(None))
    g = torch.Generator().manual_seed(seed)
    return sum(drop(torch.randint(0, n, (n,), generator=g)) for _ in range(resamples)) / resamples


def gate_figures(logits32, out32, logits8, out8, y, *, fp32_calibration: dict, int8_calibration: dict,
                 coverage_resamples: int = Gate.coverage_resamples) -> dict:
    """fp32 (with the archive's calibration) against int8 (with its own) on val: agreement of the
    served answers over every val photo (out-of-category ones too), top-1 and coverage at 98 %
    precision over the in-category ones, each precision's threshold fitted for that coverage, and
    the coverage's drop averaged over paired resamples (`coverage_drop`)."""
    num_classes = logits32.shape[1]
    t32, _ = calibration(fp32_calibration)
    t8, _ = calibration(int8_calibration)
    p32 = calibrated_probs(torch.cat([logits32, out32]), t32, class_bias(fp32_calibration, num_classes))
    p8 = calibrated_probs(torch.cat([logits8, out8]), t8, class_bias(int8_calibration, num_classes))
    all32 = served_answers(p32, label_bias(fp32_calibration, num_classes), confidence_fit(fp32_calibration))  # as served
    all8 = served_answers(p8, label_bias(int8_calibration, num_classes), confidence_fit(int8_calibration))
    n = len(y)
    conf32, pred32 = all32[0][:n], all32[1][:n]
    conf8, pred8 = all8[0][:n], all8[1][:n]
    return {
        "images": len(p32), "in_category": n,
        "top1_agreement": float((all32[1] == all8[1]).double().mean()),
        "fp32_top1": float((pred32 == y).double().mean()), "int8_top1": float((pred8 == y).double().mean()),
        "fp32_coverage": review_threshold(conf32, pred32 == y)["coverage"],
        "int8_coverage": review_threshold(conf8, pred8 == y)["coverage"],
        "coverage_drop": coverage_drop(conf32, pred32 == y, conf8, pred8 == y, resamples=coverage_resamples),
        "max_abs_dp": float((p32 - p8).abs().max()) if len(p32) else 0.0,
    }


def gate_failures(figures: dict, gate: Gate) -> list[str]:
    failed = []
    if figures["top1_agreement"] < gate.min_agreement:
        failed.append(f"top-1 agreement with fp32 {figures['top1_agreement']:.4f} < {gate.min_agreement}")
    if figures["fp32_top1"] - figures["int8_top1"] > gate.max_top1_drop:
        failed.append(f"top-1 {figures['int8_top1']:.4f} vs fp32 {figures['fp32_top1']:.4f}: "
                      f"{figures['fp32_top1'] - figures['int8_top1']:.4f} lower (at most {gate.max_top1_drop})")
    if figures["coverage_drop"] > gate.max_coverage_drop:
        failed.append(f"coverage at 98 % precision {figures['coverage_drop']:.4f} lower than fp32's on average over "
                      f"{gate.coverage_resamples} resamples of val (at most {gate.max_coverage_drop}; on val itself "
                      f"{figures['int8_coverage']:.4f} vs fp32 {figures['fp32_coverage']:.4f})")
    return failed


def build_int8(ckpt: dict, state: dict, *, image_size, fp32_calibration: dict, calibration_images: int = 300,
               gate: Gate = Gate(), batch_size: int = 64) -> tuple[dict, torch.jit.ScriptModule | None]:
    """-> (model_meta.json's "int8" entry, the int8 program or None where it failed its gate).

    Quantized on `calibration_images` photos of the run's train split; then temperature, class
    bias and review threshold fitted on the int8 model's own validation outputs (as
    training.evaluate fits fp32's) under fp32's served rule (its label adjustment and confidence
    score), and the gate measured there against fp32."""
    arch, num_classes = ckpt["model_config"]["arch"], ckpt["model_config"]["num_classes"]
    if arch not in quantizable_archs():
        raise Int8Error(f"no quantizable form of arch {arch!r}; int8 exists for: {', '.join(quantizable_archs())}")
    if not ckpt.get("data_dir"):
        raise Int8Error("the run records no prepared data (train.csv, val.csv): int8 needs train photos to "
                        "calibrate on and the val split for its gate")
    prepared = Path(ckpt["data_dir"])
    for name in ("train.csv", "val.csv"):
        if not (prepared / name).is_file():
            raise Int8Error(f"the run's prepared {name} ({prepared / name}) is gone: int8 needs train photos to "
                            "calibrate on and the val split for its gate")
    mean, std = tuple(ckpt["preprocess"]["mean"]), tuple(ckpt["preprocess"]["std"])
    image_size = tuple(image_size)
    records, source = calibration_records(prepared, calibration_images)
    calib = load_images(records, image_size, desc="decode int8 calibration")
    batches = (normalize(calib[i:i + batch_size], mean=mean, std=std) for i in range(0, len(calib), batch_size))
    int8 = quantize_int8(arch, num_classes, state, batches)

    fp32 = model_from(ckpt["model_config"], state).to(memory_format=torch.channels_last)
    to_index = {c: i for i, c in enumerate(ckpt["classes"])}
    val = prepare_mod.read_manifest(prepared / "val.csv")
    y = torch.tensor([to_index[r.label] for r in val])
    outside_csv = prepared / "outside-val.csv"
    outside = prepare_mod.read_manifest(outside_csv) if outside_csv.is_file() else []
    x_val = load_images(val, image_size, desc="decode val")
    x_out = load_images(outside, image_size, desc="decode outside val") if outside else None
    infer = dict(batch_size=batch_size, device=torch.device("cpu"), amp=False, mean=mean, std=std)

    def logits_of(model):
        empty = torch.empty(0, num_classes)
        with torch.no_grad():  # not inference_mode: the calibration fit differentiates through these logits
            return predict(model, x_val, **infer), (predict(model, x_out, **infer) if x_out is not None else empty)

    logits32, out32 = logits_of(fp32)
    with quietly():
        logits8, out8 = logits_of(int8)
    fit = fit_served(logits8, y, out8, ckpt["classes"], train_log_prior(ckpt, prepared), rule=served_rule(fp32_calibration))
    served = {k: fit[k] for k in SERVED_CALIBRATION if k in fit}
    figures = gate_figures(logits32, out32, logits8, out8, y, fp32_calibration=fp32_calibration, int8_calibration=served,
                           coverage_resamples=gate.coverage_resamples)
    failed = gate_failures(figures, gate)
    entry = {
        "status": "failed" if failed else "passed",
        **({"reason": "; ".join(failed)} if failed else {"file": FILE}),
        "method": METHOD, "backend": BACKEND, "requires": REQUIRES,
        "calibration_images": len(records), "calibration_source": source,
        **served,
        "gate": {"split": "val", **figures, **asdict(gate)},
    }
    return entry, (None if failed else int8)
