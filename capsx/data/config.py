"""Data configs: a recipe's `data` section, validated by the named data set's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from capsx.data.files import canonical_root
from capsx.data.imageset import DataSplits, Examples, ImageSet
from capsx.data.pose import PoseQuantity
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
    batch_size: int = Field(128, ge=1, le=1 << 20)
    eval_batch_size: int = Field(500, ge=1, le=1 << 20)
    subset: int | None = Field(None, ge=1)  # train on a seeded random subset of this many images
    test_subset: int | None = Field(None, ge=1)  # evaluate on a seeded random subset
    augment: AugmentConfig = AugmentConfig()

    image_shape: ClassVar[tuple[int, int, int]]  # (C, H, W) of the images as loaded
    classes: ClassVar[list[str]]
    needs_root: ClassVar[bool] = False  # read from disk (True) or generated (False)
    objects: ClassVar[int] = 1  # labelled objects per image (MultiMNIST: 2)
    # how a user's own picture is made into one of its images (`--image`, `capsx predict`): "digit", as MNIST
    # drew its digits (grey, light ink on black, the ink box centred by mass); "photo", resized and
    # centre-cropped to the images' size (CIFAR-10, SVHN, smallNORB, image folders)
    user_images: ClassVar[str] = "digit"

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

    def resolved(self, splits: DataSplits) -> DataConfig:
        """This config completed by what loading found (a folder's class names); fixed sets are complete."""
        return self

    def load_test(self, root: Path) -> Examples:
        """The test split alone, for commands that only look at test images (the picture commands,
        eval): `load(root).test` unless a data set can read it without its train split."""
        return self.load(root).test

    def pose(self, examples: ImageSet) -> list[PoseQuantity]:
        """The pose quantities this data set knows of `examples` (`capsx eval --pose`); none by default."""
        return []

    def load_splits(self, root: Path) -> DataSplits:
        """`load`, then the subsets the recipe asks for, then the test split's central crop
        (done once here, so evaluation and every picture command see what the model was built for).
        `root` is made canonical first: whichever way it was spelled, the data set's paths are the same."""
        splits = self.load(canonical_root(root))
        if self.subset is not None:
            splits.train = splits.train.subset(self.subset)
        splits.test = self._prepared_test(splits.test)
        return splits

    def load_test_split(self, root: Path) -> Examples:
        """The test split exactly as `load_splits(root).test` gives it, without reading the train split
        where the data set allows (`load_test`)."""
        return self._prepared_test(self.load_test(canonical_root(root)))

    def _prepared_test(self, test: Examples) -> Examples:
        if self.test_subset is not None:
            test = test.subset(self.test_subset)
        if self.augment.crop is not None:
            if not isinstance(test, ImageSet):
                raise DataError(f"data.augment.crop: not available for {self.name!r} (it generates its examples); "
                                "remove it")
            test = ImageSet(center_crop(test.images, self.augment.crop), test.labels, test.extras)
        return test


DATASETS: Registry[type[DataConfig]] = Registry("data set")


def register_dataset(cfg_cls: type[DataConfig]) -> type[DataConfig]:
    DATASETS.add(cfg_cls.model_fields["name"].default, cfg_cls)
    return cfg_cls
