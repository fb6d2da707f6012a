"""`capsx eval --pose`: the held-out linear readout against known values and a plain reference, the pose
targets of the data sets (angles as cos/sin of k x angle), and the command end to end into MLflow."""

import math

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data.pose import angle
from capsx.data.shapes import SHAPE_NAMES, ShapesConfig, draw_shapes
from capsx.jobs.pose import correlations, held_out_r2, readout
from tests.conftest import tiny_recipe

runner = CliRunner()


def test_an_exact_linear_relation_reads_out_with_r2_of_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [2.0, 1.0], [-1.0, 0.25]], dtype=torch.float64) + 7
    assert held_out_r2(x, y) == pytest.approx(1.0, abs=1e-12)


def test_features_unrelated_to_the_target_read_out_at_about_zero_or_below():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 1, generator=g)
    assert -0.3 < held_out_r2(x, y) < 0.05  # the held-out half pays for the fit's 17 unknowns


def test_held_out_r2_matches_a_plain_numpy_fit_on_the_same_halves():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(90, 3, generator=g, dtype=torch.float64)
    y = (x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.randn(90, 1, generator=g, dtype=torch.float64))
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0)).numpy()
    fit, score = order[:45], order[45:]
    a = np.hstack([x.numpy(), np.ones((90, 1))])
    w, *_ = np.linalg.lstsq(a[fit], y.numpy()[fit], rcond=None)
    resid = y.numpy()[score] - a[score] @ w
    expected = 1 - (resid ** 2).sum() / ((y.numpy()[score] - y.numpy()[score].mean(0)) ** 2).sum()
    assert held_out_r2(x, y) == pytest.approx(expected, abs=1e-12)


def test_too_few_images_for_the_unknowns_give_no_number():
    assert math.isnan(held_out_r2(torch.randn(30, 16), torch.randn(30, 1)))  # 15 fitted rows, 17 unknowns


def test_correlations_by_hand():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    y = torch.tensor([[2.0], [4.0], [6.0]])
    assert correlations(x, y).tolist() == [[pytest.approx(1.0)], [0.0]]  # a constant column correlates 0


def test_a_symmetric_shape_turned_by_its_symmetry_has_the_same_rotation_target():
    theta = torch.tensor([0.3, 0.3 + math.pi, 0.3 + 2 * math.pi / 3])
    rect = angle("rotation", theta[:2], torch.tensor([2, 2])).values
    tri = angle("rotation", theta[[0, 2]], torch.tensor([3, 3])).values
    assert torch.allclose(rect[0], rect[1], atol=1e-12) and torch.allclose(tri[0], tri[1], atol=1e-12)
    ring = angle("rotation", theta[:1], torch.tensor([0]))
    assert not bool(ring.valid[0])  # a ring has no angle


def test_shapes_pose_targets_are_the_drawn_pose():
    shapes = draw_shapes(60, seed=3, min_scale=0.55, max_scale=1.0)
    x, y, rotation, scale = ShapesConfig().pose(shapes)
    pose = shapes.extras["pose"].double()
    assert torch.equal(x.values[:, 0], pose[:, 0]) and torch.equal(scale.values[:, 0], pose[:, 3])
    ring = SHAPE_NAMES.index("ring")
    assert torch.equal(rotation.valid, shapes.labels != ring)
    ell = shapes.labels == SHAPE_NAMES.index("ell")  # no symmetry: cos and sin of the angle itself
    assert torch.allclose(rotation.values[ell, 0], torch.cos(pose[ell, 2]), atol=1e-12)


def test_readout_reads_each_images_own_class_capsule():
    """Class capsules where only the label's row holds the pose: it is read out exactly, per class."""
    shapes = draw_shapes(600, seed=4, min_scale=0.55, max_scale=1.0)
    quantities = ShapesConfig().pose(shapes)
    caps = torch.randn(600, 6, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    own = torch.cat([q.values for q in quantities], dim=1)  # (N, 5): x, y, cos, sin, scale
    caps[torch.arange(600), shapes.labels, :5] = own
    result = readout(caps, shapes.labels, quantities, SHAPE_NAMES, "class capsule (16-D)")
    ring = SHAPE_NAMES.index("ring")
    for c, row in enumerate(result.r2):
        for q, value in zip(result.quantities, row, strict=True):
            if q == "rotation" and c == ring:
                assert math.isnan(value)
            else:
                assert value == pytest.approx(1.0, abs=1e-9), (SHAPE_NAMES[c], q)
    assert result.mean == pytest.approx({"x": 1.0, "y": 1.0, "rotation": 1.0, "scale": 1.0}, abs=1e-9)
    assert [d[0] for d in result.dims[:2]] == ["x", "y"] and result.dims[0][1] == pytest.approx(1.0)


@pytest.mark.parametrize("model", [None, {"name": "convnet_small", "channels": [4, 8], "hidden": [16]}])
def test_eval_pose_prints_and_logs_the_mean_r2(workdir, model):
    recipe = workdir / "pose.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="pose", model=model, tracking={"pictures_every": 0},
                                                 data={"name": "shapes", "train_size": 96, "test_size": 240,
                                                       "batch_size": 16})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    res = runner.invoke(app, ["eval", "latest", "--pose"])
    assert res.exit_code == 0, res.output
    assert ("class capsule (8-D)" if model is None else "penultimate layer (16-D)") in res.output
    assert "R² rotation" in res.output and "mean over classes" in res.output
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pose").experiment_id])
    assert {"pose/r2/x", "pose/r2/y", "pose/r2/rotation", "pose/r2/scale"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pose/r2/x")] == [1]  # at the epoch


def test_eval_pose_on_data_without_a_pose_says_so_in_one_line(workdir, tiny_mnist):
    recipe = workdir / "mnist.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="m", data={"name": "mnist", "batch_size": 32},
                                                 tracking={"pictures_every": 0})))
    assert runner.invoke(app, ["train", str(recipe), "--data-root", str(tiny_mnist)]).exit_code == 0
    res = runner.invoke(app, ["eval", "latest", "--pose", "--data-root", str(tiny_mnist)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: --pose: mnist keeps no pose of its images; data sets that do: shapes (x, y, rotation, scale), "
        "smallnorb (azimuth, elevation, lighting)"]
