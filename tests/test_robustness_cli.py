"""End to end into a real MLflow store: models trained on a 40x40 canvas evaluated on affNIST (a
test-written file) and affine-mnist, a rotation sweep of a CapsNet and a CNN in one plot, the paper
check inside and outside its band, and `train --seeds` with nested runs."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from capsx.errors import CapsxError
from capsx.paper import PaperNumber, check_rows
from tests.conftest import TINY_CAPSNET, tiny_recipe, write_mnist
from tests.test_affnist import ell_images, write_affnist

runner = CliRunner()
CNN = {"name": "convnet_small", "channels": [8, 16], "hidden": [32]}


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CapsNet and a tiny CNN trained on digits placed on a 40x40 canvas (an epoch of 3 steps each)."""
    tmp = tmp_path_factory.mktemp("robust")
    root = write_mnist(tmp / "data", n_train=96, n_test=64)
    uri = f"sqlite:///{tmp}/runs/mlflow.db"
    common = ["--data-root", root, "--runs-dir", tmp / "runs", "--tracking-uri", uri]
    ids = {}
    for name, model, paper in (
        ("caps40", dict(TINY_CAPSNET), [
            {"metric": "error", "value": 50, "band": [0, 100], "source": "anything goes"},
            # 64 test images: accuracy moves in steps of 1.5625%, never into this band
            {"metric": "accuracy", "value": 50, "band": [50.1, 50.2], "dataset": "affine-mnist",
             "source": "a band no 64-image measurement can meet"},
        ]),
        ("cnn40", CNN, []),
    ):
        recipe = tiny_recipe(data={"name": "mnist", "canvas": 40, "batch_size": 32}, model=model, paper=paper)
        recipe["name"] = name
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        res = invoke("train", path, *common)
        assert res.exit_code == 0, res.output
        ids[name] = next((tmp / "runs" / name).glob("*/run.json")).parent.name
    return tmp, root, uri, common, ids


def test_eval_on_affnist_and_affine_mnist_logs_under_the_set_name(trained):
    tmp, root, uri, common, ids = trained
    images, _ = ell_images(10)
    labels = np.arange(10, dtype=np.uint8)
    write_affnist(root / "affNIST" / "test.mat", images, labels)
    res = invoke("eval", ids["cnn40"], "--dataset", "affnist", *common)
    assert res.exit_code == 0, res.output
    assert "(affnist)" in res.output and "test images" in res.output and "10" in res.output
    client = MlflowClient(tracking_uri=uri)
    assert len(client.get_metric_history(ids["cnn40"], "eval/affnist/error")) == 1
    res = invoke("eval", ids["caps40"], "--dataset", "affine-mnist", *common)
    assert res.exit_code == 0, res.output
    [error] = client.get_metric_history(ids["caps40"], "eval/affine-mnist/error")
    assert error.step == 1 and 0 <= error.value <= 1
    # the eval set is the same every time: evaluating again gives the same error
    assert invoke("eval", ids["caps40"], "--dataset", "affine-mnist", *common).exit_code == 0
    again = client.get_metric_history(ids["caps40"], "eval/affine-mnist/error")
    assert {m.value for m in again} == {error.value}
    # --images: a seeded subset, the same every time
    outs = [invoke("eval", ids["caps40"], "--dataset", "affine-mnist", "--images", "10", "--no-log", *common).output
            for _ in range(2)]
    assert "│ 10 " in outs[0] and outs[0].count("%") == outs[1].count("%")
    assert [line for line in outs[0].splitlines() if "test error" in line] == \
        [line for line in outs[1].splitlines() if "test error" in line]


def test_rotation_sweep_of_two_runs_is_a_metric_series_a_table_and_one_plot(trained):
    tmp, root, uri, common, ids = trained
    res = invoke("eval", ids["caps40"], ids["cnn40"], "--sweep", "rotate=-90:90:45", *common)
    assert res.exit_code == 0, res.output
    assert "test accuracy under rotate" in res.output and "caps40 (capsnet" in res.output
    assert "cnn40 (convnet_small" in res.output
    client = MlflowClient(tracking_uri=uri)
    for name, run_id in ids.items():
        acc = sorted(client.get_metric_history(run_id, "sweep/rotate/acc"), key=lambda m: m.step)
        values = sorted(client.get_metric_history(run_id, "sweep/rotate/value"), key=lambda m: m.step)
        assert [m.step for m in acc] == [0, 1, 2, 3, 4], name
        assert [m.value for m in values] == [-90, -45, 0, 45, 90]
        # at 0 degrees the sweep is the plain test evaluation
        invoke("eval", run_id, *common)
        [plain] = client.get_metric_history(run_id, "eval/error")
        assert acc[2].value == pytest.approx(1 - plain.value, abs=1e-12), name
        assert {a.path for a in client.list_artifacts(run_id, "sweep")} == {"sweep/sweep-rotate.png"}
        png = next((tmp / "runs" / name).glob("*/pictures/sweep-rotate.png"))
        from PIL import Image

        with Image.open(png) as im:
            assert im.size[0] > 400 and im.mode == "RGB"


def test_paper_check_passes_inside_the_band_and_exits_1_outside(trained):
    tmp, root, uri, common, ids = trained
    res = invoke("eval", ids["caps40"], "--check", *common)
    assert res.exit_code == 0, res.output
    assert "against the paper" in res.output and "within" in res.output and "anything goes" in res.output
    res = invoke("eval", ids["caps40"], "--dataset", "affine-mnist", "--check", *common)
    assert res.exit_code == 1, res.output
    assert "outside" in res.output and "error: --check: accuracy" in res.output
    assert "outside the paper's band [50.1, 50.2]%" in res.output
    client = MlflowClient(tracking_uri=uri)
    checks = client.get_metric_history(ids["caps40"], "eval/affine-mnist/paper_check/accuracy")
    assert checks and checks[-1].value == 0.0
    # a run whose recipe has no paper section, or none for the data set asked, says so before evaluating
    res = invoke("eval", ids["cnn40"], "--check", *common)
    assert res.exit_code == 2 and "has no `paper:` section" in res.output, res.output
    with pytest.raises(CapsxError, match=r"no paper number for 'affnist' \(it has: affine-mnist, test\)"):
        check_rows([PaperNumber(metric="error", value=1, band=[0, 2], source="s", dataset=d)
                    for d in ("test", "affine-mnist")], "affnist", 0.01)


def test_train_with_seeds_nests_a_run_per_seed_and_logs_mean_and_std(workdir):
    recipe = workdir / "seeds.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model=CNN, train={"epochs": 3, "seed": 0})))
    res = invoke("train", recipe, "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    assert "2 seeds" in res.output and "mean +- std over 2 seeds" in res.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["capsx.seeds"] == "0,1"
    assert "capsx.seed" not in parent.data.tags
    assert parent.data.params["train.seed"] == "0,1"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["capsx.seed"] for c in children) == ["0", "1"]
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == ["tiny seed 0", "tiny seed 1"]
    finals = [c.data.metrics["test/error"] for c in children]  # the latest value: the final epoch's
    mean = sum(finals) / 2
    std = math.sqrt(sum((x - mean) ** 2 for x in finals))  # n - 1 = 1
    assert parent.data.metrics["seeds/test_error_mean"] == pytest.approx(mean, abs=1e-12)
    assert parent.data.metrics["seeds/test_error_std"] == pytest.approx(std, abs=1e-12)
    assert parent.data.metrics["seeds/count"] == 2
    bests = [min(m.value for m in client.get_metric_history(c.info.run_id, "test/error")) for c in children]
    best_mean = sum(bests) / 2
    assert parent.data.metrics["seeds/best_test_error_mean"] == pytest.approx(best_mean, abs=1e-12)
    assert parent.data.metrics["seeds/best_test_error_std"] == pytest.approx(
        math.sqrt(sum((x - best_mean) ** 2 for x in bests)), abs=1e-12)
    assert f"{100 * mean:.2f}% +- {100 * std:.2f}" in res.output
    # the two seeds really trained differently: their losses (not their timings) differ
    assert len({c.data.metrics["train/loss"] for c in children}) == 2


def test_seeds_need_distinct_integers(workdir: Path):
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model=CNN)))
    assert "expected a comma-separated list of integers" in invoke("train", recipe, "--seeds", "0,a").output
    assert "a seed is repeated" in invoke("train", recipe, "--seeds", "1,1").output
