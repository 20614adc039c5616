"""Model construction shared by training and the handler: rebuilt from a plain config dict."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class TinyNet(nn.Module):
    """A few-thousand-parameter CNN for tests and smoke runs (not for production)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.fc(torch.flatten(self.features(x), 1))


# -- ResNets shaped for 80x60 photos ----------------------------------------------------------------

@dataclass(frozen=True)
class ResNetShape:
    """A torchvision ResNet with another stem, depth or width; same module names and forward.

    stem "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max-pool, 4x down (torchvision's own);
    "s2": the same conv without the max-pool, so every stage sees 2x the resolution (at 80x60 the
    last stage's grid is 5x4 instead of 3x2); "deep2": three 3x3 convs (the first stride 2) without
    the max-pool, the ResNet-C stem of Bag of Tricks (He et al. 2019) at 2x the resolution.
    widths: the four stages' planes (torchvision: 64, 128, 256, 512).
    """

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    stem: str = "imagenet"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    @property
    def block_class(self) -> type[nn.Module]:
        return BasicBlock if self.block == "basic" else Bottleneck


# Our shapes (torchvision's own resnet18/50 stay available under their names). resnet34 is
# torchvision's network rebuilt here, the same modules and keys: torchvision has no quantizable form of it.
RESNET_SHAPES = {
    "resnet26": ResNetShape("bottleneck", (2, 2, 2, 2)),
    "resnet34": ResNetShape("basic", (3, 4, 6, 3)),
    "resnet18_s2": ResNetShape("basic", (2, 2, 2, 2), stem="s2"),
    "resnet26_s2": ResNetShape("bottleneck", (2, 2, 2, 2), stem="s2"),
    "resnet50_s2": ResNetShape("bottleneck", (3, 4, 6, 3), stem="s2"),
    "resnet18_deep2": ResNetShape("basic", (2, 2, 2, 2), stem="deep2"),
    "resnet26_deep2": ResNetShape("bottleneck", (2, 2, 2, 2), stem="deep2"),
    "wide_resnet18_s2": ResNetShape("basic", (2, 2, 2, 2), stem="s2", widths=(96, 192, 384, 768)),
    "wide_resnet18": ResNetShape("basic", (2, 2, 2, 2), widths=(96, 192, 384, 768)),
    "resnet10_s2": ResNetShape("basic", (1, 1, 1, 1), stem="s2"),
}
DEEP_STEM_WIDTHS = (32, 32)  # the deep stem's first two convs; its third has the first stage's width


def shape_resnet(shape: ResNetShape, num_classes: int, *, resnet_class: type[ResNet] = ResNet,
                 block_class: type[nn.Module] | None = None) -> ResNet:
    """A `resnet_class` (torchvision's ResNet, or its quantizable form with that form's blocks)
    of `shape`, initialised as torchvision initialises a ResNet."""
    block = block_class or shape.block_class
    model = resnet_class(block, list(shape.layers), num_classes=num_classes)
    if shape.widths != (64, 128, 256, 512):
        model.inplanes = shape.widths[0]
        model.conv1 = nn.Conv2d(3, shape.widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(shape.widths[0])
        for i, (planes, blocks) in enumerate(zip(shape.widths, shape.layers)):
            setattr(model, f"layer{i + 1}", model._make_layer(block, planes, blocks, stride=1 if i == 0 else 2))
        model.fc = nn.Linear(shape.widths[-1] * block.expansion, num_classes)
    if shape.stem in ("s2", "deep2"):
        model.maxpool = nn.Identity()
    if shape.stem == "deep2":
        a, b = DEEP_STEM_WIDTHS
        # conv1 becomes three convs; bn1 (after the last) and the ReLU stay where they were.
        model.conv1 = nn.Sequential(
            nn.Conv2d(3, a, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
            nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, shape.widths[0], 3, padding=1, bias=False))
    elif shape.stem not in ("imagenet", "s2"):
        raise ValueError(f"Invalid stem {shape.stem!r}; choose one of: imagenet, s2, deep2")
    for m in model.modules():  # torchvision's ResNet initialisation, for the replaced modules too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


def available_archs() -> list[str]:
    theirs = set(torchvision.models.list_models(module=torchvision.models)) - set(RESNET_SHAPES)
    return ["tinynet"] + sorted(RESNET_SHAPES) + sorted(theirs)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained classifier for `num_classes` classes; weights are loaded by the caller."""
    if arch == "tinynet":
        return TinyNet(num_classes)
    if arch in RESNET_SHAPES:
        return shape_resnet(RESNET_SHAPES[arch], num_classes)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"Invalid arch {arch!r}; choose one of: {', '.join(available_archs())}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX); fp32 is faster elsewhere."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# -- int8 ------------------------------------------------------------------------------------------

# The deprecation notices of torch 2.14's only int8 path without a compiler at serving time:
# eager quantization (training.quantize), quantized tensors and TorchScript, which stores the
# converted model. The maintained successor (torchao's PT2E) is not installed; these calls are
# silenced exactly where they are made, for these messages only.
INT8_DEPRECATIONS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation functions"),
    (FutureWarning, r"`torch\.jit\.(script|save|load)` is deprecated"),
)
INT8_BACKEND = "x86"


@contextmanager
def int8_deprecations_silenced():
    with warnings.catch_warnings():
        for category, message in INT8_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def cpu_supports_vnni() -> bool:
    """True where the CPU has VNNI (AVX512-VNNI or AVX-VNNI): 8-bit products without saturation."""
    flags = _cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def int8_backend_available() -> bool:
    """The x86 quantized engine (fbgemm/oneDNN kernels) the archive's int8 model was converted for."""
    return INT8_BACKEND in torch.backends.quantized.supported_engines


def load_int8(path, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The archive's int8 TorchScript program (training.quantize), ready to serve: loaded, not
    quantized here. One forward on `example` ((B, 3, H, W) float) runs the quantized kernels once,
    so that their one-time deprecation notice is raised here, silenced, and not on a request."""
    torch.backends.quantized.engine = INT8_BACKEND
    with int8_deprecations_silenced():
        model = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.inference_mode():
            model(example)
    return model
