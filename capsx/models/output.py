"""The one output type every model returns, so the loop, the losses and the
pictures never branch on the model family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    scores: Tensor  # (B, K) class scores: capsule lengths for CapsNets, logits for CNNs
    capsules: Tensor | None = None  # (B, K, D) the class capsules' vectors, if any
    reconstruction: Tensor | None = None  # (B, C, H, W) decoder output, if any

    @property
    def prediction(self) -> Tensor:
        """(B,) the class with the highest score."""
        return self.scores.argmax(dim=1)

    def top(self, k: int) -> Tensor:
        """(B, k) the k highest-scoring classes, best first: the prediction for k objects per image."""
        return self.scores.topk(k, dim=1).indices
