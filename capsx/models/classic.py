"""The classic CNN family the CapsNet is measured against, built by torchvision's own builders (no weights).

AlexNet (ReLU, dropout), VGG ("deep and simple": only 3x3 convs and 2x2 max
pools), GoogLeNet (Inception modules), ResNet (residual blocks x + F(x)) and
DenseNet (each layer sees every earlier layer's maps), sized for small images:

- one input channel (MNIST) or three: a first convolution for another channel
  count is a new one of the same shape, initialised as the family does;
- `stem: small` (ResNet, DenseNet, GoogLeNet) swaps the ImageNet stem, a 7x7
  stride-2 conv and a 3x3 stride-2 max pool (4x smaller maps), for a 3x3
  stride-1 conv and no pool, as CIFAR versions of these networks do;
- VGG drops the last max pools an input smaller than 32 px cannot take, and
  sizes its average pool and classifier to the feature map (at 224x224 it is
  torchvision's model, the VGG table's parameter counts included).

The built model is torchvision's own module, re-classed to a subclass whose
only change is to return a `ModelOutput` (and take the loop's unused target),
so its parameter names are torchvision's and its state dicts load as they are.
Modules swapped out are replaced in place (nn.Identity for a dropped pool) so
every other parameter keeps its torchvision name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from capsx.errors import CapsxError
from capsx.models.config import ModelConfig, register_model
from capsx.models.output import ModelOutput

Stem = Literal["imagenet", "small"]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Init = Callable[[nn.Module], None]


class _ReturnsModelOutput(nn.Module):
    """Put first in the MRO: the torchvision class's forward, its logits wrapped for the loop."""

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        return ModelOutput(scores=super().forward(x))  # logits (B, K)


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def as_capsx_model(net: nn.Module) -> nn.Module:
    """Re-class a torchvision model so it returns a `ModelOutput`; nothing else changes."""
    cls = type(net)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_ReturnsModelOutput, cls), {"__module__": __name__})
    net.__class__ = _CLASSES[cls]
    return net


# Initialisations of the modules we replace, as each family's constructor does it.
def _kaiming(mode: Literal["fan_in", "fan_out"]) -> Init:
    """He et al.'s normal init: VGG and ResNet use fan_out, DenseNet fan_in (torch's default)."""

    def init(m: nn.Module) -> None:
        assert isinstance(m, nn.Conv2d)
        nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    return init


def _truncated_normal(m: nn.Module) -> None:  # GoogLeNet convs and linears
    assert isinstance(m, nn.Conv2d | nn.Linear)
    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _vgg_linear(m: nn.Module) -> None:
    assert isinstance(m, nn.Linear)
    nn.init.normal_(m.weight, 0, 0.01)
    nn.init.zeros_(m.bias)


def _pytorch_default(m: nn.Module) -> None:  # AlexNet keeps PyTorch's own initialisation
    pass


def _conv_like(old: nn.Module, in_channels: int, init: Init, *, kernel_size: int | None = None,
               stride: int | None = None, padding: int | None = None) -> nn.Conv2d:
    """A new conv with `old`'s output channels and bias, for `in_channels` (and a new kernel/stride)."""
    assert isinstance(old, nn.Conv2d)
    conv = nn.Conv2d(in_channels, old.out_channels,
                     kernel_size if kernel_size is not None else old.kernel_size,  # type: ignore[arg-type]
                     stride=stride if stride is not None else old.stride,  # type: ignore[arg-type]
                     padding=padding if padding is not None else old.padding,  # type: ignore[arg-type]
                     bias=old.bias is not None)
    init(conv)
    return conv


def _adapt_stem(conv_owner: nn.Module, conv_name: str, pool_owner: nn.Module, pool_name: str,
                in_channels: int, stem: Stem, init: Init) -> None:
    """Give the first conv `in_channels` inputs; for `stem: small` make it 3x3 stride 1 and
    drop the stem's max pool."""
    old = getattr(conv_owner, conv_name)
    if stem == "small":
        setattr(conv_owner, conv_name, _conv_like(old, in_channels, init, kernel_size=3, stride=1, padding=1))
        setattr(pool_owner, pool_name, nn.Identity())
    elif in_channels != old.in_channels:
        setattr(conv_owner, conv_name, _conv_like(old, in_channels, init))


def _resize_classifier(classifier: nn.Sequential, in_features: int, width: int, init: Init) -> None:
    """Resize the Linear layers of an AlexNet/VGG classifier in place: in_features -> width ... -> classes."""
    linears = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
    for i in linears:
        old = classifier[i]
        assert isinstance(old, nn.Linear)
        fan_in = in_features if i == linears[0] else width
        fan_out = old.out_features if i == linears[-1] else width
        if (old.in_features, old.out_features) != (fan_in, fan_out):
            classifier[i] = nn.Linear(fan_in, fan_out)
            init(classifier[i])


def check_input_fits(model: nn.Module, input_shape: tuple[int, int, int], name: str, advice: str) -> None:
    """A forward pass on the meta device (shapes only, no arithmetic): an input too small for the
    model's poolings is a user error now, with advice, not a shape error deep in the first step."""
    state = {k: torch.empty_like(t, device="meta") for k, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.eval()  # batch norm accepts a single 1x1 map only in eval mode
    try:
        functional_call(model, state, (torch.empty(1, *input_shape, device="meta"),))
    except RuntimeError as e:
        C, H, W = input_shape
        raise CapsxError(f"model {name}: a {C}x{H}x{W} input is too small for it "
                         f"({str(e).splitlines()[0]}); {advice}") from None
    finally:
        model.train(was_training)


_STEM_ADVICE = "try model.stem: small (3x3 stride-1 first conv, no max pool) or larger images"


# ------------------------------------------------------------------------------------------ AlexNet


@register_model
class AlexNetSmallConfig(ModelConfig):
    """AlexNet (Krizhevsky et al. 2012) for 28-32 px images: torchvision's five convolutions
    (64, 192, 384, 256, 256 channels) with its three overlapping 3x3 stride-2 max pools,
    ReLU, and three fully connected layers with dropout. Changed for small inputs: the first
    conv is 5x5 stride 1 (ImageNet's 11x11 stride 4 would leave a 32 px image 7 px wide
    before the first pool), the maps are average-pooled to `pool_size` (32 px: 3x3, 28 px:
    2x2, left as they are) instead of 6x6, and the hidden layers are `classifier_width` wide
    (AlexNet: 4096, for 9216 inputs rather than 2304)."""

    name: Literal["alexnet_small"] = "alexnet_small"
    pool_size: int = Field(3, ge=1)
    classifier_width: int = Field(1024, ge=1)
    dropout: Dropout = 0.5

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        import torchvision  # on first use: 1.4 s that a CapsNet command never pays

        net = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=self.dropout)
        net.features[0] = _conv_like(net.features[0], input_shape[0], _pytorch_default,
                                     kernel_size=5, stride=1, padding=2)
        net.avgpool = nn.AdaptiveAvgPool2d(self.pool_size)
        _resize_classifier(net.classifier, 256 * self.pool_size ** 2, self.classifier_width, _pytorch_default)
        check_input_fits(net, input_shape, self.name, "AlexNet here takes images of at least 12 px")
        return as_capsx_model(net)


# ------------------------------------------------------------------------------------------ VGG


class _VGGConfig(ModelConfig):
    """VGG (Simonyan & Zisserman 2015) through torchvision. Defaults are torchvision's: at 224x224
    the 512x7x7 maps feed FC 4096, FC 4096, classes. `pool_size` (default: 7, or the feature map's
    side when smaller: 1 at 32 px, where 7x7 would only copy one value 49 times) and
    `classifier_width` resize the classifier; CIFAR versions use pool_size 1 and width 512."""

    pool_size: int | None = Field(None, ge=1)
    classifier_width: int = Field(4096, ge=1)
    dropout: Dropout = 0.5

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        # the registry name is torchvision's builder's name
        import torchvision  # on first use: 1.4 s that a CapsNet command never pays

        builder: Callable[..., torchvision.models.VGG] = getattr(torchvision.models, self.name)
        C, H, W = input_shape
        net = builder(weights=None, num_classes=num_classes, dropout=self.dropout)
        if C != 3:
            net.features[0] = _conv_like(net.features[0], C, _kaiming("fan_out"))
        # Each 2x2 pool halves the map; keep only as many as the input has halvings (28 px: 4 of 5).
        pools = [i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
        keep = min(len(pools), min(H, W).bit_length() - 1)
        for i in pools[keep:]:
            net.features[i] = nn.Identity()
        side_h, side_w = H >> keep, W >> keep  # the last feature map's size
        pool = (self.pool_size, self.pool_size) if self.pool_size else (min(7, side_h), min(7, side_w))
        net.avgpool = nn.AdaptiveAvgPool2d(pool)
        _resize_classifier(net.classifier, 512 * pool[0] * pool[1], self.classifier_width, _vgg_linear)
        return as_capsx_model(net)


@register_model
class VGG11Config(_VGGConfig):
    """VGG configuration A: 8 conv layers + 3 FC (132,863,336 parameters at 224x224, 1000 classes)."""

    name: Literal["vgg11"] = "vgg11"


@register_model
class VGG16Config(_VGGConfig):
    """VGG configuration D: 13 conv layers + 3 FC (138,357,544 parameters at 224x224, 1000 classes)."""

    name: Literal["vgg16"] = "vgg16"


# ------------------------------------------------------------------------------------------ ResNet


class _ResNetConfig(ModelConfig):
    """ResNet (He et al. 2016) through torchvision: basic residual blocks, out = relu(x + F(x)),
    F two 3x3 conv-BN layers; the stride-2 stages add a 1x1 projection to x. `stem: small` is the
    CIFAR-10 stem of the paper's section 4.2 (3x3 conv, stride 1, no max pool)."""

    stem: Stem = "imagenet"

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        # the registry name is torchvision's builder's name
        import torchvision  # on first use: 1.4 s that a CapsNet command never pays

        builder: Callable[..., torchvision.models.ResNet] = getattr(torchvision.models, self.name)
        net = builder(weights=None, num_classes=num_classes)
        _adapt_stem(net, "conv1", net, "maxpool", input_shape[0], self.stem, _kaiming("fan_out"))
        check_input_fits(net, input_shape, self.name, _STEM_ADVICE)
        return as_capsx_model(net)


@register_model
class ResNet18Config(_ResNetConfig):
    """ResNet-18: [2, 2, 2, 2] basic blocks of 64, 128, 256, 512 channels."""

    name: Literal["resnet18"] = "resnet18"


@register_model
class ResNet34Config(_ResNetConfig):
    """ResNet-34: [3, 4, 6, 3] basic blocks of 64, 128, 256, 512 channels."""

    name: Literal["resnet34"] = "resnet34"


# ------------------------------------------------------------------------------------------ DenseNet


@register_model
class DenseNet121Config(ModelConfig):
    """DenseNet-121 (Huang et al. 2017) through torchvision: four dense blocks (6, 12, 24, 16
    layers, growth rate 32), each layer fed the concatenation of all earlier maps in its block;
    transitions (1x1 conv, 2x2 average pool) between blocks. At 28 px the ImageNet stem leaves
    too little for the three transitions: use `stem: small`."""

    name: Literal["densenet121"] = "densenet121"
    stem: Stem = "imagenet"
    drop_rate: Dropout = 0.0  # dropout after each dense layer (torchvision's default: none)

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        import torchvision  # on first use: 1.4 s that a CapsNet command never pays

        net = torchvision.models.densenet121(weights=None, num_classes=num_classes, drop_rate=self.drop_rate)
        _adapt_stem(net.features, "conv0", net.features, "pool0", input_shape[0], self.stem, _kaiming("fan_in"))
        check_input_fits(net, input_shape, self.name, _STEM_ADVICE)
        return as_capsx_model(net)


# ------------------------------------------------------------------------------------------ GoogLeNet


@register_model
class GoogLeNetConfig(ModelConfig):
    """GoogLeNet (Szegedy et al. 2015) through torchvision: nine Inception modules, each running
    1x1, 3x3 and 5x5 convolutions and a 3x3 max pool side by side (1x1 convs first to cut the
    depth) and concatenating them. The auxiliary classifiers are off (they only help training
    at ImageNet depth); weights are initialised as torchvision does (truncated normal, std 0.01)."""

    name: Literal["googlenet"] = "googlenet"
    stem: Stem = "imagenet"
    dropout: Dropout = 0.2

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        import torchvision  # on first use: 1.4 s that a CapsNet command never pays

        net = torchvision.models.googlenet(weights=None, num_classes=num_classes, aux_logits=False,
                                           transform_input=False, init_weights=True, dropout=self.dropout)
        # conv1 is conv + batch norm + ReLU: its conv is the one to adapt
        _adapt_stem(net.conv1, "conv", net, "maxpool1", input_shape[0], self.stem, _truncated_normal)
        check_input_fits(net, input_shape, self.name, _STEM_ADVICE)
        return as_capsx_model(net)
