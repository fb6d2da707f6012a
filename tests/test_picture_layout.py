"""Every picture reads cleanly: each picture kind, drawn by its own job from a tiny seeded model with long
class names (smallNORB's, CIFAR-10's, a deliberately long one; two-digit pairs too), has no two texts on top
of each other and none past the canvas edge. The boxes are the ones canvas.py records as it draws each text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsx.data.imageset import ImageSet
from capsx.jobs.perturb import run_perturb
from capsx.jobs.pictures import Gallery
from capsx.jobs.reconstruct import run_reconstruct
from capsx.jobs.trained import TrainedRun
from capsx.jobs.visualize import run_activations, run_filters, run_routing, run_saliency, run_top_activating
from capsx.models import build_model
from capsx.pictures import canvas
from capsx.recipe import recipe_from_dict
from capsx.track.tracker import NullTracker
from capsx.train.checkpoint import Checkpoint
from capsx.train.state import TrainState
from tests.conftest import TINY_CAPSNET, tiny_recipe

LONG = "a-very-long-class-name-xx"
SMALLNORB = ["animal", "human", "airplane", "truck", "car"]
TEST_IMAGES = 1100  # past index 999: the top-activating picture's labels get 4-digit indices


@dataclass
class Named(TrainedRun):
    """A trained run whose classes go by other names (the layout is what is tested, not the data set)."""

    names: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.names or self.recipe.data.classes


def _run(tmp_path: Path, data: dict, names: list[str] | None = None, **model: object) -> Named:
    """An untrained tiny CapsNet (seeded) for `data`, its test split seeded noise with labels cycling through
    the classes: nearly every prediction is wrong, so the strips of mistakes are full."""
    raw = tiny_recipe(data=data, model={**TINY_CAPSNET, **model})
    recipe = recipe_from_dict(raw, "layout test")
    classes = recipe.data.classes
    torch.manual_seed(0)
    net = build_model(recipe.model, recipe.data.input_shape, len(classes), recipe.data.objects).eval()
    g = torch.Generator().manual_seed(0)
    shape = recipe.data.input_shape
    images = (torch.rand(TEST_IMAGES, *shape, generator=g) * 255).to(torch.uint8)
    images[20:1000] //= 8  # dim images between: the images that drive a unit most lie past index 999
    k = len(classes)
    if recipe.data.objects == 1:
        test = ImageSet(images, torch.arange(TEST_IMAGES) % k)
    else:  # two different digits per image, and each alone (what a decoder rebuilds)
        first = torch.arange(TEST_IMAGES) % k
        labels = torch.stack([first, (first + 1 + torch.arange(TEST_IMAGES) // k % (k - 1)) % k], dim=1)
        sources = torch.stack([images // 2, images // 3], dim=1)
        test = ImageSet(images, labels, {"sources": sources})
    ckpt = Checkpoint(recipe.to_dict(), net.state_dict(), TrainState(epoch=1), None, path=tmp_path / "best.pt")
    return Named(recipe, net, ckpt, torch.device("cpu"), tmp_path, tmp_path, None, preloaded_test=test,
                 names=names or [])


def _pictures(t: Named, tmp_path: Path) -> dict[str, canvas.Picture]:
    """Every picture kind this run has, drawn by the jobs the commands run."""
    out = Gallery(t, tmp_path / "pictures", NullTracker(""), lambda *a, **k: None, step=1)
    if t.objects > 1:
        run_reconstruct(t, out, count=10, misclassified=10, force_class=None, image=None, error_images=30)
        return out.published
    run_reconstruct(t, out, count=10, misclassified=10, force_class=None, image=None, error_images=30)
    run_reconstruct(t, out, count=6, misclassified=0, force_class=0, image=None, error_images=0)
    run_perturb(t, out, dims=None, value_range=(-0.25, 0.25), steps=11, cls=None, samples=1, image=None,
                class_mean=False)
    run_perturb(t, out, dims=[3], value_range=(-0.25, 0.25), steps=11, cls=None, samples=4, image=None,
                class_mean=False)
    run_filters(t, out, layer=None, in_channel=None)
    run_activations(t, out, layer=None, index=0, image=None)
    run_routing(t, out, index=0, image=None)
    run_saliency(t, out, index=0, image=None, cls=None, method="integrated-gradients", layer=None, steps=4)
    run_saliency(t, out, index=0, image=None, cls=None, method="grad-cam", layer=None, steps=4)
    run_top_activating(t, out, layer=None, channel=0, k=16, limit=TEST_IMAGES)
    return out.published


def _problems(name: str, picture: canvas.Picture) -> list[str]:
    """What a reader would trip over: a text cut at the canvas edge, two texts on top of each other."""
    h, w = picture.pixels.shape[:2]
    boxes = picture.texts
    found = [f"{name}: {b.text!r} at {b.left, b.top, b.right, b.bottom} leaves the {w}x{h} canvas"
             for b in boxes if b.left < 0 or b.top < 0 or b.right > w or b.bottom > h]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.left < b.right and b.left < a.right and a.top < b.bottom and b.top < a.bottom:
                found.append(f"{name}: {a.text!r} {a.left, a.top, a.right, a.bottom} overlaps {b.text!r} "
                             f"{b.left, b.top, b.right, b.bottom}")
    return found


EXPECTED = {"recon_test.png", "recon_wrong_pred.png", "recon_wrong_label.png", "recon_test_as0.png",
            "perturb_dim3.png", "filters_conv1.png", "activations_conv1.png", "activations_primary_lengths.png",
            "routing_couplings.png", "saliency_integrated-gradients_class{p}.png", "saliency_grad-cam_class{p}.png",
            "top_conv1_0.png"}
SHARED_SCALE = ["activations_conv1.png", "activations_primary_lengths.png", "routing_couplings.png", "saliency_"]


@pytest.mark.parametrize("data,names,model", [
    ({"name": "smallnorb", "augment": {"crop": 32}}, None, {"primary_types": 8}),  # the grid of 8 types
    ({"name": "cifar10", "augment": {"crop": 24}}, None, {}),
    ({"name": "shapes"}, [LONG, "ellipse", "triangle", "cross", "ring", "ell"], {}),
], ids=["smallnorb", "cifar10", "long-name"])
def test_every_picture_kind_has_no_overlapping_or_cut_text(tmp_path, data, names, model):
    t = _run(tmp_path, data, names, **model)
    pictures = _pictures(t, tmp_path)
    kinds = {re.sub(r"class\d+\.png$", "class{p}.png", n) for n in pictures}
    assert {n for n in kinds if not n.startswith("perturb_sample")} >= EXPECTED, sorted(pictures)
    assert any(n.startswith("perturb_sample_class") for n in pictures), sorted(pictures)  # Fig. 4: a row per dim
    problems = [p for name, picture in pictures.items() for p in _problems(name, picture)]
    assert not problems, "\n".join(problems)
    texts = {name: " | ".join(b.text for b in picture.texts) for name, picture in pictures.items()}
    for name, picture in pictures.items():
        assert picture.texts, name  # every picture says what it shows
        assert isinstance(picture.pixels, np.ndarray) and picture.pixels.dtype == np.uint8, name
        on_disk = np.asarray(Image.open(tmp_path / "pictures" / name).convert("RGB"))
        assert np.array_equal(on_disk, picture.pixels), name  # what was measured is what was saved
    for name in t.classes:  # every class name is written whole, if on two lines (one cut short would not match)
        for kind in ("recon_test.png", "routing_couplings.png"):
            assert name in "".join(b.text for b in pictures[kind].texts), (name, texts[kind])
    # the maps that share one colour scale show it: a bar with both ends written beside it
    for prefix in SHARED_SCALE:
        for name in (n for n in pictures if n.startswith(prefix)):
            assert pictures[name].scales, (name, texts[name])
            for scale in pictures[name].scales:
                assert {scale.low, scale.high} <= {b.text for b in pictures[name].texts}, (name, scale)
    # Fig. 4 as in the paper: 11 columns, +0.00 in the middle, never -0.00
    perturb = " | ".join(b.text for b in pictures["perturb_dim3.png"].texts)
    assert "+0.00" in perturb and "-0.00" not in perturb
    # the top-activating picture's labels: each index whole (4 digits past 999), its score beside it
    top = [b.text for b in pictures["top_conv1_0.png"].texts]
    assert sum(bool(re.fullmatch(r"#1\d{3}", s)) for s in top) >= 8, top


def test_the_tile_grid_of_n_types_has_no_stray_tile(tmp_path):
    t = _run(tmp_path, {"name": "smallnorb", "augment": {"crop": 32}}, None, primary_types=8)
    out = Gallery(t, tmp_path / "pictures", NullTracker(""), lambda *a, **k: None, step=1)
    run_activations(t, out, layer=None, index=0, image=None)
    lengths = out.published["activations_primary_lengths.png"]
    types = sorted(b.text for b in lengths.texts if b.text.startswith("type "))
    assert types == [f"type {k}" for k in range(8)], types  # one labelled tile per capsule type
    assert canvas.grid_columns(8) == 4 and canvas.grid_columns(64) == 8 and canvas.grid_columns(10) == 5
    # a count with no even layout leaves its unused cells as blank page, not as a tile
    tiles = [np.full((4, 4), 200, np.uint8)] * 7
    g = canvas.grid(tiles, canvas.grid_columns(7))
    assert g.shape == (3 * 6, 3 * 6, 3)
    assert (g[12:, 6:] == 255).all() and (g[13:17, 1:5] == 200).all()


def test_fig5_two_digit_pictures_have_no_overlapping_or_cut_text(tmp_path):
    t = _run(tmp_path, {"name": "multimnist", "canvas": 36, "pairs_per_digit": 1}, None)
    pictures = _pictures(t, tmp_path)
    assert {"recon_pairs.png", "recon_pairs_wrong_pred.png", "recon_pairs_wrong_label.png"} <= set(pictures)
    problems = [p for name, picture in pictures.items() for p in _problems(name, picture)]
    assert not problems, "\n".join(problems)


def test_captions_wrap_to_the_picture_and_never_leave_it():
    lines = ["a caption much longer than the sixty pixels of its picture", LONG]
    picture = canvas.caption_above(np.zeros((20, 60, 3), np.uint8), lines)
    assert not _problems("caption", picture) and len(picture.texts) >= 6
    assert picture.pixels.shape == (picture.texts[-1].bottom + 3 + 20, 60, 3)  # as wide as the image, no wider
    # every word is there, in order: broken at spaces, and after the hyphens of a word wider than the picture
    assert "".join(b.text for b in picture.texts).replace(" ", "") == "".join(lines).replace(" ", "")
    words = canvas.caption_above(np.zeros((20, 40, 3), np.uint8), ["unbreakable_word_wider_than_forty"])
    assert words.width > 40 and not _problems("caption", words)  # widened rather than cut
