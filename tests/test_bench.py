"""`capsx bench` runs both paths and reports what it promises (the figures themselves are for `make bench`)."""

import json

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import REPO


def test_bench_json_has_the_promised_keys_and_logs_to_mlflow(workdir):
    res = CliRunner().invoke(app, ["bench", str(REPO / "recipes" / "mnist-capsnet.yaml"), "--rounds", "1",
                                   "--steps", "1", "--batch", "32", "--infer-batch", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("train_images_per_s", "infer_images_per_s", "peak_rss_mb", "gflops_achieved", "matmul_peak_gflops",
                "reference_train_images_per_s", "train_speedup", "infer_speedup"):
        assert key in out, key
    assert out["train_images_per_s"] > 0 and out["matmul_peak_gflops"] > 0
    # fp32: the frequency-domain PrimaryCaps does less arithmetic than the direct convolution it replaces
    assert 0 < out["gflops_computed"] < 0.7 * out["gflops_achieved"]
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.data.metrics["train_images_per_s"] == out["train_images_per_s"]


def test_bench_refuses_a_cnn_recipe(workdir):
    res = CliRunner().invoke(app, ["bench", str(REPO / "recipes" / "mnist-cnn.yaml"), "--no-track"])
    assert res.exit_code == 2 and "compares CapsNet paths" in res.output
