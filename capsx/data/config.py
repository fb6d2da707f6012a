"""Data configs: a recipe's `data` section, validated by the named data set's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from capsx.data.files import canonical_root
from capsx.data.imageset import DataSplits, ImageSet
from capsx.data.transforms import center_crop
from capsx.errors import DataError
from capsx.registry import Registry
from capsx.schema import Section


class AugmentConfig(Section):
    shift: int = Field(0, ge=0)  # random shift of up to this many pixels per image, zero padded (paper: 2)
    # Square crops of this size: a random one per training image, the central one at test
    # (paper: 24x24 for CIFAR-10, 32x32 of the 48x48 smallNORB images). The model sees crop x crop inputs.
    crop: int | None = Field(None, ge=1)


class DataConfig(Section):
    """Fields every data set shares; subclasses set `name: Literal["..."]` and their own fields."""

    name: str
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    subset: int | None = Field(None, ge=1)  # train on a seeded random subset of this many images
    test_subset: int | None = Field(None, ge=1)  # evaluate on a seeded random subset
    augment: AugmentConfig = AugmentConfig()

    image_shape: ClassVar[tuple[int, int, int]]  # (C, H, W) of the images as loaded
    classes: ClassVar[list[str]]
    needs_root: ClassVar[bool] = False  # read from disk (True) or generated (False)
    objects: ClassVar[int] = 1  # labelled objects per image (MultiMNIST: 2)

    @model_validator(mode="after")
    def _crop_fits(self) -> DataConfig:
        crop = self.augment.crop
        _, H, W = self.image_shape
        if crop is not None and crop > min(H, W):
            raise ValueError(f"augment.crop {crop} is larger than {self.name}'s {H}x{W} images")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the model sees: the crop size when cropping, else the images' size."""
        C, H, W = self.image_shape
        crop = self.augment.crop
        return (C, H, W) if crop is None else (C, crop, crop)

    @property
    def train_shift(self) -> int:
        """The random shift (pixels, each direction) the training batches get on the device:
        the recipe's augmentation, or a data set's own random placement."""
        return self.augment.shift

    def load(self, root: Path) -> DataSplits:
        raise NotImplementedError  # every registered subclass overrides it

    def load_splits(self, root: Path) -> DataSplits:
        """`load`, then the subsets the recipe asks for, then the test split's central crop
        (done once here, so evaluation and every picture command see what the model was built for).
        `root` is made canonical first: whichever way it was spelled, the data set's paths are the same."""
        splits = self.load(canonical_root(root))
        if self.subset is not None:
            splits.train = splits.train.subset(self.subset)
        if self.test_subset is not None:
            splits.test = splits.test.subset(self.test_subset)
        if self.augment.crop is not None:
            t = splits.test
            if not isinstance(t, ImageSet):
                raise DataError(f"data.augment.crop: not available for {self.name!r} (it generates its examples); "
                                "remove it")
            splits.test = ImageSet(center_crop(t.images, self.augment.crop), t.labels, t.extras)
        return splits


DATASETS: Registry[type[DataConfig]] = Registry("data set")


def register_dataset(cfg_cls: type[DataConfig]) -> type[DataConfig]:
    DATASETS.add(cfg_cls.model_fields["name"].default, cfg_cls)
    return cfg_cls
