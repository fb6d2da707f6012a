"""MultiMNIST: the generator, the two-object loss and accuracy, and train + reconstruct end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data import Batches
from capsx.data.imageset import ImageSet
from capsx.data.multimnist import MultiMNISTConfig, PairSet, place
from capsx.data.transforms import ink_box
from capsx.errors import RecipeError
from capsx.models import MODELS, ModelOutput, build_model
from capsx.recipe import recipe_from_dict
from capsx.train.losses import BinaryCrossEntropyConfig, MarginLossConfig
from capsx.train.metrics import EvalResult, all_right
from tests.conftest import TINY_CAPSNET, real_mnist_root, tiny_recipe, write_mnist


def _pairs(tmp_path: Path, **fields: object):
    root = write_mnist(tmp_path, n_train=200, n_test=60)
    return MultiMNISTConfig(**fields).load_splits(root)


def test_same_seed_same_bytes_other_seed_other_pairs(tmp_path):
    a = _pairs(tmp_path, seed=3, pairs_per_digit=5)
    b = _pairs(tmp_path, seed=3, pairs_per_digit=5)
    c = _pairs(tmp_path, seed=4, pairs_per_digit=5)
    idx = torch.tensor([0, 1, 7, 999, 523])
    for split in ("train", "test"):
        xa, ya, sa = getattr(a, split).take(idx % len(getattr(a, split)))
        xb, yb, sb = getattr(b, split).take(idx % len(getattr(b, split)))
        assert xa.numpy().tobytes() == xb.numpy().tobytes() and torch.equal(ya, yb) and torch.equal(sa, sb)
    assert not torch.equal(a.train.take(idx)[0], c.train.take(idx)[0])
    # An example depends on its index only, not on which batch it is made in.
    whole = a.test.take(torch.arange(len(a.test)))[0]
    assert torch.equal(whole[17:23], a.test.take(torch.arange(17, 23))[0])
    assert len(a.train) == 200 * 5 and len(a.test) == 60


def test_class_pairs_always_differ_and_partners_come_from_the_same_split(tmp_path):
    splits = _pairs(tmp_path, pairs_per_digit=20)
    train = splits.train
    assert isinstance(train, PairSet)
    idx = torch.arange(len(train))
    first, second, shifts = train.pairs(idx)
    labels = train.take(idx)[1]
    assert (labels[:, 0] != labels[:, 1]).all()
    assert second.max() < len(train.digits)  # indices into this split's digits
    # Every training digit comes first once per 200 examples; partners of every class appear.
    assert sorted(first[:200].tolist()) == list(range(200))
    assert set(labels[:, 1].tolist()) == set(train.digit_labels.tolist())
    assert shifts.min() == -4 and shifts.max() == 4


def test_the_two_source_digits_are_recoverable(tmp_path):
    test = _pairs(tmp_path, max_shift=6).test  # the paper's reference generator's shift
    assert isinstance(test, PairSet)
    idx = torch.arange(40)
    merged, labels, sources = test.take(idx)
    first, second, shifts = test.pairs(idx)
    assert merged.shape == (40, 1, 36, 36) and sources.shape == (40, 2, 1, 36, 36)
    assert torch.equal(labels, torch.stack([test.digit_labels[first], test.digit_labels[second]], 1))
    # The merged image is the clipped sum of the two sources ...
    assert torch.equal(merged, (sources[:, 0].int() + sources[:, 1].int()).clamp(max=255).to(torch.uint8))
    # ... and each source is its MNIST digit, moved by its own shift: cut back out of the canvas
    # (the 6-pixel shift can push a digit's empty border off a 36 canvas, never its ink).
    for j, which in enumerate((first, second)):
        for b in range(40):
            dx, dy = shifts[b, j].tolist()
            top, left = 4 + dy, 4 + dx
            y0, x0 = max(0, top), max(0, left)
            y1, x1 = min(36, top + 28), min(36, left + 28)
            digit = test.digits[which[b], 0]
            assert torch.equal(sources[b, j, 0, y0:y1, x0:x1], digit[y0 - top:y1 - top, x0 - left:x1 - left])
            outside = sources[b, j, 0].clone()
            outside[y0:y1, x0:x1] = 0
            assert outside.sum() == 0


def test_place_by_hand():
    digit = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    digit[0, 0, 0, 0] = 7
    out = place(digit, torch.tensor([[2, -3]]), canvas=36, pad=4, max_shift=4)  # dx = 2, dy = -3
    assert out.shape == (1, 1, 36, 36) and out.sum() == 7 and out[0, 0, 4 - 3, 4 + 2] == 7


def test_mean_box_overlap_of_nominal_20x20_boxes_matches_its_expectation(tmp_path):
    """The paper's 'bounded in a 20x20 box ... 80% overlap': with two independent uniform shifts in
    [-4, 4] per axis, the offset D = s1 - s2 has E|D| = (9^2 - 1) / (3 * 9) = 80/27, so two 20x20 boxes
    overlap by (1 - E|D| / 20)^2 = 72.6% of their area on average. The generator's shifts give that."""
    train = _pairs(tmp_path, pairs_per_digit=100).train
    assert isinstance(train, PairSet)
    _, _, shifts = train.pairs(torch.arange(20_000))
    offset = (shifts[:, 0] - shifts[:, 1]).abs().float()  # (N, 2) per axis
    overlap = ((20 - offset) / 20).prod(dim=1).mean().item()
    expected = (1 - 80 / 27 / 20) ** 2
    assert abs(overlap - expected) < 0.005, (overlap, expected)


def bounding_boxes(images: torch.Tensor) -> torch.Tensor:
    """(N, [1,] H, W) digits -> (N, 4) (top, left, bottom, right), exclusive, of their ink."""
    top, bottom, left, right = ink_box(images.reshape(len(images), 1, *images.shape[-2:]))
    return torch.stack([top, left, bottom + 1, right + 1], dim=1)


def box_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) intersection area of boxes (N, 4) over the smaller box's area: 1 when one covers the other."""
    h = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    w = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).minimum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return (h * w).float() / area.clamp(min=1).float()


@pytest.mark.mnist
def test_mean_box_overlap_on_real_mnist(capsys):
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found under $CAPSX_DATA or ../shared/data")
    test = MultiMNISTConfig().load_splits(root).test
    _, _, sources = test.take(torch.arange(len(test)))
    first, second = bounding_boxes(sources[:, 0]), bounding_boxes(sources[:, 1])
    overlap = box_overlap(first, second).mean().item()  # intersection over the smaller box
    h = (torch.minimum(first[:, 2], second[:, 2]) - torch.maximum(first[:, 0], second[:, 0])).clamp(min=0)
    w = (torch.minimum(first[:, 3], second[:, 3]) - torch.maximum(first[:, 1], second[:, 1])).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = (h * w / (area(first) + area(second) - h * w)).float().mean().item()
    with capsys.disabled():
        print(f"\nMultiMNIST test pairs (10,000, shift 4): mean tight bounding-box overlap "
              f"{100 * overlap:.1f}% of the smaller box, IoU {100 * iou:.1f}%")
    assert overlap == pytest.approx(0.728, abs=0.0005) and iou == pytest.approx(0.464, abs=0.0005)  # the README's


def test_margin_loss_two_hot_and_summed_reconstructions_by_hand():
    lengths = torch.tensor([[0.95, 0.5, 0.05, 0.2]])
    labels = torch.tensor([[1, 0]])  # classes 0 and 1 present
    recon = torch.zeros(1, 2, 1, 2, 2)
    targets = torch.zeros(1, 2, 1, 2, 2)
    targets[0, 0, 0, 0, 0] = 1.0  # digit one: one pixel off by 1
    targets[0, 1, 0, 1, :] = 0.5  # digit two: two pixels off by 0.5
    out = ModelOutput(scores=lengths, reconstruction=recon)
    terms = MarginLossConfig(recon_weight=0.1)(out, targets, labels)
    # present 0: max(0, 0.9 - 0.95) = 0; present 1: (0.9 - 0.5)^2 = 0.16;
    # absent 2: 0.5 * max(0, 0.05 - 0.1)^2 = 0; absent 3: 0.5 * (0.2 - 0.1)^2 = 0.005
    assert terms.parts["margin_loss"].item() == pytest.approx(0.165)
    assert terms.parts["recon_loss"].item() == pytest.approx(1.0 + 2 * 0.25)  # the sum over both digits
    assert terms.total.item() == pytest.approx(0.165 + 0.1 * 1.5)


def test_binary_cross_entropy_two_hot_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    terms = BinaryCrossEntropyConfig()(ModelOutput(scores=logits), torch.zeros(1), torch.tensor([[0, 1]]))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -math.log(sig(2.0)) - math.log(sig(0.0)) - math.log(1 - sig(-1.0))
    assert terms.total.item() == pytest.approx(expected, rel=1e-6)
    # One label per image: the same loss against a one-hot target.
    single = BinaryCrossEntropyConfig()(ModelOutput(scores=logits), torch.zeros(1), torch.tensor([2]))
    assert single.total.item() == pytest.approx(-math.log(1 - sig(2.0)) - math.log(1 - sig(0.0))
                                                - math.log(sig(-1.0)), rel=1e-6)


def test_both_right_accuracy_by_hand():
    scores = torch.tensor([
        [0.9, 0.8, 0.1, 0.0],  # top two {0, 1}, labels {1, 0}: right (order does not matter)
        [0.9, 0.1, 0.8, 0.0],  # top two {0, 2}, labels {0, 1}: one wrong
        [0.1, 0.2, 0.8, 0.9],  # top two {3, 2}, labels {0, 1}: both wrong
        [0.1, 0.2, 0.8, 0.9],  # top two {3, 2}, labels {2, 3}: right
    ])
    labels = torch.tensor([[1, 0], [0, 1], [0, 1], [2, 3]])
    preds = ModelOutput(scores=scores).top(2)
    assert all_right(labels, preds).tolist() == [True, False, False, True]
    result = EvalResult.from_predictions(0.0, {}, labels, preds, ["a", "b", "c", "d"])
    assert result.images == 4 and result.accuracy == 0.5 and result.error == 0.5
    assert result.object_accuracy == 5 / 8  # digits found: 2 + 1 + 0 + 2 of 8
    # Labels are matched to the prediction that found them, the rest in order: row 2 puts (1 -> 2).
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for true, pred in [(0, 0), (1, 1), (0, 0), (1, 2), (0, 2), (1, 3), (2, 2), (3, 3)]:
        expected[true, pred] += 1
    assert torch.equal(result.confusion, expected)
    metrics = result.as_metrics("test")
    assert metrics["test/error"] == 0.5 and metrics["test/object_acc"] == 5 / 8


def test_capsnet_sizes_itself_for_36x36_and_decodes_each_digit(tmp_path):
    model = build_model(MODELS.get("capsnet")(), (1, 36, 36), 10, objects=2)
    assert model.primary_grid == (32, 10, 10)  # 36 -> Conv1 28 -> PrimaryCaps (28 - 9) // 2 + 1 = 10
    assert model.class_caps.weight.shape == (32 * 10 * 10, 10, 16, 8)
    small = build_model(MODELS.get("capsnet")(**TINY_CAPSNET), (1, 36, 36), 10, objects=2).eval()
    x = torch.rand(3, 1, 36, 36)
    out = small(x)
    assert out.reconstruction is not None and out.reconstruction.shape == (3, 2, 1, 36, 36)
    top = out.top(2)
    for j in range(2):  # each slot is the decoding of that capsule alone
        assert torch.allclose(out.reconstruction[:, j], small.reconstruct(out.capsules, top[:, j]), atol=1e-6)
    trained = small(x, torch.tensor([[1, 2], [3, 4], [5, 6]]))
    assert torch.allclose(trained.reconstruction[:, 1], small.reconstruct(out.capsules, torch.tensor([2, 4, 6])),
                          atol=1e-6)


def test_batches_of_pairs_carry_both_digits_as_targets(tmp_path):
    train = _pairs(tmp_path, pairs_per_digit=3).train
    batches = Batches(train, 64, shuffle=True, seed=1)
    seen = torch.cat([b.labels for b in batches.epoch(0)])
    assert len(seen) == len(train) == 600
    x, y, targets = next(iter(batches.epoch(0)))
    assert x.shape == (64, 1, 36, 36) and y.shape == (64, 2) and targets.shape == (64, 2, 1, 36, 36)
    assert torch.allclose(x, (targets[:, 0] + targets[:, 1]).clamp(max=1), atol=1e-6)
    # The shuffled order is a permutation, different per epoch, and the same when asked again.
    order = train.shuffled(5)[0:600]
    assert sorted(order.tolist()) == list(range(600)) and torch.equal(order, train.shuffled(5)[0:600])
    assert not torch.equal(order, train.shuffled(6)[0:600])


def test_recipe_checks_and_defaults(tmp_path):
    cnn = recipe_from_dict(tiny_recipe(data={"name": "multimnist"}, model={"name": "convnet_small"}), "r.yaml")
    assert cnn.loss_config.name == "binary_cross_entropy" and cnn.data.input_shape == (1, 36, 36)
    with pytest.raises(RecipeError, match="loss.name: cross_entropy"):
        recipe_from_dict(tiny_recipe(data={"name": "multimnist"}, model={"name": "convnet_small"},
                                     loss={"name": "cross_entropy"}), "r.yaml")
    with pytest.raises(RecipeError, match="data: pad 9: .* expected pad <= canvas - 28 = 8"):
        recipe_from_dict(tiny_recipe(data={"name": "multimnist", "pad": 9}), "r.yaml")
    with pytest.raises(RecipeError, match="augment.shift: expected 0"):
        recipe_from_dict(tiny_recipe(data={"name": "multimnist", "augment": {"shift": 2}}), "r.yaml")


def test_the_recipes_load():
    from capsx.recipe import load_recipe
    from tests.conftest import REPO

    caps = load_recipe(REPO / "recipes" / "multimnist.yaml")
    cnn = load_recipe(REPO / "recipes" / "multimnist-cnn.yaml")
    assert caps.data.name == cnn.data.name == "multimnist"
    assert caps.loss_config.name == "margin" and cnn.loss_config.name == "binary_cross_entropy"


def test_train_then_reconstruct_into_a_real_mlflow_store(workdir):
    """Tiny CapsNet and CNN on test-written MNIST; the run records the generator; Fig. 5 is written and logged."""
    root = write_mnist(workdir / "data", n_train=64, n_test=40)
    recipe = tiny_recipe(data={"name": "multimnist", "pairs_per_digit": 2, "max_shift": 6, "seed": 7,
                               "batch_size": 32, "eval_batch_size": 16},
                         model=dict(TINY_CAPSNET))
    path = workdir / "mm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(path), "--data-root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    tags = run.data.tags  # the generator's settings the recipe chose; its defaults are in recipe.yaml
    assert tuple(tags[f"recipe.data.{k}"] for k in ("name", "seed", "max_shift", "pairs_per_digit")) == \
        ("multimnist", "7", "6", "2")
    logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(workdir))).read_text())
    assert {k: logged["data"][k] for k in ("seed", "canvas", "pad", "max_shift", "pairs_per_digit",
                                           "test_pairs_per_digit")} == \
        {"seed": 7, "canvas": 36, "pad": 4, "max_shift": 6, "pairs_per_digit": 2, "test_pairs_per_digit": 1}
    assert tags["data.train_examples"] == "128" and tags["data.test_examples"] == "40"
    for key in ("test/error", "test/acc", "test/object_acc", "train/recon_loss", "test/recon_loss"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key

    res = runner.invoke(app, ["eval", "latest", "--data-root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0 and "objects found" in res.output and "digits" in res.output, res.output
    assert client.get_metric_history(run.info.run_id, "eval/object_acc")

    res = runner.invoke(app, ["reconstruct", "--count", "6", "--error-images", "40", "--misclassified", "3",
                              "--data-root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "not both right" in res.output
    pictures = next((workdir / "runs").glob("tiny/*/pictures"))
    overlay = np.asarray(Image.open(pictures / "recon_pairs.png"))
    assert overlay.ndim == 3 and overlay.shape[0] > 2 * 2 * 36
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("recon/pairs", "recon/pairs_misclassified", "recon/pairs_misclassified_as_label"):
        assert any(f"images/{key.replace('/', '~')}" in p for p in logged), (key, logged)  # MLflow writes / as ~
    assert client.get_metric_history(run.info.run_id, "recon/mean_sse")

    res = runner.invoke(app, ["reconstruct", "--force-class", "3", "--data-root", str(root)])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: --force-class: not available for a multimnist run (its images hold two digits; both predicted "
        "ones are decoded)"], res.output

    cnn = dict(recipe, name="tiny-cnn", model={"name": "convnet_small", "channels": [4, 8], "hidden": [16]})
    path.write_text(yaml.safe_dump(cnn))
    res = runner.invoke(app, ["train", str(path), "--data-root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "test error" in res.output


def test_overlay_colours_each_digit():
    from capsx.pictures.canvas import GREEN, RED, colour_overlay

    base = torch.zeros(1, 1, 2, 2)
    layers = torch.zeros(1, 2, 1, 2, 2)
    layers[0, 0, 0, 0, 0] = 1.0
    layers[0, 1, 0, 1, 1] = 1.0
    img = colour_overlay(base, layers, (RED, GREEN))
    assert tuple(img[0, 0, 0]) == RED and tuple(img[0, 1, 1]) == GREEN and tuple(img[0, 0, 1]) == (0, 0, 0)


def test_imageset_head_keeps_sources():
    images = torch.zeros(5, 1, 4, 4, dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(5, 2, dtype=torch.int64), {"sources": torch.zeros(5, 2, 1, 4, 4,
                                                                                          dtype=torch.uint8)})
    head = data.head(3)
    assert len(head) == 3 and head.extras["sources"].shape == (3, 2, 1, 4, 4)
