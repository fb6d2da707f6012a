"""The plain reference CapsNet: the same weights, computed the way the public
implementations do (broadcast W_ij @ u_i, then Procedure 1 line by line).

It is the oracle of the equivalence tests and the baseline of `make bench`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from capsx.models.capsnet import CapsNet
from capsx.models.routing import RoutingTrace, route_reference


def predictions_reference(weight: Tensor, u: Tensor) -> Tensor:
    """u_hat(j|i) = W_ij u_i as a broadcast matmul: W (1, I, J, D, d) @ u (B, I, 1, d, 1) -> (B, I, J, D)."""
    return (weight.unsqueeze(0) @ u[:, :, None, :, None]).squeeze(-1)


class ReferenceCapsNet(CapsNet):
    """CapsNet whose class capsules are computed by the plain reference path."""

    def encode(self, x: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        assert trace is None, "the reference path records no trace"
        conv = self.primary_caps.conv  # the direct conv, as nn.Conv2d computes it (not the measured choice)
        h = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias))
        u = self.primary_caps.capsules(F.conv2d(h, conv.weight, conv.bias, conv.stride))  # (B, I, d)
        u_hat = predictions_reference(self.class_caps.weight, u)  # (B, I, J, D)
        caps = self.class_caps
        # (B, J, D), J = K (+1 none of the above)
        v = route_reference(u_hat, caps.routing, caps.routing_iters, caps.prior, caps.squash_fn, literal=False)
        return v[:, :self.num_classes]  # (B, K, D)
