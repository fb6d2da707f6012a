"""Checkpoints: round trip, refusal of pickled code, and exact resume after an interruption."""

import os
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from capsx.errors import RunError
from capsx.recipe import recipe_from_dict
from capsx.track.tracker import NullTracker, Tracker
from capsx.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from capsx.train.device import resolve_device
from capsx.train.loop import Interrupted, QuietReporter, Run, fit, load_model
from tests.conftest import tiny_recipe, write_mnist


def _run(tmp: Path, name: str, tracker, reporter=None) -> Run:
    run_dir = tmp / name
    (run_dir / "checkpoints").mkdir(parents=True)
    return Run(device=resolve_device("cpu"), data_root=tmp, run_dir=run_dir, tracker=tracker,
               reporter=reporter or QuietReporter())


def _NoTracking():
    return NullTracker("local")


@pytest.mark.numerics
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(), "t")
    result = fit(recipe, _run(tmp_path, "a", _NoTracking()))
    for path in (result.best_checkpoint, result.last_checkpoint):
        again, model = load_model(Checkpoint.read(path), torch.device("cpu"))
        assert again == recipe
    # a model in memory, written and rebuilt from the file alone: the same outputs, bit for bit
    _, trained = load_model(Checkpoint.read(result.last_checkpoint), torch.device("cpu"))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights no file holds yet
    written = Checkpoint(recipe.to_dict(), trained.state_dict(), result.state, "r").write(tmp_path / "mine.pt")
    _, rebuilt = load_model(Checkpoint.read(written), torch.device("cpu"))
    x = torch.rand(4, 1, 28, 28)
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        ours, theirs = trained(x), rebuilt(x)
        assert torch.equal(ours.scores, theirs.scores) and torch.equal(ours.reconstruction, theirs.reconstruction)
    last = load_checkpoint(result.last_checkpoint)
    assert {"optimizer", "rng", "scaler", "state", "recipe", "run_id"} <= set(last)
    assert "optimizer" not in load_checkpoint(result.best_checkpoint)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what unpickling would run


def test_a_checkpoint_carrying_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "capsx.checkpoint", "version": 1, "model": _Payload(marker)}, evil)
    with pytest.raises(RunError, match="refused to load"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(RunError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(RunError, match="not a capsx checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"n": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"n": 2, "bad": object.__new__(type("Unsaveable", (), {"__reduce__": None}))})
    assert load_checkpoint(path)["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_a_disk_that_takes_no_more_is_one_line_and_the_old_checkpoint_stays(tmp_path):
    """A real failed write: the file-size limit (RLIMIT_FSIZE, as a full disk would) in a child process."""
    import subprocess
    import sys

    path = save_checkpoint(tmp_path / "last.pt", {"n": 1})
    child = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from capsx.errors import RunError\n"
        "from capsx.train.checkpoint import save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        "    save_checkpoint(Path(sys.argv[1]), {'n': 2, 'w': torch.zeros(4 << 20)})\n"
        "except RunError as e:\n"
        "    print(e)\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"{path}: could not write the checkpoint (")
    assert "the previous last.pt is kept; free some disk space and --resume" in done.stdout
    assert load_checkpoint(path)["n"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _SignalAt:
    """Sends SIGINT to this process after global step `at`, as a user's Ctrl-C would arrive."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def warn(self, *a): ...
    def epoch_start(self, *a): ...
    def epoch_end(self, *a): ...

    def step(self, totals, lr, steps=1):
        self.steps += steps
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGINT)


SHAPES_80 = {"name": "shapes", "train_size": 80, "test_size": 24, "batch_size": 16, "augment": {"shift": 2}}
# 2 x 64 pairs, of which a seeded 80 (data.subset); each batch moves every digit anew (the affine shuffle)
MULTIMNIST_80 = {"name": "multimnist", "pairs_per_digit": 2, "max_shift": 4, "seed": 7, "batch_size": 16,
                 "subset": 80}


@pytest.mark.parametrize("model,data", [  # the first two again under a lower CPU class (`numerics`)
    pytest.param({"name": "capsnet", "conv1_channels": 8, "primary_types": 4, "class_dim": 8,
                  "decoder_hidden": [16, 32]}, SHAPES_80, marks=pytest.mark.numerics, id="capsnet"),
    pytest.param({"name": "convnet_small", "channels": [4, 8], "hidden": [16], "dropout": 0.5}, SHAPES_80,
                 marks=pytest.mark.numerics, id="cnn-dropout"),  # dropout: the RNG matters
    pytest.param({"name": "capsnet", "conv1_channels": 8, "primary_types": 4, "class_dim": 8,
                  "decoder_hidden": [16, 32]}, MULTIMNIST_80, id="multimnist-subset"),
])
def test_resume_after_ctrl_c_mid_epoch_is_bit_identical(tmp_path, model, data):
    if data["name"] == "multimnist":
        write_mnist(tmp_path, n_train=64, n_test=24)
    raw = tiny_recipe(model=model, data=data, train={"epochs": 2, "seed": 3, "log_every": 1})
    recipe = recipe_from_dict(raw, "t")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    straight = Tracker.start(uri, "resume")
    a = fit(recipe, _run(tmp_path, "a", straight))
    assert a.state.global_step == 10  # 80 training examples (MultiMNIST: the subset of 128 pairs), batch 16

    interrupted = Tracker.start(uri, "resume")
    run_b = _run(tmp_path, "b", interrupted, reporter=_SignalAt(7))  # 5 steps per epoch: step 2 of epoch 2
    with pytest.raises(Interrupted) as stop:
        fit(recipe, run_b)
    assert stop.value.signum == signal.SIGINT and stop.value.state.global_step == 7
    payload = load_checkpoint(stop.value.checkpoint)
    resumed = Tracker.attach(uri, payload["run_id"], reopen=True)
    b = fit(recipe, _run(tmp_path, "b2", resumed), resume=Checkpoint.read(stop.value.checkpoint))

    wa, wb = load_checkpoint(a.last_checkpoint)["model"], load_checkpoint(b.last_checkpoint)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    def untimed(history):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]

    assert untimed(a.state.history) == untimed(b.state.history)
    client = MlflowClient(uri)
    for key in ("train/loss", "train/acc", "test/error", "test/loss", "train/step_loss"):
        ma = [(m.step, m.value) for m in client.get_metric_history(straight.run_id, key)]
        mb = [(m.step, m.value) for m in client.get_metric_history(interrupted.run_id, key)]
        assert ma and sorted(ma) == sorted(mb), key  # one set of metrics, the same values


def test_a_cpu_run_keeps_only_its_own_generators_and_an_fp16_gpu_run_evaluates_on_a_cpu(tmp_path):
    """A checkpoint's RNG state is this process's device's only (a CPU run: the CPU's, no CUDA started); a
    run trained in fp16 on a GPU is evaluated in fp32 on a machine without one, to the same error."""
    from typer.testing import CliRunner

    from capsx.cli import app

    recipe = recipe_from_dict(tiny_recipe(), "t")
    result = fit(recipe, _run(tmp_path, "a", _NoTracking()))
    last = Checkpoint.read(result.last_checkpoint)
    assert last.rng is not None and set(last.rng) == {"torch"}
    gpu = Checkpoint({**last.recipe, "train": {**last.recipe["train"], "precision": "fp16"}}, last.model,
                     last.state, "gpu-run").write(tmp_path / "fp16.pt")
    runner = CliRunner()
    outputs = [runner.invoke(app, ["eval", str(p), "--no-log", "--runs-dir", str(tmp_path / "none")])
               for p in (result.last_checkpoint, gpu)]
    assert [o.exit_code for o in outputs] == [0, 0], outputs[1].output
    error = f"{100 * result.state.history[-1]['test/error']:.2f}%"
    assert all(error in o.output for o in outputs)
