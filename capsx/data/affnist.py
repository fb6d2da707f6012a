"""affNIST-style test sets for `capsx eval --dataset`: the real affNIST test set read
from its MATLAB files, or `affine-mnist`, the MNIST test digits under seeded random
affine transforms in affNIST's ranges (affNIST cannot be downloaded at run time).

affNIST (Tieleman, cs.toronto.edu/~tijmen/affNIST) ships MATLAB v5 files holding a
struct `affNISTdata`; its `image` field is 1600 x N uint8, one 40x40 image per
column with the pixels in row-major order (how every public Python reader takes
them: `image.T.reshape(N, 40, 40)`), and `label_int` holds the N digits. The test
set is `test.mat` (all of it) or `test_batches/1.mat ... 32.mat`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from capsx.data.imageset import ImageSet
from capsx.data.transforms import affine_matrices, centre_on_canvas, ink_box, translate, uniform, warp
from capsx.errors import DataError

CANVAS = 40
# the ranges of affNIST's own transformations; one draw per image.
MAX_ROTATE = 20.0  # degrees, either way
MAX_SHEAR = 0.1  # x-shear factor, either way
SCALE = (0.8, 1.2)
AFFINE_SEED = 0


def read_affnist_mat(path: Path) -> ImageSet:
    """One affNIST .mat file as (N, 1, 40, 40) uint8 images and their labels."""
    from scipy.io import loadmat  # scipy comes with mlflow

    try:
        mat = loadmat(str(path), squeeze_me=False, struct_as_record=True)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise DataError(f"{path}: not a readable MATLAB file ({str(e).splitlines()[0][:120]})") from None
    data = mat.get("affNISTdata")
    fields = data.dtype.names if isinstance(data, np.ndarray) else None
    if not fields or "image" not in fields or "label_int" not in fields:
        raise DataError(f"{path}: expected a struct affNISTdata with fields image and label_int")
    record = data[0, 0]
    image = np.asarray(record["image"])
    labels = np.asarray(record["label_int"]).reshape(-1)
    if image.ndim != 2 or image.shape[0] != CANVAS * CANVAS or image.shape[1] != len(labels):
        raise DataError(f"{path}: affNISTdata.image is {image.shape} for {len(labels)} labels; expected "
                        f"{CANVAS * CANVAS} x N, one 40x40 image per column")
    if image.dtype != np.uint8:
        raise DataError(f"{path}: affNISTdata.image is {image.dtype}; expected uint8 pixels")
    images = np.ascontiguousarray(image.T).reshape(-1, 1, CANVAS, CANVAS)  # column n -> image n, row-major
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def affnist_files(root: Path) -> list[Path]:
    """`<root>/affNIST/test.mat`, else the numbered `test_batches/*.mat` in order."""
    folder = root / "affNIST"
    whole = folder / "test.mat"
    if whole.is_file():
        return [whole]
    batches = sorted((folder / "test_batches").glob("*.mat"),
                     key=lambda p: (int(m.group()) if (m := re.search(r"\d+", p.stem)) else 0, p.name))
    if batches:
        return batches
    raise DataError(f"affNIST not found: expected {whole} or {folder / 'test_batches'}/1.mat ... (unzip the "
                    "test set from cs.toronto.edu/~tijmen/affNIST there), or use --dataset affine-mnist")


def load_affnist(root: Path) -> ImageSet:
    parts = [read_affnist_mat(f) for f in affnist_files(root)]
    return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def affine_mnist(digits: ImageSet, seed: int = AFFINE_SEED) -> ImageSet:
    """28x28 digits centred on a 40x40 canvas, then each rotated, sheared and scaled about the
    centre and moved to a random place where all its ink stays on the canvas. The same images
    for the same seed on every machine (the draws come from one CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    n = len(digits)
    centred = centre_on_canvas(digits.images, CANVAS)
    maps = affine_matrices(uniform(n, -MAX_ROTATE, MAX_ROTATE, g), uniform(n, *SCALE, g),
                           uniform(n, -MAX_SHEAR, MAX_SHEAR, g), torch.zeros(n), torch.zeros(n))
    warped = warp(centred, maps)
    top, bottom, left, right = ink_box(warped)
    # a whole-pixel move in [-left, last - right] keeps every inked pixel on the canvas
    u = torch.rand(2, n, generator=g)
    dx = (-left + (u[0] * (CANVAS - right + left)).floor().long()).clamp(max=CANVAS - 1 - right)
    dy = (-top + (u[1] * (CANVAS - bottom + top)).floor().long()).clamp(max=CANVAS - 1 - bottom)
    return ImageSet(translate(warped, dx, dy), digits.labels.clone())


def load_eval_set(name: str, root: Path) -> ImageSet:
    """`affnist` or `affine-mnist`, both 40x40 (`root`: the data root holding affNIST/ or MNIST/)."""
    if name == "affnist":
        return load_affnist(root)
    assert name == "affine-mnist", name
    from capsx.data.mnist import MNISTConfig

    test = MNISTConfig().load(root).test
    assert isinstance(test, ImageSet)  # MNIST is read, not generated
    return affine_mnist(test)
