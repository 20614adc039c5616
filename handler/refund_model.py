"""Model construction shared by training and the handler: rebuilt from a plain config dict."""
from __future__ import annotations

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


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX); fp32 is faster elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
