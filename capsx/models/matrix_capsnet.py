"""Matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018), the smallNORB network of its Fig. 1.

ReLU Conv1 (5x5, A channels, stride 2) -> PrimaryCaps (1x1: B types of a 4x4 pose and a logistic
activation) -> ConvCaps1 (3x3, C types, stride 2) -> ConvCaps2 (3x3, D types, stride 1) -> Class
capsules (one per class, the transformation shared over positions, with coordinate addition), each
capsule layer routed by EM (`capsx.models.em_routing`). A = B = C = D = 32: about 310K parameters
(paper) for smallNORB's 5 classes. The scores are the class capsules' activations, for the spread loss.

A convolutional capsule layer routes each output position's K x K x types children on their own (as
the public reimplementations do): a child at the edge of two receptive fields is normalised within
each, where the paper's children split themselves over every parent that receives them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from capsx.models.config import ModelConfig, register_model
from capsx.models.em_routing import em_routing
from capsx.models.output import ModelOutput


class PrimaryMatrixCaps(nn.Module):
    """1x1 conv -> `types` capsules per position: a 4x4 pose and a logistic activation."""

    def __init__(self, in_channels: int, types: int) -> None:
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * 16, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, _, H, W = x.shape
        pose = self.pose(x).view(B, self.types, 16, H, W).permute(0, 3, 4, 1, 2)  # (B, H, W, types, 16)
        act = torch.sigmoid(self.activation(x)).permute(0, 2, 3, 1)  # (B, H, W, types)
        return pose.contiguous(), act.contiguous()


class ConvMatrixCaps(nn.Module):
    """Convolutional capsules: each K x K x in_types child votes W_ij M_i (4x4 @ 4x4) for out_types parents."""

    def __init__(self, in_types: int, out_types: int, kernel: int, stride: int, iterations: int,
                 final_lambda: float) -> None:
        super().__init__()
        self.kernel, self.stride, self.iterations, self.final_lambda = kernel, stride, iterations, final_lambda
        self.out_types = out_types
        self.weight = nn.Parameter(torch.randn(kernel * kernel * in_types, out_types, 4, 4) * 0.5)
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))

    def forward(self, pose: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        B, H, W, T, _ = pose.shape
        K, s = self.kernel, self.stride
        Ho, Wo = (H - K) // s + 1, (W - K) // s + 1
        # (B, Ho, Wo, T, 16, K, K) -> (B*Ho*Wo, K*K*T, 4, 4): each output position's children
        patches = pose.unfold(1, K, s).unfold(2, K, s).permute(0, 1, 2, 5, 6, 3, 4)
        patches = patches.reshape(B * Ho * Wo, K * K * T, 4, 4)
        a = act.unfold(1, K, s).unfold(2, K, s).permute(0, 1, 2, 4, 5, 3).reshape(B * Ho * Wo, K * K * T)
        votes = (patches.unsqueeze(2) @ self.weight.unsqueeze(0)).flatten(-2)  # (N, I, J, 16)
        mu, a_out = em_routing(votes, a, self.beta_u, self.beta_a, self.iterations, self.final_lambda)
        return mu.view(B, Ho, Wo, self.out_types, 16), a_out.view(B, Ho, Wo, self.out_types)


class ClassMatrixCaps(nn.Module):
    """Class capsules: every position's children vote with one W per (child type, class), and the scaled
    coordinates of the child's position are added to the first two entries of the vote's last column."""

    def __init__(self, in_types: int, classes: int, iterations: int, final_lambda: float) -> None:
        super().__init__()
        self.iterations, self.final_lambda = iterations, final_lambda
        self.weight = nn.Parameter(torch.randn(in_types, classes, 4, 4) * 0.5)
        self.beta_u = nn.Parameter(torch.zeros(classes))
        self.beta_a = nn.Parameter(torch.zeros(classes))

    def forward(self, pose: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        B, H, W, T, _ = pose.shape
        J = self.weight.shape[1]
        votes = pose.view(B, H, W, T, 1, 4, 4) @ self.weight.view(1, 1, 1, T, J, 4, 4)  # (B, H, W, T, J, 4, 4)
        rows = (torch.arange(H, dtype=pose.dtype, device=pose.device) + 0.5) / H  # receptive-field centres, in [0, 1]
        cols = (torch.arange(W, dtype=pose.dtype, device=pose.device) + 0.5) / W
        offset = torch.zeros(H, W, 1, 1, 4, 4, dtype=pose.dtype, device=pose.device)
        offset[..., 0, 3] = rows.view(H, 1, 1, 1)
        offset[..., 1, 3] = cols.view(1, W, 1, 1)
        votes = (votes + offset).reshape(B, H * W * T, J, 16)
        mu, a_out = em_routing(votes, act.reshape(B, H * W * T), self.beta_u, self.beta_a, self.iterations,
                               self.final_lambda)
        return mu, a_out  # (B, J, 16), (B, J)


class MatrixCapsNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, conv1_channels: int = 32,
                 primary_types: int = 32, caps1_types: int = 32, caps2_types: int = 32, iterations: int = 3,
                 final_lambda: float = 0.01) -> None:
        super().__init__()
        C, H, W = input_shape
        self.input_shape, self.num_classes = input_shape, num_classes
        self.conv1 = nn.Conv2d(C, conv1_channels, 5, stride=2)
        self.primary_caps = PrimaryMatrixCaps(conv1_channels, primary_types)
        self.conv_caps1 = ConvMatrixCaps(primary_types, caps1_types, 3, 2, iterations, final_lambda)
        self.conv_caps2 = ConvMatrixCaps(caps1_types, caps2_types, 3, 1, iterations, final_lambda)
        self.class_caps = ClassMatrixCaps(caps2_types, num_classes, iterations, final_lambda)
        h, w = (H - 5) // 2 + 1, (W - 5) // 2 + 1
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
        if h - 2 < 1 or w - 2 < 1:
            raise ValueError(f"input {H}x{W} is too small for the conv and capsule kernels")

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        pose, act = self.primary_caps(F.relu(self.conv1(x)))
        pose, act = self.conv_caps1(pose, act)
        pose, act = self.conv_caps2(pose, act)
        poses, scores = self.class_caps(pose, act)
        return ModelOutput(scores=scores, capsules=poses)


@register_model
class MatrixCapsNetConfig(ModelConfig):
    """`model: {name: matrix_capsnet}`: Fig. 1's network (A = B = C = D = 32), EM routing with 3 iterations."""

    name: Literal["matrix_capsnet"] = "matrix_capsnet"
    default_loss: ClassVar[str | None] = "spread"
    conv1_channels: int = Field(32, ge=1)  # A
    primary_types: int = Field(32, ge=1)  # B
    caps1_types: int = Field(32, ge=1)  # C
    caps2_types: int = Field(32, ge=1)  # D
    iterations: int = Field(3, ge=1)  # EM iterations per capsule layer
    final_lambda: float = Field(0.01, gt=0)  # the last iteration's inverse temperature

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        return MatrixCapsNet(input_shape, num_classes, **self.kwargs())
