"""Data configs: a recipe's `data` section, validated by the named data set's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from capsx.data.imageset import DataSplits
from capsx.registry import Registry
from capsx.schema import Section


class AugmentConfig(Section):
    shift: int = Field(0, ge=0)  # random shift of up to this many pixels per image, zero padded (paper: 2)


class DataConfig(Section):
    """Fields every data set shares; subclasses set `name: Literal["..."]` and their own fields."""

    name: str
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    subset: int | None = Field(None, ge=1)  # train on a seeded random subset of this many images
    test_subset: int | None = Field(None, ge=1)  # evaluate on a seeded random subset
    augment: AugmentConfig = AugmentConfig()

    classes: ClassVar[list[str]]
    needs_root: ClassVar[bool] = False  # read from disk (True) or generated (False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model sees."""
        raise NotImplementedError  # every registered subclass overrides it

    @property
    def train_shift(self) -> int:
        """The random shift (pixels, each direction) the training batches get on the device:
        the recipe's augmentation, or a data set's own random placement."""
        return self.augment.shift

    def load(self, root: Path) -> DataSplits:
        raise NotImplementedError  # every registered subclass overrides it

    def load_splits(self, root: Path) -> DataSplits:
        """`load`, then the subsets the recipe asks for."""
        splits = self.load(root)
        if self.subset is not None:
            splits.train = splits.train.subset(self.subset)
        if self.test_subset is not None:
            splits.test = splits.test.subset(self.test_subset)
        return splits


DATASETS: Registry[type[DataConfig]] = Registry("data set")


def register_dataset(cfg_cls: type[DataConfig]) -> type[DataConfig]:
    DATASETS.add(cfg_cls.model_fields["name"].default, cfg_cls)
    return cfg_cls
