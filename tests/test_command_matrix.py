"""Every command against a tiny run of every kind of data: each cell works or refuses in one line.

The kinds: one-label 1-channel (`shapes`, a CapsNet and a CNN; MNIST on a 40x40 canvas, the size
`--dataset affine-mnist` needs), two-label 1-channel (MultiMNIST),
2-channel (smallNORB's stereo pairs), 3-channel (CIFAR-10, a CapsNet and a CNN) and a folder of the
user's own RGB pictures (`imagefolder`, 24x24), each trained
for one epoch on files the fixtures write, into one real MLflow store. A cell passes when the
command exits 0, or exits 2 with exactly one line `error: ...`; a traceback, another exit code or
a second line fails it. Which cells refuse is pinned too, so a command that starts refusing
what it used to do fails here as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import (
    TINY_CAPSNET,
    tiny_recipe,
    write_cifar10,
    write_image_folder,
    write_mnist,
    write_smallnorb,
)

CNN = {"name": "convnet_small", "channels": [4, 8], "hidden": [16]}
KINDS = {
    "shapes-capsnet": ({"name": "shapes", "train_size": 64, "test_size": 48}, TINY_CAPSNET),
    "shapes-cnn": ({"name": "shapes", "train_size": 64, "test_size": 48}, CNN),
    "mnist40-capsnet": ({"name": "mnist", "canvas": 40, "subset": 48}, TINY_CAPSNET),
    "multimnist-capsnet": ({"name": "multimnist", "pairs_per_digit": 1, "max_shift": 4}, TINY_CAPSNET),
    "smallnorb-capsnet": ({"name": "smallnorb", "augment": {"crop": 32}}, TINY_CAPSNET),
    "cifar10-capsnet": ({"name": "cifar10", "augment": {"crop": 24}}, TINY_CAPSNET),
    "cifar10-cnn": ({"name": "cifar10"}, CNN),
    "imagefolder-capsnet": ({"name": "imagefolder", "size": 24, "channels": 3}, TINY_CAPSNET),
}

# Each command with RUN standing for the run's id and RECIPE for its recipe file.
COMMANDS = {
    "eval": ["eval", "RUN"],
    "eval-check": ["eval", "RUN", "--check"],
    "eval-sweep": ["eval", "RUN", "--sweep", "rotate=-10:10:10", "--images", "16"],
    "eval-ensemble": ["eval", "RUN", "RUN", "--ensemble"],
    "eval-dataset": ["eval", "RUN", "--dataset", "affine-mnist", "--images", "16"],
    "eval-pose": ["eval", "RUN", "--pose"],
    "perturb": ["perturb", "--run", "RUN", "--samples", "2", "--steps", "3"],
    "reconstruct": ["reconstruct", "--run", "RUN", "--count", "4", "--error-images", "16"],
    "visualize": ["visualize", "--run", "RUN"],
    "visualize-top": ["visualize", "top-activating", "--run", "RUN"],
    "predict": ["predict", "RUN", "IMAGE", "--csv", "predicted.csv"],
    "summary": ["summary", "RECIPE"],
    "bench": ["bench", "RECIPE", "--rounds", "1", "--steps", "1", "--batch", "4", "--infer-batch", "8",
              "--no-track"],
}
NO_DATA_ROOT = {"summary", "bench"}

# The cells that refuse, each with a fragment of its one line; every other cell must work.
REFUSED = {
    **{(kind, "eval-check"): "no `paper:` section" for kind in KINDS if kind != "shapes-capsnet"},
    **{(kind, "eval-dataset"): "--dataset affine-mnist holds" for kind in KINDS if kind != "mnist40-capsnet"},
    **{(kind, command): "needs a capsule model" for kind in ("shapes-cnn", "cifar10-cnn")
       for command in ("perturb", "reconstruct")},
    **{(kind, "bench"): "compares CapsNet paths" for kind in ("shapes-cnn", "cifar10-cnn")},
    ("mnist40-capsnet", "eval-pose"): "keeps no pose",
    ("multimnist-capsnet", "eval-pose"): "hold 2 objects",
    ("cifar10-capsnet", "eval-pose"): "keeps no pose",
    ("cifar10-cnn", "eval-pose"): "keeps no pose",
    ("imagefolder-capsnet", "eval-pose"): "keeps no pose",
}

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with the data files, the MLflow store and the runs; trained on first use."""
    root = tmp_path_factory.mktemp("matrix")
    write_mnist(root / "data", n_train=64, n_test=40)
    write_cifar10(root / "data", n_per_batch=12, n_test=24)
    write_smallnorb(root / "data", n_train=40, n_test=24)
    write_image_folder(root / "pics" / "train", ["bird", "boat", "tree"], 12)
    write_image_folder(root / "pics" / "test", ["bird", "boat", "tree"], 4, seed=1, suffix=".jpg")
    write_image_folder(root / "mine", ["x"], 1, seed=2, size=(50, 31))  # the user's own picture to predict
    return root


def _data_root(kind: str, store: Path) -> Path:
    return store / "pics" if kind.startswith("imagefolder") else store / "data"


_trained: dict[str, tuple[str, Path]] = {}


def _run_of(kind: str, store: Path) -> tuple[str, Path]:
    """The run id and recipe of `kind`, trained once per module."""
    if kind not in _trained:
        data, model = KINDS[kind]
        recipe = tiny_recipe(data={**data, "batch_size": 16, "eval_batch_size": 16}, model=dict(model),
                             name=kind)
        if kind.startswith("imagefolder"):  # the folder in the recipe too: summary and bench read its classes
            recipe["data"]["root"] = str(_data_root(kind, store))
        if kind == "shapes-capsnet":  # a paper number wide enough for a one-epoch model: --check passes
            recipe["paper"] = [{"metric": "error", "value": 50.0, "band": [0.0, 100.0], "source": "a test"}]
        path = store / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        res = runner.invoke(app, ["train", str(path), "--data-root", str(_data_root(kind, store))])
        assert res.exit_code == 0, res.output
        (run_dir,) = (store / "runs" / kind).iterdir()
        _trained[kind] = (run_dir.name, path)
    return _trained[kind]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_command_on_every_kind_of_data_works_or_refuses_in_one_line(store, kind, command, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CAPSX_DATA", raising=False)
    run_id, recipe = _run_of(kind, store)
    image = str(store / "mine" / "x" / "0.png")
    args = [{"RUN": run_id, "RECIPE": str(recipe), "IMAGE": image}.get(a, a) for a in COMMANDS[command]]
    if command not in NO_DATA_ROOT:
        args += ["--data-root", str(_data_root(kind, store))]
    res = runner.invoke(app, args)
    shown = f"capsx {' '.join(args)}\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"{shown}\nraised {type(res.exception).__name__}: {res.exception}"
    assert "Traceback" not in res.output, shown
    refusal = REFUSED.get((kind, command))
    if refusal is None:
        assert res.exit_code == 0, shown
    else:
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), shown
        assert refusal in lines[0], shown


def test_every_refused_cell_is_a_cell_of_the_matrix():
    assert set(REFUSED) <= {(k, c) for k in KINDS for c in COMMANDS}
