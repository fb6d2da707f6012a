"""Hostile input, round two: 40 cases of our own beyond the first table (tests/test_bad_input.py), for
the commands and inputs it left out: recipes, overrides, images, checkpoints, stores, options that
allocate, and the commands `summary`, `bench`, `ui`, `server` and `sync`. Each goes through the real
CLI, under an address-space cap (a case that starts allocating without bound fails here, not the
machine), and must end with its exit code and one `error:` line holding the words, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import address_space_cap, tiny_recipe
from tests.test_bad_input import prepared  # noqa: F401  (the crafted checkpoints and files: a fixture)

runner = CliRunner()
CAP = 3 << 30  # bytes of address space a case may add to what the test process holds


def _recipe(**changes: object) -> str:
    return yaml.safe_dump(tiny_recipe(**changes))  # type: ignore[arg-type]


CAPS = ["--checkpoint", "{tmp}/ckpt/caps.pt", "--no-log"]

# (id, recipe text or None, arguments ({r}: the recipe, {tmp}: the prepared folder, {own}: this case's
# folder), exit code, words of the one error line)
HOSTILE = [
    # recipes
    ("yaml-tabs", "model:\n\tname: capsnet\n", ["train", "{r}"], 2, ["not valid YAML", "line 2"]),
    ("yaml-deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", ["train", "{r}"], 2, ["nested too deeply"]),
    ("lr-nan", _recipe(optimizer={"lr": float("nan")}), ["train", "{r}"], 2, ["optimizer.lr"]),
    ("lr-inf", _recipe(optimizer={"lr": float("inf")}), ["train", "{r}"], 2,
     ["optimizer.lr: expected a finite number, got inf"]),
    ("epochs-huge", _recipe(train={"epochs": 10**30}), ["train", "{r}"], 2, ["train.epochs: expected a value <="]),
    ("batch-huge", _recipe(data={"name": "shapes", "batch_size": 10**30}), ["train", "{r}"], 2,
     ["data.batch_size"]),
    ("name-empty", _recipe(name=""), ["train", "{r}"], 2, ["name: expected a non-empty string"]),
    ("model-is-a-string", _recipe(model="capsnet"), ["train", "{r}"], 2, ["model: expected a mapping"]),
    ("recipe-directory-named-yaml", None, ["train", "{own}/dir.yaml"], 2, ["recipe file not found"]),
    ("recipe-symlink-loop", None, ["train", "{own}/loop.yaml"], 2, ["loop.yaml"]),
    ("shapes-scale-reversed", _recipe(data={"name": "shapes", "min_scale": 0.9, "max_scale": 0.5}),
     ["train", "{r}"], 2, ["min_scale 0.9 is above max_scale 0.5"]),
    # overrides
    ("override-unknown-section", _recipe(), ["train", "{r}", "nosuch.key=1"], 2, ["nosuch: unknown key"]),
    ("override-empty-key", _recipe(), ["train", "{r}", "=3"], 2, ["key.path=value"]),
    ("override-bad-yaml-value", _recipe(), ["train", "{r}", "train.epochs=[1"], 2, ["train.epochs"]),
    ("override-list-index", _recipe(), ["train", "{r}", "model.decoder_hidden.0=8"], 2, ["model.decoder_hidden"]),
    ("print-config-bad-override", _recipe(), ["train", "{r}", "--print-config", "data.batch_size=0"], 2,
     ["data.batch_size", ">= 1"]),
    # images
    ("image-empty-file", None, ["reconstruct", *CAPS, "--image", "{own}/empty.png"], 2, ["empty.png"]),
    ("image-truncated-png", None, ["reconstruct", *CAPS, "--image", "{own}/cut.png"], 2, ["cut.png"]),
    ("image-missing", None, ["perturb", *CAPS, "--image", "{own}/nope.png"], 2, ["nope.png"]),
    ("image-a-folder", None, ["reconstruct", *CAPS, "--image", "{own}"], 2, ["not an image file"]),
    ("activations-image-text", None, ["visualize", "activations", *CAPS, "--image", "{own}/notes.png"], 2,
     ["not an image file"]),
    # checkpoints
    ("checkpoint-zero-bytes", None, ["eval", "{own}/zero.pt"], 1, ["zero.pt"]),
    ("checkpoint-a-bare-tensor", None, ["eval", "{own}/tensor.pt"], 1, ["tensor.pt"]),
    ("checkpoint-state-dict-only", None, ["reconstruct", "--checkpoint", "{own}/weights.pt", "--no-log"], 1,
     ["weights.pt"]),
    ("checkpoint-future-version", None, ["eval", "{own}/future.pt"], 1, ["future.pt", "version"]),
    ("checkpoint-missing", None, ["perturb", "--checkpoint", "{own}/gone.pt", "--no-log"], 2, ["gone.pt"]),
    # stores
    ("tracking-uri-garbage", _recipe(), ["train", "{r}", "--tracking-uri", "nosuch://x"], 2, ["nosuch://x"]),
    ("tracking-uri-sqlite-in-a-file", _recipe(), ["train", "{r}", "--tracking-uri",
                                                  "sqlite:///{tmp}/afile/mlflow.db"], 2, ["afile"]),
    ("sync-corrupt-run-json", None, ["sync", "{own}/run"], 2, ["run.json: not a run.json capsx wrote"]),
    # options that would allocate or loop without bound
    ("perturb-class-out-of-range", None, ["perturb", *CAPS, "--class", "99"], 2, ["--class 99"]),
    ("perturb-range-reversed", None, ["perturb", *CAPS, "--range=0.3:-0.3"], 2, ["--range"]),
    ("perturb-range-word", None, ["perturb", *CAPS, "--range", "a:b"], 2, ["--range"]),
    ("reconstruct-count-zero", None, ["reconstruct", *CAPS, "--count", "0"], 2, ["--count"]),
    ("reconstruct-count-huge", None, ["reconstruct", *CAPS, "--count", str(10**9)], 2,
     ["--count", "less than or equal to 100"]),
    ("reconstruct-force-class", None, ["reconstruct", *CAPS, "--force-class", "99"], 2, ["--force-class 99"]),
    ("saliency-steps-huge", None, ["visualize", "saliency", *CAPS, "--steps", str(10**9)], 2, ["--steps"]),
    ("top-activating-k-zero", None, ["visualize", "top-activating", *CAPS, "--k", "0"], 2, ["--k"]),
    ("top-activating-limit-zero", None, ["visualize", "top-activating", *CAPS, "--limit", "0"], 2, ["--limit"]),
    ("activations-index-range", None, ["visualize", "activations", *CAPS, "--index", "100000"], 2, ["--index"]),
    ("eval-images-huge", None, ["eval", "{tmp}/ckpt/caps.pt", "--images", str(10**12), "--no-log"], 0, []),
    # the commands the first table had no case for
    ("summary-input-word", _recipe(), ["summary", "{r}", "--input", "big"], 2, ["--input 'big'"]),
    ("summary-input-huge", _recipe(), ["summary", "{r}", "--input", "1x100000x100000"], 0, []),  # on meta
    ("bench-a-cnn", _recipe(model={"name": "convnet_small", "channels": [4], "hidden": [8]}),
     ["bench", "{r}", "--no-track"], 2, ["compares CapsNet paths"]),
    ("bench-batch-zero", _recipe(), ["bench", "{r}", "--batch", "0", "--no-track"], 2, ["--batch"]),
    ("nproc-zero", _recipe(), ["train", "{r}", "--nproc", "0"], 2, ["--nproc", "capsx train --help"]),
    ("unknown-command", None, ["trian", "{r}"], 2, ["No such command 'trian'"]),
    ("unknown-option", None, ["eval", "--imgaes", "3"], 2, ["No such option: --imgaes"]),
    ("nproc-batch-indivisible", _recipe(data={"name": "shapes", "batch_size": 15}), ["train", "{r}", "--nproc",
                                                                                     "2"], 2, ["15", "2"]),
    ("ui-port-out-of-range", None, ["ui", "--port", "70000"], 2, ["--port"]),
    ("server-port-negative", None, ["server", "--port", "-1", "--store", "{own}/srv"], 2, ["--port"]),
]


def _own_files(folder: Path) -> None:
    """The files the cases above name under {own}."""
    import torch
    from PIL import Image

    (folder / "dir.yaml").mkdir()
    os.symlink(folder / "loop.yaml", folder / "loop.yaml")
    (folder / "empty.png").write_bytes(b"")
    Image.new("L", (28, 28), 255).save(folder / "whole.png")
    (folder / "cut.png").write_bytes((folder / "whole.png").read_bytes()[:40])
    (folder / "notes.png").write_text("not a picture")
    (folder / "zero.pt").write_bytes(b"")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    (folder / "run").mkdir()
    (folder / "run" / "run.json").write_text('{"run_id": "abc", "experi')


@pytest.fixture
def own(tmp_path: Path, prepared: Path) -> Path:  # noqa: F811
    import torch

    folder = tmp_path / "own"
    folder.mkdir()
    _own_files(folder)
    caps = torch.load(prepared / "ckpt" / "caps.pt", weights_only=True)
    torch.save(caps["model"], folder / "weights.pt")
    torch.save({**caps, "version": 99}, folder / "future.pt")
    return folder


def test_the_table_has_fifty_cases_of_our_own():
    assert len(HOSTILE) == 50 and len({c[0] for c in HOSTILE}) == len(HOSTILE)  # a case dropped shows


@pytest.mark.parametrize("name,text,args,code,words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input(prepared: Path, own: Path, tmp_path, monkeypatch, name, text, args, code,  # noqa: F811
                       words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    argv = [a.replace("{r}", str(recipe)).replace("{tmp}", str(prepared)).replace("{own}", str(own)) for a in args]
    with address_space_cap(CAP):
        res = runner.invoke(app, argv)
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), (name, out, repr(res.exception))
    assert res.exit_code == code, (name, out)
    assert "Traceback" not in out, out
    if code == 0:
        return
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_recipe_name_cannot_lead_its_runs_out_of_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(name="../../etc/x"))
    res = runner.invoke(app, ["train", str(recipe), "--no-track", "train.max_steps_per_epoch=1"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").glob("*/*/run.json")
    assert run_dir.parent.parent == tmp_path / "runs" / "etc_x"  # the name, made a folder name
