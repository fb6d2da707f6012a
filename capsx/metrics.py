"""Evaluation results: error, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class EvalResult:
    loss: float  # mean total loss per image
    parts: dict[str, float]  # mean of each loss part per image
    confusion: Tensor  # (K, K) int64, rows = true class, columns = prediction
    classes: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(1, self.images)

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy

    @property
    def per_class_accuracy(self) -> Tensor:
        """(K,) accuracy of each true class (NaN for a class with no test images)."""
        totals = self.confusion.sum(dim=1).double()
        return self.confusion.diag().double() / totals

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/loss": self.loss, f"{prefix}/error": self.error, f"{prefix}/acc": self.accuracy}
        out.update({f"{prefix}/{k}": v for k, v in self.parts.items()})
        return out


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts of (true, predicted) pairs."""
    idx = labels.long() * num_classes + predictions.long()
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)
