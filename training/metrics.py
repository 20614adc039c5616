"""Classification metrics from a confusion matrix, shared by training and evaluation."""
from __future__ import annotations

import torch


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) predictions and (N,) labels -> (C, C) counts, rows = true class, columns = predicted."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support; 0 where undefined (no prediction / no support)."""
    cm = cm.double()
    tp = cm.diag()
    predicted, support = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long()}


def macro_f1(cm: torch.Tensor) -> float:
    """Mean F1 over the classes that have support (sklearn's default ignores none; we skip empty rows
    so a tiny split that misses a rare class is not scored on it)."""
    stats = per_class(cm)
    present = stats["support"] > 0
    return float(stats["f1"][present].mean()) if present.any() else 0.0
