"""Evaluation results: error, per-class accuracy and the confusion matrix.

With k labelled objects per image (MultiMNIST), the prediction is the k
highest-scoring classes and an image counts as right only if all k are right
(the paper's rule); the confusion matrix and per-class accuracy then count
objects: each label against the prediction it was matched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from capsx.models.output import ModelOutput


@dataclass
class EvalResult:
    loss: float  # mean total loss per image
    parts: dict[str, float]  # mean of each loss part per image
    confusion: Tensor  # (K, K) int64, rows = true class, columns = prediction (per object)
    classes: list[str] = field(default_factory=list)
    whole: tuple[int, int] | None = None  # (images with every object right, images) when there are several
    mistakes: Tensor | None = None  # (M,) int64 ascending: the examples not all right, by index in the split

    @classmethod
    def from_predictions(cls, loss: float, parts: dict[str, float], labels: Tensor, predictions: Tensor,
                         classes: list[str], indices: Tensor | None = None) -> EvalResult:
        """labels and predictions (N,), or (N, k) for k objects per image; `indices`: (N,) each example's
        index in its split, to name the mistakes by."""
        mistakes = None
        if indices is not None:
            mistakes = indices[~all_right(labels, predictions)].sort().values
        if labels.dim() == 1:
            return cls(loss, parts, confusion_matrix(labels, predictions, len(classes)), classes, mistakes=mistakes)
        matched_labels, matched_preds = match_objects(labels, predictions)
        confusion = confusion_matrix(matched_labels.flatten(), matched_preds.flatten(), len(classes))
        right = int(all_right(labels, predictions).sum())
        return cls(loss, parts, confusion, classes, whole=(right, len(labels)), mistakes=mistakes)

    @property
    def images(self) -> int:
        return self.whole[1] if self.whole is not None else int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        if self.whole is not None:
            return self.whole[0] / max(1, self.whole[1])
        return self.object_accuracy

    @property
    def object_accuracy(self) -> float:
        """The fraction of labelled objects predicted (= accuracy with one object per image)."""
        return float(self.confusion.diag().sum()) / max(1, int(self.confusion.sum()))

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
        if self.whole is not None:
            out[f"{prefix}/object_acc"] = self.object_accuracy
        out.update({f"{prefix}/{k}": v for k, v in self.parts.items()})
        return out


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts of (true, predicted) pairs."""
    idx = labels.long() * num_classes + predictions.long()
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def predict(out: ModelOutput, labels: Tensor) -> Tensor:
    """Predictions shaped like `labels`: the best class (B,), or the k best (B, k)."""
    return out.prediction if labels.dim() == 1 else out.top(labels.shape[1])


def all_right(labels: Tensor, predictions: Tensor) -> Tensor:
    """(B,) bool: every label predicted (in any order); labels and predictions (B,) or (B, k)."""
    if labels.dim() == 1:
        return predictions == labels
    return (labels.sort(dim=1).values == predictions.sort(dim=1).values).all(dim=1)


def match_objects(labels: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
    """Pair each label (B, k) with a prediction (B, k): itself where it was predicted, otherwise
    the predictions no label claimed, in ascending order. Returns both reordered to align."""
    hit_label = (labels.unsqueeze(2) == predictions.unsqueeze(1)).any(dim=2)  # (B, k)
    hit_pred = (predictions.unsqueeze(2) == labels.unsqueeze(1)).any(dim=2)
    big = int(max(labels.max(), predictions.max())) + 1
    # Found ones first, in class order (the same classes on both sides), then the rest in class order.
    label_order = (labels + big * (~hit_label)).argsort(dim=1)
    pred_order = (predictions + big * (~hit_pred)).argsort(dim=1)
    return labels.gather(1, label_order), predictions.gather(1, pred_order)
