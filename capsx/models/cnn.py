"""Plain CNNs: the paper's baseline and a small two-conv network.

Both are one `ConvNet`: a stack of 'same'-padded convolutions (optionally each
followed by a 2x2 max pool), fully connected layers, and dropout before the
final linear layer (softmax / cross-entropy lives in the loss).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import Tensor, nn

from capsx.models.config import ModelConfig, register_model
from capsx.models.layers import Activation, make_activation
from capsx.models.measured_conv import MeasuredConv2d
from capsx.models.output import ModelOutput

PositiveInt = Annotated[int, Field(ge=1)]
Init = Literal["torch", "he"]


class ConvNet(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, ...],
        kernel_size: int,
        pool: bool,
        hidden: tuple[int, ...],
        dropout: float,
        activation: Activation,
        init: Init = "torch",
    ) -> None:
        super().__init__()
        C, H, W = input_shape
        features: list[nn.Module] = []
        for out in channels:
            # torch's Conv2d, in the frequency domain where this machine measured that faster
            features += [MeasuredConv2d(C, out, kernel_size, padding="same"), make_activation(activation)]
            if pool:
                features.append(nn.MaxPool2d(2))
                H, W = H // 2, W // 2
            C = out
        self.features = nn.Sequential(*features)
        classifier: list[nn.Module] = [nn.Flatten()]
        width = C * H * W
        for h in hidden:
            classifier += [nn.Linear(width, h), make_activation(activation)]
            width = h
        classifier += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.classifier = nn.Sequential(*classifier)
        if init == "he":
            self._he_init(activation)

    def _he_init(self, activation: Activation) -> None:
        """He et al. (2015) initialisation for the layers followed by a rectifier: keeps the signal's
        scale through a deep ReLU stack (PyTorch's default shrinks it layer by layer)."""
        hidden = [m for m in self.modules() if isinstance(m, nn.Conv2d | nn.Linear)][:-1]  # not the output layer
        for m in hidden:
            if activation == "leaky_relu":
                nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu")
            else:  # relu, and the gain of 2 is also the usual choice for elu and swish
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        return ModelOutput(scores=self.classifier(self.features(x)))  # logits (B, K)


class _ConvNetConfig(ModelConfig):
    channels: list[PositiveInt]
    kernel_size: int = Field(ge=1)
    pool: bool
    hidden: list[PositiveInt]
    dropout: float = Field(0.5, ge=0, lt=1)
    activation: Activation = "relu"
    init: Init = "torch"  # torch: PyTorch's defaults; he: He et al. normal init for the hidden layers

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        # `objects` changes nothing here: the logits are per class however many are present.
        kw = self.kwargs()
        kw["channels"], kw["hidden"] = tuple(kw["channels"]), tuple(kw["hidden"])
        return ConvNet(input_shape, num_classes, **kw)


@register_model
class BaselineCNNConfig(_ConvNetConfig):
    """The paper's baseline: conv 256, 256, 128 @5x5 stride 1 ('same', no pooling, which is
    what its 35.4M parameters imply), FC 328, FC 192, dropout, 10-way softmax."""

    name: Literal["baseline_cnn"] = "baseline_cnn"
    channels: list[PositiveInt] = Field(default_factory=lambda: [256, 256, 128])
    kernel_size: int = Field(5, ge=1)
    pool: bool = False
    hidden: list[PositiveInt] = Field(default_factory=lambda: [328, 192])


@register_model
class ConvNetSmallConfig(_ConvNetConfig):
    """A small two-conv network: conv 32 @3x3, max-pool, conv 64 @3x3, max-pool, FC 1024, softmax."""

    name: Literal["convnet_small"] = "convnet_small"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    kernel_size: int = Field(3, ge=1)
    pool: bool = True
    hidden: list[PositiveInt] = Field(default_factory=lambda: [1024])


@register_model
class LeNetConfig(_ConvNetConfig):
    """LeNet-5's layout (LeCun et al. 1998: 5x5 conv, pool, 5x5 conv, pool, fully connected) at the
    widths of `convnet_small`'s two convs: conv 32 @5x5, 2x2 max-pool, conv 64 @5x5, 2x2
    max-pool, FC 1024, dropout, softmax (3.27M parameters on MNIST). `convnet_small` is the same
    network with 3x3 kernels."""

    name: Literal["lenet"] = "lenet"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    kernel_size: int = Field(5, ge=1)
    pool: bool = True
    hidden: list[PositiveInt] = Field(default_factory=lambda: [1024])
