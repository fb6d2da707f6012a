"""Small reusable blocks shared by the model families."""

from __future__ import annotations

from typing import Literal

from torch import nn

Activation = Literal["relu", "leaky_relu", "elu", "tanh", "sigmoid", "swish"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "swish": nn.SiLU,  # swish(x) = x * sigmoid(x), a.k.a. SiLU
}


def make_activation(name: Activation) -> nn.Module:
    return _ACTIVATIONS[name]()
