"""Data: the batched shift, the shapes generator, batch order, and MNIST read by torchvision."""

from pathlib import Path

import numpy as np
import pytest
import torch

from capsx.data import Batches, ImageSet, random_shift
from capsx.data.mnist import MNISTConfig
from capsx.data.shapes import SHAPE_NAMES, ShapesConfig, draw_shapes
from capsx.errors import DataError
from tests.conftest import real_mnist_root, write_mnist


def _shift_reference(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift one (C, H, W) image by (dx, dy) pixels with zero fill, by plain slicing."""
    C, H, W = img.shape
    out = torch.zeros_like(img)
    out[:, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)] = \
        img[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
    return out


def test_random_shift_moves_each_image_by_its_own_offset_with_zero_padding():
    images = torch.rand(64, 2, 9, 7)
    g = torch.Generator().manual_seed(3)
    shifted = random_shift(images, 2, g)
    offsets = torch.randint(0, 5, (2, 64), generator=torch.Generator().manual_seed(3))
    seen = set()
    for i in range(64):
        # a crop at (row, col) of the 2-padded image is a shift by (2 - col, 2 - row)
        dy, dx = 2 - int(offsets[0, i]), 2 - int(offsets[1, i])
        seen.add((dx, dy))
        assert torch.equal(shifted[i], _shift_reference(images[i], dx, dy)), (i, dx, dy)
    assert len(seen) > 10  # per image, not one shift per batch


def test_random_shift_works_on_uint8():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape


def test_shapes_are_deterministic_balanced_and_carry_pose():
    a, b = draw_shapes(600, 5, 0.55, 1.0), draw_shapes(600, 5, 0.55, 1.0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, draw_shapes(600, 6, 0.55, 1.0).images)
    counts = torch.bincount(a.labels, minlength=len(SHAPE_NAMES))
    assert counts.min() > 60
    assert a.images.shape == (600, 1, 28, 28) and a.images.dtype == torch.uint8
    pose = a.extras["pose"]
    assert pose.shape == (600, 4)
    # every shape lies inside the canvas: the border is dark
    border = torch.cat([a.images[:, 0, 0], a.images[:, 0, -1], a.images[:, 0, :, 0], a.images[:, 0, :, -1]], 1)
    assert border.max() == 0
    # the drawn centre of mass follows the pose's centre
    img = a.images[:, 0].float()
    ys, xs = torch.meshgrid(torch.arange(28.0) + 0.5, torch.arange(28.0) + 0.5, indexing="ij")
    cx, cy = (img * xs).sum((1, 2)) / img.sum((1, 2)), (img * ys).sum((1, 2)) / img.sum((1, 2))
    # every shape is drawn around its centroid (the ell and the triangle too), to within the pixel grid
    assert (cx - pose[:, 0]).abs().max() < 0.6 and (cy - pose[:, 1]).abs().max() < 0.6


def test_shapes_config_splits_differ_and_subset_applies():
    splits = ShapesConfig(train_size=200, test_size=50, subset=120).load_splits(Path("."))
    assert len(splits.train) == 120 and len(splits.test) == 50
    assert splits.classes == SHAPE_NAMES


def test_batches_cover_the_epoch_and_restart_at_any_step():
    data = ImageSet(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 4, 4).contiguous(),
                    torch.arange(100))
    batches = Batches(data, 16, shuffle=True, seed=1, shift=1)
    assert len(batches) == 7
    full = list(batches.epoch(3))
    labels = torch.cat([b.labels for b in full])
    assert sorted(labels.tolist()) == list(range(100))
    assert not torch.equal(labels, torch.cat([b.labels for b in batches.epoch(4)]))  # reshuffled per epoch
    tail = list(batches.epoch(3, start_step=4))
    for (x1, y1, _), (x2, y2, _) in zip(full[4:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, _, targets = full[0]
    assert targets is x  # one object per image: the reconstruction target is the input itself
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


def test_mnist_reads_idx_files_through_torchvision(tmp_path):
    root = write_mnist(tmp_path, n_train=50, n_test=20)
    splits = MNISTConfig().load_splits(root)
    assert splits.train.images.shape == (50, 1, 28, 28) and splits.test.images.shape == (20, 1, 28, 28)
    raw = (root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    assert np.array_equal(splits.train.images[:, 0].numpy().ravel(), np.frombuffer(raw[16:], np.uint8))


def test_mnist_missing_files_name_them_and_the_fix(tmp_path):
    with pytest.raises(DataError) as e:
        MNISTConfig().load_splits(tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "data.download=true" in msg and "CAPSX_DATA" in msg


def test_mnist_truncated_file_is_a_data_error(tmp_path):
    root = write_mnist(tmp_path, n_train=50, n_test=20)
    f = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match="could not be read"):
        MNISTConfig().load_splits(root)


@pytest.mark.mnist
def test_real_mnist_counts():
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set CAPSX_DATA to a folder holding MNIST/raw/")
    splits = MNISTConfig().load_splits(root)
    assert len(splits.train) == 60_000 and len(splits.test) == 10_000
    assert splits.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.bincount(splits.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.mnist
def test_small_cnn_learns_real_mnist(tmp_path):
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set CAPSX_DATA to a folder holding MNIST/raw/")
    from capsx.recipe import recipe_from_dict
    from capsx.track.tracker import NullTracker as NoTracking
    from capsx.train.device import resolve_device
    from capsx.train.loop import QuietReporter, Run, fit

    recipe = recipe_from_dict({
        "name": "real", "device": "cpu",
        "model": {"name": "convnet_small", "channels": [16, 32], "hidden": [128]},
        "data": {"name": "mnist", "subset": 3000, "test_subset": 1000, "batch_size": 50},
        "train": {"epochs": 3}, "optimizer": {"lr": 2e-3}, "schedule": {"name": "cosine"},
    }, "real")
    (tmp_path / "checkpoints").mkdir()
    result = fit(recipe, Run(resolve_device("cpu"), root, tmp_path, NoTracking("local"), QuietReporter()))
    assert result.final is not None and result.final.images == 1000
    assert result.final.accuracy > 0.90


def test_the_data_root_is_the_flag_then_the_recipes_then_capsx_data_then_dot_data(tmp_path, monkeypatch):
    from capsx.data import resolve_data_root
    from capsx.recipe import load_recipe

    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("model: {name: capsnet}\ndata: {name: mnist, root: ../mine}\n")
    recipe_root = load_recipe(recipe).data.root  # relative to the recipe file, not to where capsx runs
    assert recipe_root == str((tmp_path / "mine").resolve())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPSX_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "flag"), recipe_root) == (tmp_path / "flag").resolve()
    assert resolve_data_root(None, recipe_root) == (tmp_path / "mine").resolve()
    assert resolve_data_root(None, None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("CAPSX_DATA")
    assert resolve_data_root(None, None) == (tmp_path / "data").resolve()


def test_a_subset_is_a_seeded_random_draw_from_the_split():
    whole = ShapesConfig(train_size=200, test_size=50).load_splits(Path(".")).train
    a = ShapesConfig(train_size=200, test_size=50, subset=120).load_splits(Path(".")).train
    b = ShapesConfig(train_size=200, test_size=50, subset=120).load_splits(Path(".")).train
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, whole.images[:120])  # not simply the first 120
    kept = {bytes(img.numpy()) for img in whole.images}
    assert all(bytes(img.numpy()) in kept for img in a.images)  # drawn from the split, none made up
