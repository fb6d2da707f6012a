"""Ctrl-C end to end: a real `capsx train` process is interrupted, then resumed into the same MLflow run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_recipe

CAPSX = str(Path(sys.executable).with_name("capsx"))


@pytest.mark.numerics
def test_sigint_saves_a_checkpoint_and_resume_finishes_the_same_run(workdir):
    recipe = workdir / "long.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 2400, "test_size": 64, "batch_size": 16},
        train={"epochs": 2, "log_every": 10}, name="long")))
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([CAPSX, "train", str(recipe)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if "step" in line and "epoch 1/2" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out
    assert "interrupted by SIGINT" in out and "capsx train --resume" in out, out
    assert "Traceback" not in out
    last = next(workdir.glob("runs/long/*/checkpoints/last.pt"))

    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("long").experiment_id])
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["mlflow.note.content"]
    mtime = last.stat().st_mtime

    time.sleep(0.01)
    res = subprocess.run([CAPSX, "train", "--resume", "latest"], cwd=workdir, env=env, text=True,
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming long" in res.stdout
    (run,) = client.search_runs([client.get_experiment_by_name("long").experiment_id])  # still one run
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2]
    assert last.stat().st_mtime > mtime


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_exits_143(workdir):
    """What a batch scheduler sends: the same stop as Ctrl-C, told apart by its exit code (128 + 15)."""
    recipe = workdir / "long.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 2400, "test_size": 64, "batch_size": 16},
        train={"epochs": 2, "log_every": 10}, name="long")))
    proc = subprocess.Popen([CAPSX, "train", str(recipe), "--no-track"], cwd=workdir, text=True,
                            env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step" in line and "epoch 1/2" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out
    assert "interrupted by SIGTERM" in out and "capsx train --resume" in out and "Traceback" not in out, out
    (last,) = workdir.glob("runs/long/*/checkpoints/last.pt")
    from capsx.train.checkpoint import load_checkpoint

    state = load_checkpoint(last)["state"]
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < 150  # mid-epoch, after a whole step
