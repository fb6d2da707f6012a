"""Bad input, one table: every case goes through the real CLI and must end with exit code 2
(usage, recipe, data) or 1 (a runtime failure), one red `error:` line naming what is wrong
and what was expected, and no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import address_space_cap, tiny_recipe, write_mnist

runner = CliRunner()
CNN = {"name": "convnet_small", "channels": [4], "hidden": [8]}
PAPER = {"metric": "error", "value": 1, "source": "x"}


def _recipe(**changes: object) -> str:
    return yaml.safe_dump(tiny_recipe(**changes))  # type: ignore[arg-type]


def _with(section: str, **values: object) -> str:
    raw = tiny_recipe()
    raw.setdefault(section, {})
    raw[section] = {**raw[section], **values}
    return yaml.safe_dump(raw)


# (id, recipe text or None, arguments with {r} for the recipe, {tmp} for the folder, exit code, words)
CASES = [
    ("malformed-yaml", "model: [unclosed", ["train", "{r}"], 2, ["not valid YAML", "line 1"]),
    ("list-at-top", "- model\n- data\n", ["train", "{r}"], 2, ["expected a mapping of sections"]),
    ("list-for-section", _recipe(model=[1, 2]), ["train", "{r}"], 2, ["model: expected a mapping, got a list"]),
    ("binary-file", None, ["train", "{tmp}/binary.yaml"], 2, ["cannot read the recipe"]),
    ("recipe-is-a-folder", None, ["train", "{tmp}"], 2, ["recipe file not found"]),
    ("missing-recipe", None, ["train", "{tmp}/nope.yaml"], 2, ["nope.yaml", "recipe file not found"]),
    ("empty-recipe", "", ["train", "{r}"], 2, ["model: required key is missing"]),
    ("no-data-section", yaml.safe_dump({"model": {"name": "capsnet"}}), ["train", "{r}"], 2,
     ["data: required key is missing"]),
    ("unknown-top-key", _recipe(extras=1), ["train", "{r}"], 2, ["extras: unknown key", "model, loss, data"]),
    ("unknown-model-key", _with("model", routing_iter=3), ["train", "{r}"], 2,
     ["model.routing_iter: unknown key", "routing_iters"]),
    ("unknown-data-key", _with("data", batchsize=3), ["train", "{r}"], 2, ["data.batchsize: unknown key",
                                                                          "batch_size"]),
    ("unknown-optimizer-key", _with("optimizer", learning_rate=1), ["train", "{r}"], 2,
     ["optimizer.learning_rate: unknown key", "lr"]),
    ("unknown-train-key", _with("train", epoch=1), ["train", "{r}"], 2, ["train.epoch: unknown key", "epochs"]),
    ("unknown-nested-key", _with("train", checkpoint={"evry": 1}), ["train", "{r}"], 2,
     ["train.checkpoint.evry: unknown key", "every, best"]),
    ("unknown-tracking-key", _with("tracking", url="x"), ["train", "{r}"], 2, ["tracking.url: unknown key", "uri"]),
    ("unknown-loss-key", _with("loss", name="margin", margin=1), ["train", "{r}"], 2,
     ["loss.margin: unknown key", "m_plus, m_minus, down_weight, recon_weight"]),
    ("epochs-word", _with("train", epochs="three"), ["train", "{r}"], 2, ["train.epochs: expected an integer",
                                                                        "'three'"]),
    ("epochs-float", _with("train", epochs=1.5), ["train", "{r}"], 2, ["train.epochs: expected an integer"]),
    ("epochs-zero", _with("train", epochs=0), ["train", "{r}"], 2, ["train.epochs: expected a value >= 1"]),
    ("batch-negative", _with("data", batch_size=-8), ["train", "{r}"], 2, ["data.batch_size", ">= 1", "-8"]),
    ("batch-zero", _with("data", batch_size=0), ["train", "{r}"], 2, ["data.batch_size", ">= 1"]),
    ("routing-zero", _with("model", routing_iters=0), ["train", "{r}"], 2, ["model.routing_iters", ">= 1"]),
    ("unknown-model", _recipe(model={"name": "capsnet2"}), ["train", "{r}"], 2,
     ["unknown model 'capsnet2'", "baseline_cnn, capsnet, convnet_small"]),
    ("unknown-dataset", _recipe(data={"name": "imagenet"}), ["train", "{r}"], 2,
     ["unknown data set 'imagenet'", "mnist, shapes"]),
    ("unknown-optimizer", _with("optimizer", name="adamw"), ["train", "{r}"], 2,
     ["optimizer.name", "sgd, adam, adadelta, adagrad, rmsprop"]),
    ("unknown-loss", _with("loss", name="hinge"), ["train", "{r}"], 2, ["unknown loss 'hinge'", "margin"]),
    ("unknown-schedule", _with("schedule", name="step"), ["train", "{r}"], 2, ["schedule.name",
                                                                             "constant, exponential, cosine"]),
    ("unknown-device", _recipe(device="tpu"), ["train", "{r}"], 2, ["device", "auto, cpu, cuda, mps"]),
    ("lr-zero", _with("optimizer", lr=0), ["train", "{r}"], 2, ["optimizer.lr", "> 0"]),
    ("lr-string", _with("optimizer", lr="fast"), ["train", "{r}"], 2, ["optimizer.lr: expected a number"]),
    ("betas-short", _with("optimizer", betas=[0.9]), ["train", "{r}"], 2, ["optimizer.betas", "at least 2"]),
    ("bool-as-yes", "decoder: yes\n".join(["", ""]) + _with("model", decoder="yes"), ["train", "{r}"], 2,
     ["model.decoder: expected true or false", "'yes'"]),
    ("hidden-zero", _with("model", decoder_hidden=[32, 0]), ["train", "{r}"], 2, ["model.decoder_hidden[1]",
                                                                                 ">= 1"]),
    ("shift-negative", _with("data", augment={"shift": -1}), ["train", "{r}"], 2, ["data.augment.shift", ">= 0"]),
    ("dropout-one", _recipe(model={**CNN, "dropout": 1.0}), ["train", "{r}"], 2, ["model.dropout", "< 1"]),
    ("activation", _recipe(model={**CNN, "activation": "gelu"}), ["train", "{r}"], 2,
     ["model.activation", "relu, leaky_relu, elu, tanh, sigmoid, swish"]),
    ("precision", _with("train", precision="fp8"), ["train", "{r}"], 2, ["train.precision", "fp32, bf16, fp16"]),
    ("fp16-on-cpu", _with("train", precision="fp16"), ["train", "{r}", "--no-track"], 2,
     ["fp16 needs a CUDA device"]),
    ("override-syntax", _recipe(), ["train", "{r}", "--set", "train.epochs"], 2, ["expected key.path=value"]),
    ("override-into-scalar", _recipe(), ["train", "{r}", "device.kind=cpu"], 2, ["device is a string, not a "
                                                                                   "section"]),
    ("override-type", _recipe(), ["train", "{r}", "data.batch_size=[1]"], 2, ["data.batch_size: expected an "
                                                                               "integer"]),
    ("missing-recipe-arg", None, ["train"], 2, ["missing RECIPE"]),
    ("mnist-missing", _recipe(data={"name": "mnist"}), ["train", "{r}", "--data-root", "{tmp}/none"], 2,
     ["MNIST not found", "train-images-idx3-ubyte", "data.download=true"]),
    ("mnist-truncated", _recipe(data={"name": "mnist"}), ["train", "{r}", "--data-root", "{tmp}/truncated"], 2,
     ["MNIST", "could not be read"]),
    ("mnist-bad-magic", _recipe(data={"name": "mnist"}), ["train", "{r}", "--data-root", "{tmp}/badmagic"], 2,
     ["MNIST", "could not be read"]),
    ("runs-dir-unwritable", _recipe(), ["train", "{r}", "--runs-dir", "{tmp}/afile/runs"], 2,
     ["cannot write to", "afile/runs", "Not a directory"]),
    ("store-unreachable", _recipe(), ["train", "{r}", "--tracking-uri", "http://127.0.0.1:9"], 2,
     ["tracking store http://127.0.0.1:9", "--no-track"]),
    ("resume-and-recipe", _recipe(), ["train", "{r}", "--resume", "latest"], 2, ["give no recipe file"]),
    ("resume-nothing", None, ["train", "--resume", "latest", "--runs-dir", "{tmp}/empty"], 2,
     ["no run with a checkpoint in"]),
    ("resume-overrides", None, ["train", "--resume", "{tmp}/ckpt/cnn.pt", "model.channels=[8]"], 2,
     ["no overrides except train.epochs"]),
    ("eval-no-runs", None, ["eval", "latest", "--runs-dir", "{tmp}/empty"], 2, ["no run with a checkpoint in"]),
    ("eval-unknown-run", None, ["eval", "0123456789abcdef0123456789abcdef", "--runs-dir", "{tmp}/empty"], 2,
     ["no run or checkpoint"]),
    ("eval-not-a-checkpoint", None, ["eval", "{tmp}/ckpt/text.pt"], 1, ["not a readable checkpoint"]),
    ("eval-pickled-code", None, ["eval", "{tmp}/ckpt/evil.pt"], 1, ["refused to load", "pickled objects"]),
    ("eval-other-model-weights", None, ["eval", "{tmp}/ckpt/mismatch.pt"], 1,
     ["checkpoint weights do not fit model 'capsnet'"]),
    ("perturb-on-a-cnn", None, ["perturb", "--checkpoint", "{tmp}/ckpt/cnn.pt", "--no-log"], 2,
     ["needs a capsule model", "ConvNet"]),
    ("perturb-dim-range", None, ["perturb", "--checkpoint", "{tmp}/ckpt/caps.pt", "--dim", "16", "--no-log"], 2,
     ["--dim 16: out of range", "8 dimensions"]),
    ("perturb-dim-and-dims", None, ["perturb", "--dim", "1", "--dims", "all"], 2, ["not both"]),
    ("run-and-checkpoint", None, ["reconstruct", "--run", "latest", "--checkpoint", "{tmp}/ckpt/caps.pt"], 2,
     ["not both"]),
    ("image-not-an-image", None, ["reconstruct", "--checkpoint", "{tmp}/ckpt/caps.pt", "--image", "{tmp}/binary.yaml",
                                  "--no-log"], 2, ["not an image file"]),
    ("summary-input-too-small", _recipe(), ["summary", "{r}", "--input", "1x1x1"], 2,
     ["--input 1x1x1: capsnet cannot take inputs of this shape", "too small for the conv kernels"]),
    ("image-huge", None, ["reconstruct", "--checkpoint", "{tmp}/ckpt/caps.pt", "--image", "{tmp}/huge.png",
                          "--no-log"], 2, ["8000x6000 pixels is more than capsx reads (40 million)"]),
    ("perturb-steps-huge", None, ["perturb", "--checkpoint", "{tmp}/ckpt/caps.pt", "--steps", "100000", "--no-log"],
     2, ["--steps: expected 2 to 101 columns", "got 100000"]),
    ("perturb-samples-zero", None, ["perturb", "--checkpoint", "{tmp}/ckpt/caps.pt", "--samples", "0", "--no-log"],
     2, ["--samples 0: expected 1 to 100"]),
    ("image-blank", None, ["reconstruct", "--checkpoint", "{tmp}/ckpt/caps.pt", "--image", "{tmp}/blank.png",
                           "--no-log"], 2, ["no ink found"]),
    ("filters-unknown-layer", None, ["visualize", "filters", "--checkpoint", "{tmp}/ckpt/caps.pt", "--layer", "x",
                                     "--no-log"], 2, ["--layer 'x'", "conv1"]),
    ("sync-not-a-run", None, ["sync", "{tmp}"], 2, ["not a run directory"]),
    ("canvas-odd", _recipe(data={"name": "mnist", "canvas": 41}), ["train", "{r}"], 2,
     ["data: canvas 41", "28 plus an even margin"]),
    ("canvas-small", _recipe(data={"name": "mnist", "canvas": 20}), ["train", "{r}"], 2, ["data.canvas", ">= 28"]),
    ("canvas-and-shift", _recipe(data={"name": "mnist", "canvas": 40, "augment": {"shift": 2}}), ["train", "{r}"],
     2, ["augment.shift must be 0 with a canvas"]),
    ("paper-band-reversed", _recipe(paper=[{**PAPER, "band": [2, 1]}]), ["train", "{r}"], 2,
     ["paper[0]: band [2, 1]", "0 <= low <= high <= 100"]),
    ("paper-unknown-key", _recipe(paper=[{**PAPER, "band": [0, 2], "table": 1}]), ["train", "{r}"], 2,
     ["paper[0].table: unknown key", "metric, value, band, dataset, source"]),
    ("paper-metric", _recipe(paper=[{**PAPER, "band": [0, 2], "metric": "err"}]), ["train", "{r}"], 2,
     ["paper[0].metric", "error, accuracy"]),
    ("paper-not-a-list", _recipe(paper=PAPER), ["train", "{r}"], 2, ["paper: expected a list"]),
    ("seeds-not-ints", _recipe(), ["train", "{r}", "--seeds", "0,one"], 2, ["--seeds '0,one'", "integers"]),
    ("seeds-repeated", _recipe(), ["train", "{r}", "--seeds", "0,0"], 2, ["a seed is repeated"]),
    ("seeds-mnist-missing", _recipe(data={"name": "mnist"}), ["train", "{r}", "--seeds", "0,1", "--data-root",
                                                                 "{tmp}/none"], 2, ["MNIST not found"]),
    ("seeds-and-resume", None, ["train", "--resume", "latest", "--seeds", "0,1"], 2, ["does not go with --resume"]),
    ("sweep-unknown", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "twist=0:1:1"], 2,
     ["unknown transform 'twist'", "rotate, scale, shear, shift"]),
    ("sweep-two-numbers", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate=-45:45"], 2,
     ["--sweep 'rotate=-45:45'", "NAME=START:STOP:STEP"]),
    ("sweep-no-equals", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate"], 2, ["NAME=START:STOP:STEP"]),
    ("sweep-word", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate=a:b:c"], 2, ["NAME=START:STOP:STEP"]),
    ("sweep-step-zero", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate=0:10:0"], 2, ["STEP must be > 0"]),
    ("sweep-reversed", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate=10:0:5"], 2,
     ["STOP 0 is below START 10"]),
    ("sweep-scale-zero", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "scale=0:1:0.5"], 2,
     ["scale values must be > 0"]),
    ("sweep-too-many", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "shift=0:1000:0.5"], 2,
     ["2001 points", "at most 1000"]),
    ("sweep-and-check", None, ["eval", "{tmp}/ckpt/caps.pt", "--sweep", "rotate=0:1:1", "--check"], 2,
     ["without --check and --dataset"]),
    ("images-zero", None, ["eval", "{tmp}/ckpt/caps.pt", "--images", "0"], 2, ["--images 0: expected at least 1"]),
    ("eval-dataset-unknown", None, ["eval", "{tmp}/ckpt/caps.pt", "--dataset", "imagenet", "--no-log"], 2,
     ["--dataset 'imagenet'", "test, affnist, affine-mnist"]),
    ("eval-size-mismatch", None, ["eval", "{tmp}/ckpt/caps28.pt", "--dataset", "affine-mnist", "--no-log"], 2,
     ["holds 40x40 images", "takes 28x28", "mnist-translated.yaml"]),
    ("eval-not-digits", None, ["eval", "{tmp}/ckpt/caps.pt", "--dataset", "affnist", "--no-log"], 2,
     ["holds digits 0-9", "shapes"]),
    ("affnist-missing", None, ["eval", "{tmp}/ckpt/caps40.pt", "--dataset", "affnist", "--data-root",
                               "{tmp}/empty", "--no-log"], 2, ["affNIST not found", "affNIST/test.mat"]),
    ("check-no-paper-number", None, ["eval", "{tmp}/ckpt/caps.pt", "--check", "--no-log"], 2,
     ["has no `paper:` section", "recipes/mnist-capsnet.yaml"]),
    ("mnist-leak", _recipe(data={"name": "mnist"}), ["train", "{r}", "--data-root", "{tmp}/leak"], 2,
     ["MNIST in", "1 of 64 test image(s) also appear in the train split"]),
    pytest.param("cuda-missing", _recipe(device="cuda"), ["train", "{r}"], 2,
                 ["device 'cuda' is not available here", "available: cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    # the commands besides train and eval, each with a case or more
    ("nproc-zero", _recipe(), ["train", "{r}", "--nproc", "0"], 2, ["Invalid value for '--nproc'",
                                                                    "greater than or equal to 1"]),
    ("nproc-indivisible", _recipe(), ["train", "{r}", "--nproc", "3"], 2,
     ["data.batch_size 16 is the global batch and must divide evenly over 3 processes"]),
    ("nproc-and-seeds", _recipe(), ["train", "{r}", "--nproc", "2", "--seeds", "0,1"], 2,
     ["--seeds with --nproc: not supported together"]),
    ("nproc-on-mps", _recipe(device="mps"), ["train", "{r}", "--nproc", "2"], 2, ["device 'mps' is not available"]),
    ("multimnist-unknown-key", _recipe(data={"name": "multimnist", "shift": 2}), ["train", "{r}"], 2,
     ["data.shift: unknown key", "max_shift"]),
    ("multimnist-no-mnist", _recipe(data={"name": "multimnist"}), ["train", "{r}", "--data-root", "{tmp}/none"], 2,
     ["MNIST not found", "train-images-idx3-ubyte"]),
    ("server-store-unwritable", None, ["server", "--store", "{tmp}/afile/server"], 2,
     ["--store", "afile/server: cannot make the folder (Not a directory)"]),
    ("server-port", None, ["server", "--port", "70000"], 2, ["Invalid value for '--port'", "65535"]),
    ("server-backend-unknown", None, ["server", "--backend-store-uri", "nosuchdb://u@h/db"], 2,
     ["--backend-store-uri: h/db is no database URI SQLAlchemy knows"]),
    ("server-backend-no-driver", None, ["server", "--backend-store-uri", "mysql+mysqldb://u:secret@h/db"], 2,
     ["needs the Python driver 'mysqldb'", "pip install mysqlclient"]),
    ("ui-store-unwritable", None, ["ui", "--runs-dir", "{tmp}/afile/runs"], 2,
     ["afile/runs: cannot make the store's folder (Not a directory)", "--runs-dir"]),
    ("ui-port", None, ["ui", "--port", "0"], 2, ["Invalid value for '--port'", "greater than or equal to 1"]),
    ("grid-no-values", _recipe(), ["train", "{r}", "--grid", "model.routing"], 2,
     ["--grid 'model.routing'", "expected KEY=V1,V2"]),
    ("grid-bad-value", _recipe(), ["train", "{r}", "--grid", "model.routing=dynamic,em"], 2,
     ["--grid cell model.routing=em", "model.routing: expected one of: dynamic, leaky, none, attention, got 'em'"]),
    ("grid-no-track", _recipe(), ["train", "{r}", "--grid", "model.routing=dynamic,none", "--no-track"], 2,
     ["--grid keeps its cells in MLflow", "--no-track"]),
    ("grid-with-nproc", _recipe(), ["train", "{r}", "--grid", "model.routing=dynamic,none", "--nproc", "2"], 2,
     ["--grid trains its cells one at a time", "--nproc"]),
    ("bench-routing-unknown", _recipe(), ["bench", "{r}", "--set", "model.routing=em"], 2,
     ["model.routing: expected one of: dynamic, leaky, none, attention, got 'em'"]),
    ("bench-a-cnn", _recipe(model=CNN), ["bench", "{r}"], 2, ["capsx bench compares CapsNet paths",
                                                              "'convnet_small'"]),
    ("bench-precision", _recipe(), ["bench", "{r}", "--precision", "fp8"], 2, ["--precision 'fp8'",
                                                                              "fp32, bf16 or fp16"]),
    ("bench-batch-zero", _recipe(), ["bench", "{r}", "--batch", "0"], 2, ["Invalid value for '--batch'"]),
    ("summary-missing-recipe", None, ["summary", "{tmp}/nope.yaml"], 2, ["nope.yaml", "recipe file not found"]),
    ("summary-input-syntax", _recipe(), ["summary", "{r}", "--input", "3x28"], 2,
     ["--input '3x28': expected channels x height x width"]),
    ("summary-classes-zero", _recipe(), ["summary", "{r}", "--classes", "0"], 2, ["Invalid value for '--classes'"]),
    ("sync-corrupt-run-json", None, ["sync", "{tmp}/badrun"], 2, ["run.json"]),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Files the cases point at: bad data folders, crafted checkpoints, a blank image."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "empty").mkdir()
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "run.json").write_text('{"run_id": ')  # cut short
    f = write_mnist(tmp / "truncated") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:999])
    f = write_mnist(tmp / "badmagic") / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    f.write_bytes(b"\x00\x00\x0c\x09" + f.read_bytes()[4:])
    from PIL import Image

    Image.new("L", (40, 30)).save(tmp / "blank.png")
    Image.new("L", (8000, 6000)).save(tmp / "huge.png")  # 48 million pixels (a few kB as a PNG)
    from tests.test_affnist import _mnist_with_a_leak

    _mnist_with_a_leak(tmp / "leak", copies=1, n_test=64)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    from capsx.models import build_model
    from capsx.recipe import recipe_from_dict
    from capsx.train.checkpoint import save_checkpoint

    shapes = tiny_recipe()["data"]
    for name, model_cfg, data in (("caps", tiny_recipe()["model"], shapes), ("cnn", CNN, shapes),
                                  ("caps40", tiny_recipe()["model"], {"name": "mnist", "canvas": 40}),
                                  ("caps28", tiny_recipe()["model"], {"name": "mnist"})):
        recipe = recipe_from_dict(tiny_recipe(model=model_cfg, data=data), "t")
        model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes))
        save_checkpoint(ckpt / f"{name}.pt", {"recipe": recipe.to_dict(), "run_id": None,
                                             "model": model.state_dict(), "state": {"epoch": 1},
                                             "optimizer": {}, "scaler": {}, "rng": {}})
    payload = torch.load(ckpt / "cnn.pt", weights_only=True)
    payload["recipe"] = torch.load(ckpt / "caps.pt", weights_only=True)["recipe"]
    torch.save(payload, ckpt / "mismatch.pt")  # a CNN's weights under a CapsNet's recipe
    (ckpt / "text.pt").write_text("not a checkpoint")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": "capsx.checkpoint", "version": 1, "x": Payload()}, ckpt / "evil.pt")
    return tmp


def test_the_table_has_all_its_cases():
    names = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]
    assert len(CASES) == 119 and len(set(names)) == len(CASES)  # a case dropped by mistake shows


@pytest.mark.parametrize("name,text,args,code,words", CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input(prepared: Path, tmp_path, monkeypatch, name, text, args, code, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    argv = [a.replace("{r}", str(recipe)).replace("{tmp}", str(prepared)) for a in args]
    with address_space_cap(3 << 30):  # a case that starts allocating without bound fails, not the machine
        res = runner.invoke(app, argv)
    out = res.output
    assert res.exit_code == code, (name, out)
    assert "Traceback" not in out and "this must never run" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_running_out_of_memory_in_training_is_one_line_with_what_to_try(tmp_path):
    """A real failed allocation: the CPU allocator under an address-space cap 1 GiB above what the
    process holds once imported (in a child process), at a batch the memory pre-flight lets through."""
    recipe = tmp_path / "oom.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "oom", "device": "cpu", "tracking": {"pictures_every": 0}, "train": {"epochs": 1},
        "model": {"name": "capsnet", "conv1_channels": 256, "primary_types": 8, "class_dim": 8,
                  "decoder_hidden": [16, 32]},
        "data": {"name": "shapes", "train_size": 1024, "test_size": 16, "batch_size": 1024}}))
    child = (
        "import resource, sys\n"
        "from capsx.cli import app\n"
        "import capsx.jobs.training, capsx.train.loop, capsx.models.capsnet  # imported before the cap\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))\n"
        "app(['train', sys.argv[1], '--no-track', '--runs-dir', sys.argv[2]], prog_name='capsx')\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(recipe), str(tmp_path / "runs")], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "COLUMNS": "400"})
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert line.startswith("error: out of memory on cpu") and "data.batch_size=1024" in line, line
    assert "no checkpoint was written yet; try a smaller data.batch_size (e.g. 512)" in line, line
