"""Batched transforms against plain references, MNIST on a 40x40 canvas, and the sweep's transforms."""

import pytest
import torch

from capsx.data import Batches, ImageSet
from capsx.data.mnist import MNISTConfig
from capsx.data.transforms import affine_matrices, centre_on_canvas, ink_box, translate, warp
from capsx.jobs.sweep import apply_transform, parse_sweep, transformed
from tests.conftest import write_mnist
from tests.test_data import _shift_reference


def test_translate_matches_plain_slicing_per_image():
    images = torch.randint(0, 256, (16, 2, 9, 7), dtype=torch.uint8)
    dx = torch.randint(-4, 5, (16,))
    dy = torch.randint(-4, 5, (16,))
    moved = translate(images, dx, dy)
    for i in range(16):
        assert torch.equal(moved[i], _shift_reference(images[i], int(dx[i]), int(dy[i])))


def _identity(n: int) -> tuple[torch.Tensor, ...]:
    return torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)


def test_warp_identity_and_whole_pixel_moves_are_exact():
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    assert torch.equal(warp(images, affine_matrices(*_identity(5))), images)
    r, s, k, _, _ = _identity(5)
    dx, dy = torch.tensor([1.0, -2, 0, 3, 0]), torch.tensor([0.0, 1, -3, 2, 0])
    assert torch.equal(warp(images, affine_matrices(r, s, k, dx, dy)), translate(images, dx.long(), dy.long()))


def test_rotating_by_90_degrees_is_rot90_counter_clockwise():
    images = torch.rand(3, 2, 10, 10)
    turned = warp(images, affine_matrices(torch.full((3,), 90.0), *_identity(3)[1:]))
    assert torch.allclose(turned, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)
    # the sweep's rotate is the same map
    assert torch.allclose(apply_transform(images, "rotate", 90), turned)


def test_a_sweep_turns_each_object_alone_with_its_two_object_image():
    """MultiMNIST's decoder targets (one digit each) must move with the image, or the reconstruction
    term compares a turned pair with unturned digits (and the shapes do not even match)."""
    g = torch.Generator().manual_seed(1)
    sources = torch.randint(0, 256, (4, 2, 1, 12, 12), dtype=torch.uint8, generator=g)
    pairs = ImageSet(sources.max(dim=1).values, torch.randint(0, 10, (4, 2), generator=g), {"sources": sources})
    turned = transformed(pairs, "rotate", 90.0)
    assert torch.equal(turned.images, torch.rot90(pairs.images, 1, dims=(2, 3)))
    assert torch.equal(turned.extras["sources"], torch.rot90(sources, 1, dims=(3, 4)))
    assert torch.equal(turned.labels, pairs.labels)
    images, _, targets = next(iter(Batches(turned, 4).epoch(0)))
    assert targets.shape == (4, 2, 1, 12, 12)


def test_scale_two_about_the_centre_doubles_the_ink_box():
    img = torch.zeros(1, 1, 20, 20, dtype=torch.uint8)
    img[0, 0, 8:12, 8:12] = 255  # a 4x4 square in the middle
    big = apply_transform(img, "scale", 2.0)
    top, bottom, left, right = (int(v) for v in ink_box(big > 128))
    assert (bottom - top + 1, right - left + 1) == (8, 8) and (top, left) == (6, 6)


def test_shear_moves_rows_in_proportion_to_their_height():
    img = torch.zeros(1, 1, 21, 21)
    img[0, 0, :, 10] = 1.0  # a vertical line through the centre column
    sheared = apply_transform(img, "shear", 0.5)  # x' = x + 0.5 y about the centre
    cols = (sheared[0, 0] * torch.arange(21.0)).sum(1) / sheared[0, 0].sum(1).clamp(min=1e-9)
    assert cols[10] == pytest.approx(10, abs=1e-4)  # the centre row stays
    assert cols[18] == pytest.approx(14, abs=1e-4) and cols[2] == pytest.approx(6, abs=1e-4)


def test_ink_box_finds_the_bounds_and_takes_an_empty_image_as_the_frame():
    images = torch.zeros(2, 1, 8, 9, dtype=torch.uint8)
    images[0, 0, 2, 3] = images[0, 0, 5, 7] = 1
    top, bottom, left, right = ink_box(images)
    assert (top.tolist(), bottom.tolist(), left.tolist(), right.tolist()) == ([2, 0], [5, 7], [3, 0], [7, 8])


def test_parse_sweep_includes_stop_when_the_steps_land_on_it():
    assert parse_sweep("rotate=-45:45:5").values == [float(v) for v in range(-45, 46, 5)]
    assert parse_sweep("scale=0.5:1.5:0.1").values == pytest.approx([0.5 + 0.1 * i for i in range(11)])
    assert parse_sweep("shift=0:5:2").values == [0.0, 2.0, 4.0]


def test_mnist_on_a_canvas_places_test_digits_by_seed_and_moves_training_digits_every_epoch(tmp_path):
    root = write_mnist(tmp_path, n_train=64, n_test=32)
    plain = MNISTConfig().load_splits(root)
    a = MNISTConfig(canvas=40).load_splits(root)
    assert a.train.images.shape == (64, 1, 40, 40) and a.test.images.shape == (32, 1, 40, 40)
    assert MNISTConfig(canvas=40).input_shape == (1, 40, 40) and MNISTConfig(canvas=40).train_shift == 6
    # training digits are stored centred: the 6-pixel border is empty, the digit unchanged
    assert torch.equal(a.train.images, centre_on_canvas(plain.train.images, 40))
    # test digits: the same places for the same seed, other places for another, no ink lost
    assert torch.equal(a.test.images, MNISTConfig(canvas=40).load_splits(root).test.images)
    other = MNISTConfig(canvas=40, placement_seed=1).load_splits(root).test.images
    assert not torch.equal(a.test.images, other)
    sums = plain.test.images.flatten(1).long().sum(1)
    assert torch.equal(a.test.images.flatten(1).long().sum(1), sums)
    top, _, left, _ = ink_box(a.test.images)
    top0, _, left0, _ = ink_box(centre_on_canvas(plain.test.images, 40))
    moves = torch.stack([left - left0, top - top0])
    assert moves.abs().max() <= 6 and len({tuple(m) for m in moves.T.tolist()}) > 10
    # the training batches move each digit anywhere on the canvas, differently each epoch
    batches = Batches(a.train, 64, shuffle=False, shift=MNISTConfig(canvas=40).train_shift)
    e0 = next(batches.epoch(0)).images
    e1 = next(batches.epoch(1)).images
    assert not torch.equal(e0, e1)
    assert torch.allclose(e0.flatten(1).sum(1), plain.train.images.flatten(1).float().sum(1) / 255, atol=1e-3)
