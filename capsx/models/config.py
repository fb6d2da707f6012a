"""Model configs: a recipe's `model` section, validated by the named model's own schema."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from capsx.registry import Registry
from capsx.schema import Section


class ModelConfig(Section):
    """Base of every model's config; subclasses set `name: Literal["..."]` and add the model's own
    keyword arguments. The fields here are every model's transfer-learning settings, applied by
    `capsx.models.transfer` when training starts, never by `build`."""

    name: str
    outputs_capsules: ClassVar[bool] = False  # class capsules whose lengths are the scores: the margin loss by default
    default_loss: ClassVar[str | None] = None  # a loss of its own without a `loss:` section (matrix capsules: spread)
    pretrained: str | None = None  # weights file: a torchvision state dict or a capsx checkpoint
    freeze: int | list[str] = 0  # the first N layers (negative: all but the last -N), or module names
    head: Literal["keep", "replace"] = "keep"  # replace: a new classifier for this data set's classes
    pretrained_lr_factor: float = Field(1.0, gt=0)  # lr multiplier of the unfrozen pretrained layers

    @model_validator(mode="after")
    def _needs_pretrained(self) -> ModelConfig:
        if self.pretrained is None:
            if self.head == "replace":
                raise ValueError("model.head: replace needs model.pretrained (there is no head to replace)")
            if self.pretrained_lr_factor != 1.0:
                raise ValueError("model.pretrained_lr_factor needs model.pretrained")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The subclass's own fields as keyword arguments for the model class."""
        return {k: getattr(self, k) for k in type(self).model_fields if k not in ModelConfig.model_fields}

    def build(self, input_shape: tuple[int, int, int], num_classes: int, objects: int = 1) -> nn.Module:
        """`objects`: labelled objects per image, for models whose output depends on it (a decoder)."""
        raise NotImplementedError  # every registered subclass overrides it


MODELS: Registry[type[ModelConfig]] = Registry("model")


def register_model(cfg_cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: register a config under the default of its `name` field."""
    MODELS.add(cfg_cls.model_fields["name"].default, cfg_cls)
    return cfg_cls
