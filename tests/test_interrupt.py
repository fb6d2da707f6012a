"""Ctrl-C end to end: a real `capsx train` process is interrupted, then resumed into the same MLflow run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_recipe

CAPSX = str(Path(sys.executable).with_name("capsx"))


# Not in the `numerics` rerun (24 s there): the same exactness under a lower CPU class is the in-process
# Ctrl-C test's (test_checkpoint.py); this one is about the process, the signal and the run it resumes.
def test_sigint_saves_a_checkpoint_and_resume_finishes_the_same_run(workdir):
    recipe = workdir / "long.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 960, "test_size": 64, "batch_size": 16},
        train={"epochs": 2, "log_every": 10}, name="long")))
    env = {**os.environ, "COLUMNS": "200"}
    code, out = _signal_after([CAPSX, "train", str(recipe)], workdir, "epoch 1/2 step", signal.SIGINT)
    assert code == 130, out
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
    code, out = _signal_after([CAPSX, "train", str(recipe), "--no-track"], workdir, "epoch 1/2 step", signal.SIGTERM)
    assert code == 143, out
    assert "interrupted by SIGTERM" in out and "capsx train --resume" in out and "Traceback" not in out, out
    (last,) = workdir.glob("runs/long/*/checkpoints/last.pt")
    from capsx.train.checkpoint import load_checkpoint

    state = load_checkpoint(last)["state"]
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < 150  # mid-epoch, after a whole step


def _readable_or_absent(runs: Path) -> int:
    """Every file capsx left under `runs` reads as what it is; returns how many were checked.
    (A temporary file of a killed writer is allowed: the next write of its file removes it.)"""
    import json

    from PIL import Image

    from capsx.train.checkpoint import load_checkpoint

    checked = 0
    for path in runs.rglob("*"):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        if path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as im:
                im.load()
        elif path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:  # only the last line can be cut short, and sync drops it
                json.loads(line)
        checked += 1
    return checked


def _signal_after(cmd: list[str], cwd: Path, after: str, sig: int, delay: float = 0.0) -> tuple[int, str]:
    """Start `cmd`, wait for a line containing `after`, then `delay` seconds, then send it `sig`;
    its exit code and everything it printed."""
    proc = subprocess.Popen(cmd, cwd=cwd, text=True, env={**os.environ, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if after in line:
            break
    time.sleep(delay)
    proc.send_signal(sig)
    out.append(proc.stdout.read())
    return proc.wait(timeout=120), "".join(out)


def _kill_after(cmd: list[str], cwd: Path, after: str, delay: float) -> str:
    """`_signal_after` with SIGKILL: no handler runs, what is on disk is all there is."""
    return _signal_after(cmd, cwd, after, signal.SIGKILL, delay)[1]


def test_sigkill_at_random_moments_loses_at_most_the_epoch_and_resume_ends_as_if_never_killed(workdir):
    """SIGKILL runs no handler: what is on disk is all there is. Killed at seeded random moments in
    training (three times, resumed each time), in an evaluation and in a `--seeds` run: every file
    left is readable, and the run resumed to the end has the weights and test errors of one that was
    never killed (CPU: bit-identical), in one MLflow run."""
    import random

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from capsx.cli import app
    from capsx.train.checkpoint import load_checkpoint

    recipe = workdir / "k.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 320, "test_size": 32, "batch_size": 16},
        train={"epochs": 3, "seed": 0, "log_every": 5}, name="k")))
    res = CliRunner().invoke(app, ["train", str(recipe), "--no-track", "--runs-dir", "straight"])
    assert res.exit_code == 0, res.output
    straight = load_checkpoint(next(workdir.glob("straight/k/*/checkpoints/last.pt")))

    rng = random.Random(11)
    # the first kill after epoch 1's checkpoint (before it there is nothing to resume), the others anywhere
    _kill_after([CAPSX, "train", str(recipe)], workdir, "test error", rng.uniform(0.0, 1.0))
    for _ in range(2):
        assert _readable_or_absent(workdir / "runs") > 0
        _kill_after([CAPSX, "train", "--resume", "latest"], workdir, "resuming k", rng.uniform(0.5, 2.0))
    assert _readable_or_absent(workdir / "runs") > 0
    res = CliRunner().invoke(app, ["train", "--resume", "latest"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (workdir / "runs" / "k").iterdir()
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert resumed["state"]["epoch"] == 3
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("k").experiment_id])
    assert run.info.status == "FINISHED"
    errors: dict[int, set[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "test/error"):  # an epoch redone logs again: the same
        errors.setdefault(m.step, set()).add(m.value)
    assert errors == {row["epoch"]: {row["test/error"]} for row in straight["state"]["history"]}

    _kill_after([CAPSX, "eval", "latest"], workdir, "", rng.uniform(0.5, 2.5))  # evaluation: reads, logs
    assert _readable_or_absent(workdir / "runs") > 0
    assert CliRunner().invoke(app, ["eval", "latest"]).exit_code == 0
    _kill_after([CAPSX, "train", str(recipe), "--seeds", "0,1", "train.epochs=1"], workdir, "seeds 0, 1",
                rng.uniform(0.5, 3.0))
    assert _readable_or_absent(workdir / "runs") > 0
