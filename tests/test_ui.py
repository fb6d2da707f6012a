"""`capsx ui` serves the same store `train` logs to: start it for real, read a run back over REST."""

import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import tiny_recipe
from tests.mlflow_server import free_port, rest_post, wait_healthy


def test_ui_serves_the_runs_train_logged(workdir):
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert CliRunner().invoke(app, ["train", str(recipe)]).exit_code == 0
    port = free_port()
    capsx = Path(sys.executable).with_name("capsx")
    proc = subprocess.Popen([str(capsx), "ui", "--port", str(port)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        exps = rest_post(base, "experiments/search", {"max_results": 10})["experiments"]
        tiny = next(e for e in exps if e["name"] == "tiny")
        runs = rest_post(base, "runs/search", {"experiment_ids": [tiny["experiment_id"]]})["runs"]
        assert len(runs) == 1
        metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert {"test/error", "train/loss"} <= metrics
        with urllib.request.urlopen(base + "/", timeout=5) as r:  # the UI page itself
            assert r.status == 200 and b"<html" in r.read(2000).lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
