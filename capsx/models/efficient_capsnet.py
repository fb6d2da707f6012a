"""Efficient-CapsNet (Mazzia, Salvetti, Chiaberge, "Efficient-CapsNet: capsule network with self-attention
routing", Scientific Reports 2021), as its MNIST graph is built in the authors' code.

Four conv layers, each ReLU then batch norm (5x5 32, 3x3 64, 3x3 64, 3x3 128 stride 2: 28 -> 9), primary
capsules from a 9x9 depthwise conv (128 channels at 1x1 read as 16 capsules of 8 dimensions) squashed
by the paper's Eq. 4, and 10 class capsules of 16 dimensions by self-attention routing (Eq. 5-7, with
learned log priors). 161,824 trainable parameters without the decoder, which is the CapsNet's
(512, 1024, sigmoid) from the masked class capsules.

Initialisation as the authors' Keras layers: he_normal (truncated normal, std sqrt(2 / fan_in) / 0.8796)
for the convs, the decoder's hidden layers and the routing weights (whose fan-in Keras takes as
10 * 16 * 8 for their (10, 16, 8, 16) shape); Glorot-uniform for the depthwise conv, Glorot-normal for
the decoder's output layer; zero biases and priors. Batch norm as Keras's: momentum 0.99 (PyTorch's
0.01) and eps 1e-3.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from capsx.models.capsnet import ClassCaps
from capsx.models.capsule_classifier import CapsuleClassifier, make_decoder
from capsx.models.config import ModelConfig, register_model
from capsx.models.routing import RoutingTrace, squash_exp

KERAS_TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated at +-2: Keras divides by it


def he_normal_(w: Tensor, fan_in: int) -> None:
    std = math.sqrt(2.0 / fan_in) / KERAS_TRUNC_STD
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class EfficientCapsNet(CapsuleClassifier):
    """Efficient-CapsNet for images (C, H, W); the MNIST sizes by default."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 conv_channels: tuple[int, ...] = (32, 64, 64, 128), conv_kernels: tuple[int, ...] = (5, 3, 3, 3),
                 conv_strides: tuple[int, ...] = (1, 1, 1, 2), primary_kernel: int = 9, primary_dim: int = 8,
                 class_dim: int = 16, decoder: bool = True, decoder_hidden: tuple[int, ...] = (512, 1024),
                 objects: int = 1) -> None:
        super().__init__()
        C, H, W = input_shape
        self.input_shape, self.num_classes, self.class_dim, self.objects = input_shape, num_classes, class_dim, objects
        layers: list[nn.Module] = []
        width, h, w = C, H, W
        for out, k, stride in zip(conv_channels, conv_kernels, conv_strides, strict=True):
            conv = nn.Conv2d(width, out, k, stride=stride)
            he_normal_(conv.weight, width * k * k)
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)]
            width, h, w = out, (h - k) // stride + 1, (w - k) // stride + 1
        self.features = nn.Sequential(*layers)
        self.primary = nn.Conv2d(width, width, primary_kernel, groups=width)  # depthwise
        h, w = h - primary_kernel + 1, w - primary_kernel + 1
        if h < 1 or w < 1:
            raise ValueError(f"input {H}x{W} is too small for the conv kernels")
        if (width * h * w) % primary_dim:
            raise ValueError(f"the primary conv gives {width * h * w} values, not a whole number of "
                             f"{primary_dim}-D capsules")
        bound = math.sqrt(6.0 / (primary_kernel ** 2 * (1 + width)))  # Glorot: fan_in k*k, fan_out k*k*F
        nn.init.uniform_(self.primary.weight, -bound, bound)
        nn.init.zeros_(self.primary.bias)  # type: ignore[arg-type]
        self.primary_dim = primary_dim
        self.primary_caps = width * h * w // primary_dim
        self.class_caps = ClassCaps(self.primary_caps, primary_dim, num_classes, class_dim, 1, 1.0,
                                    routing="attention", squash_fn=squash_exp)
        he_normal_(self.class_caps.weight.data, num_classes * self.primary_caps * primary_dim)
        self.decoder = make_decoder(num_classes, class_dim, decoder_hidden, C * H * W) if decoder else None
        if self.decoder is not None:
            linears = [m for m in self.decoder if isinstance(m, nn.Linear)]
            for lin in linears[:-1]:
                he_normal_(lin.weight, lin.in_features)
            nn.init.xavier_normal_(linears[-1].weight)  # glorot_normal (Keras truncates it too; a small difference)
            for lin in linears:
                nn.init.zeros_(lin.bias)

    def encode(self, x: Tensor, trace: RoutingTrace | None = None) -> Tensor:
        y = self.primary(self.features(x))  # (B, F, h, w): 1x1 for MNIST
        B = y.shape[0]
        # Channels last, then groups of primary_dim, as Keras reshapes its (h, w, F) output.
        u = squash_exp(y.permute(0, 2, 3, 1).reshape(B, self.primary_caps, self.primary_dim))  # (B, 16, 8)
        return self.class_caps(u, trace)  # (B, K, D)


@register_model
class EfficientCapsNetConfig(ModelConfig):
    """`model: {name: efficient_capsnet, ...}`: the authors' MNIST graph by default."""

    name: Literal["efficient_capsnet"] = "efficient_capsnet"
    outputs_capsules: ClassVar[bool] = True
    conv_channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64, 64, 128])
    conv_kernels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [5, 3, 3, 3])
    conv_strides: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 1, 1, 2])
    primary_kernel: int = Field(9, ge=1)
    primary_dim: int = Field(8, ge=1)
    class_dim: int = Field(16, ge=1)
    decoder: bool = True
    decoder_hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [512, 1024])

    @model_validator(mode="after")
    def _same_lengths(self) -> EfficientCapsNetConfig:
        n = {len(self.conv_channels), len(self.conv_kernels), len(self.conv_strides)}
        if len(n) != 1 or not self.conv_channels:
            raise ValueError("model.conv_channels, conv_kernels and conv_strides: one entry per conv layer, "
                             f"same lengths (got {len(self.conv_channels)}, {len(self.conv_kernels)}, "
                             f"{len(self.conv_strides)})")
        return self

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        return EfficientCapsNet(input_shape, num_classes, tuple(self.conv_channels), tuple(self.conv_kernels),
                                tuple(self.conv_strides), self.primary_kernel, self.primary_dim, self.class_dim,
                                self.decoder, tuple(self.decoder_hidden), objects=objects)


__all__ = ["EfficientCapsNet", "EfficientCapsNetConfig"]
