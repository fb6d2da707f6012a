"""The model registry: each entry is a config class whose fields are the model's
keyword arguments and whose `name` is the string a recipe uses."""

from __future__ import annotations

from torch import nn

# Importing the families registers them.
from capsx.models import capsnet as _capsnet  # noqa: F401
from capsx.models import classic as _classic  # noqa: F401
from capsx.models import cnn as _cnn  # noqa: F401
from capsx.models import efficient_capsnet as _efficient_capsnet  # noqa: F401
from capsx.models import matrix_capsnet as _matrix_capsnet  # noqa: F401
from capsx.models.config import MODELS, ModelConfig, register_model
from capsx.models.output import ModelOutput


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int,
                objects: int = 1) -> nn.Module:
    """Build the model a recipe's `model` section describes, for data of this shape (and this many
    labelled objects per image)."""
    return cfg.build(input_shape, num_classes, objects)


__all__ = ["MODELS", "ModelConfig", "ModelOutput", "build_model", "register_model"]
