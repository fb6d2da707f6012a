"""What every capsule network here shares after its class capsules: scores as capsule lengths, and the
reconstruction decoder masked by one class (Sabour et al. 2017, Sec. 4.1), so the losses, the pose work
and the pictures serve CapsNet and Efficient-CapsNet alike."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from capsx.models.output import ModelOutput
from capsx.models.routing import RoutingTrace, capsule_length


def make_decoder(num_classes: int, class_dim: int, hidden: tuple[int, ...], pixels: int) -> nn.Sequential:
    """Masked class capsules (K * D) -> fully connected ReLU layers -> pixels in [0, 1] (sigmoid)."""
    layers: list[nn.Module] = []
    width = num_classes * class_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers += [nn.Linear(width, pixels), nn.Sigmoid()]
    return nn.Sequential(*layers)


class CapsuleClassifier(nn.Module):
    """Base of the capsule models: subclasses build their layers, set `decoder` (or None) and define
    `encode`; scoring, masking and reconstruction are here."""

    input_shape: tuple[int, int, int]
    num_classes: int
    class_dim: int  # D, each class capsule's dimensions
    objects: int  # labelled objects per image: at test time the decoder rebuilds the top `objects`
    decoder: nn.Sequential | None

    def encode(self, x: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        """Images (B, C, H, W) -> class capsules v (B, K, D); `trace` records the routing."""
        raise NotImplementedError

    def reconstruct(self, capsules: Tensor, classes: Tensor) -> Tensor:
        """Decode only the capsule of `classes` (B,) (the others are masked to 0) -> (B, C, H, W);
        classes (B, k): each of the k separately (MultiMNIST) -> (B, k, C, H, W)."""
        assert self.decoder is not None
        if classes.dim() == 2:
            B, k = classes.shape
            each = self.reconstruct(capsules.repeat_interleave(k, dim=0), classes.flatten())  # (B*k, C, H, W)
            return each.view(B, k, *self.input_shape)
        mask = F.one_hot(classes, self.num_classes).to(capsules.dtype)  # (B, K)
        flat = (capsules * mask.unsqueeze(-1)).flatten(1)  # (B, K*D)
        return self.decoder(flat).view(-1, *self.input_shape)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        """`target` (B,) or (B, k) masks the decoder in training; at test time the prediction does."""
        v = self.encode(x)
        lengths = capsule_length(v)  # (B, K): |v_k| = P(class k present)
        recon = None
        if self.decoder is not None:
            if target is None:
                target = lengths.argmax(dim=1) if self.objects == 1 else lengths.topk(self.objects, dim=1).indices
            recon = self.reconstruct(v, target)
        return ModelOutput(scores=lengths, capsules=v, reconstruction=recon)
