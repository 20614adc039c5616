"""Model construction shared by training and the handler: rebuilt from a plain config dict."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn
import torchvision


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


def available_archs() -> list[str]:
    return ["tinynet"] + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained classifier for `num_classes` classes; weights are loaded by the caller."""
    if arch == "tinynet":
        return TinyNet(num_classes)
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
