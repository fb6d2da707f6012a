"""Model configs: a recipe's `model` section, validated by the named model's own schema."""

from __future__ import annotations

from typing import Any

from torch import nn

from capsx.registry import Registry
from capsx.schema import Section


class ModelConfig(Section):
    """Base of every model's config; subclasses set `name: Literal["..."]`."""

    name: str

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments for the model class."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != "name"}

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        """`objects`: labelled objects per image, for models whose output depends on it (a decoder)."""
        raise NotImplementedError  # every registered subclass overrides it


MODELS: Registry[type[ModelConfig]] = Registry("model")


def register_model(cfg_cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: register a config under the default of its `name` field."""
    MODELS.add(cfg_cls.model_fields["name"].default, cfg_cls)
    return cfg_cls
