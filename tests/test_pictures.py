"""Picture maths (perturbation, integrated gradients, Grad-CAM, user images) and the picture
commands end to end on a tiny trained run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from capsx.cli import app
from capsx.data.user_image import load_user_image
from capsx.errors import CapsxError
from capsx.models import MODELS, build_model
from capsx.pictures import canvas, capsules, inside
from capsx.recipe import recipe_from_dict
from capsx.train.checkpoint import Checkpoint
from tests.conftest import TINY_CAPSNET, tiny_recipe

runner = CliRunner()


def _capsnet(decoder: bool = True):
    torch.manual_seed(0)
    kw = {k: v for k, v in TINY_CAPSNET.items() if k != "name"}
    return build_model(MODELS.get("capsnet")(**kw, decoder=decoder), (1, 28, 28), 10).eval()


def test_perturbation_changes_only_the_chosen_dimension():
    model = _capsnet()
    v = torch.randn(8) * 0.3
    deltas = capsules.perturbation_values(-0.25, 0.25, 11)
    assert torch.allclose(deltas, torch.arange(-5, 6) * 0.05, atol=1e-6)
    pics = capsules.perturb_capsule(model, v, 3, [0, 5], deltas)
    assert pics.shape == (2, 11, 1, 28, 28)
    # the middle column is the unperturbed capsule, decoded as training decodes it
    caps = torch.zeros(1, 10, 8)
    caps[0, 3] = v
    plain = model.reconstruct(caps, torch.tensor([3]))[0]
    assert torch.allclose(pics[0, 5], plain, atol=1e-6) and torch.allclose(pics[1, 5], plain, atol=1e-6)
    # by hand: column 0 of row 1 decodes v with dimension 5 lowered by 0.25
    caps[0, 3, 5] -= 0.25
    assert torch.allclose(pics[1, 0], model.reconstruct(caps, torch.tensor([3]))[0], atol=1e-6)


@pytest.mark.parametrize("call,msg", [
    (lambda m: capsules.perturb_capsule(m, torch.zeros(8), 0, [8], torch.zeros(3)), "out of range"),
    (lambda m: capsules.perturbation_values(0.2, -0.2, 5), "START < STOP"),
    (lambda m: capsules.perturbation_values(-0.2, 0.2, 1), "expected 2 to 101 columns"),
])
def test_perturbation_errors(call, msg):
    with pytest.raises(CapsxError, match=msg):
        call(_capsnet())


def test_pictures_that_need_a_decoder_or_capsules_refuse_other_models():
    with pytest.raises(CapsxError, match="needs a decoder"):
        capsules.require_decoder(_capsnet(decoder=False), "perturb")
    cnn = build_model(MODELS.get("convnet_small")(channels=[4, 8], hidden=[16]), (1, 28, 28), 10)
    with pytest.raises(CapsxError, match="needs a capsule model"):
        capsules.require_decoder(cnn, "perturb")


def test_integrated_gradients_are_complete():
    # Completeness: the attributions add up to score(x) - score(baseline).
    model = build_model(MODELS.get("convnet_small")(channels=[4, 8], hidden=[16], activation="swish"),
                        (1, 28, 28), 10).eval().double()
    x = torch.rand(1, 1, 28, 28, dtype=torch.double)
    attr = inside.integrated_gradients(model, x, cls=4, steps=256)
    with torch.no_grad():
        gap = model(x).scores[0, 4] - model(torch.zeros_like(x)).scores[0, 4]
    assert attr.shape == (1, 28, 28)
    assert float(attr.sum()) == pytest.approx(float(gap), rel=2e-3, abs=1e-6)


def test_grad_cam_by_hand():
    model = _capsnet()
    x = torch.rand(1, 1, 28, 28)
    cam = inside.grad_cam(model, model.conv1, x, cls=2)
    assert cam.shape == (28, 28) and cam.min() >= 0 and cam.max() <= 1
    # by hand at conv1's resolution; Grad-CAM hooks conv1's output, before the ReLU
    pre = model.conv1(x).detach().requires_grad_(True)
    score = model.class_caps(model.primary_caps(torch.relu(pre))).norm(dim=-1)[0, 2]
    (g,) = torch.autograd.grad(score, pre)
    manual = torch.relu((g.mean(dim=(2, 3), keepdim=True) * pre).sum(1, keepdim=True))
    manual = torch.nn.functional.interpolate(manual, size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(cam, manual / manual.max(), atol=1e-5)


def test_routing_maps_and_primary_lengths():
    model = _capsnet()
    x = torch.rand(1, 1, 28, 28)
    maps, delta_b = inside.routing_maps(model, x)
    types, gh, gw = model.primary_grid
    assert maps.shape == (3, 10, types, gh, gw) and len(delta_b) == 3
    assert torch.allclose(maps.sum(dim=1), torch.ones(3, types, gh, gw), atol=1e-5)  # c sums to 1 over parents
    lengths = inside.primary_capsule_lengths(model, x)
    assert lengths.shape == (types, gh, gw) and (lengths < 1).all()


def test_unit_scores_pick_the_brightest_images_for_a_bias_free_positive_filter():
    model = _capsnet()
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
        model.conv1.bias.zero_()
    images = torch.ones(20, 1, 28, 28) * torch.linspace(0.1, 1, 20).view(20, 1, 1, 1)
    scores = inside.unit_scores(model, model.conv1, images, channel=0)
    assert scores.argmax() == 19 and scores.argmin() == 0
    caps_scores = inside.unit_scores(model, model.primary_caps, images, channel=1)
    assert caps_scores.shape == (20,) and (caps_scores < 1).all()


def test_user_image_is_inverted_scaled_and_centred(tmp_path):
    page = np.full((200, 120), 255, np.uint8)  # black ink on a white page, off centre
    page[20:120, 10:40] = 0
    Image.fromarray(page).save(tmp_path / "digit.png")
    x = load_user_image(tmp_path / "digit.png", (1, 28, 28))
    assert x.shape == (1, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    ink = x[0, 0] > 0.5
    ys, xs = ink.nonzero(as_tuple=True)
    assert ys.max() - ys.min() + 1 == 20  # the longer side fills 20 of 28 pixels, as MNIST's digits do
    cy = (x[0, 0] * torch.arange(28.0).view(28, 1)).sum() / x[0, 0].sum()
    cx = (x[0, 0] * torch.arange(28.0).view(1, 28)).sum() / x[0, 0].sum()
    assert 13.5 <= cy <= 14.5 and 13.5 <= cx <= 14.5  # centred by mass where MNIST centres its digits (pixel 14)
    (tmp_path / "blank.png").write_bytes(b"")
    with pytest.raises(CapsxError, match="not an image"):
        load_user_image(tmp_path / "blank.png", (1, 28, 28))
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(CapsxError, match="no ink"):
        load_user_image(tmp_path / "black.png", (1, 28, 28))


def test_grid_layout_and_marks():
    tiles = [np.full((2, 3), v, np.uint8) for v in (0, 100, 200)]
    g = canvas.grid(tiles, cols=2, scale=2, pad=1, marked=[False, True, False])
    assert g.shape == (2 * (4 + 2), 2 * (6 + 2), 3)
    assert (g[1:5, 1:7] == 0).all() and (g[1:5, 9:15] == 100).all()
    assert tuple(g[0, 8]) == canvas.RED and tuple(g[0, 0]) == (canvas.BACKGROUND,) * 3
    assert (canvas.heat(np.array([0.0, 1.0])) == [[0, 0, 0], [255, 255, 255]]).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CapsNet trained for one epoch on `shapes`, tracked in a real SQLite store."""
    work = tmp_path_factory.mktemp("pictures")
    recipe = work / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    old = Path.cwd()
    import os

    os.chdir(work)
    try:
        assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    finally:
        os.chdir(old)
    return work


@pytest.mark.parametrize("args,files,keys", [
    (["perturb", "--class", "2"], ["perturb_sample_class*_0.png"], ["perturb/class"]),
    (["perturb", "--dim", "3", "--samples", "4", "--range=-0.3:0.3", "--steps", "13"], ["perturb_dim3.png"],
     ["perturb/dim3"]),
    (["perturb", "--dims", "0,2", "--class-mean", "--class", "1"], ["perturb_mean_class1_0.png"],
     ["perturb/class1_mean"]),
    (["reconstruct", "--count", "6", "--error-images", "32"], ["recon_test.png"], ["recon/test"]),
    (["reconstruct", "--force-class", "4", "--count", "4"], ["recon_test_as4.png"], ["recon/test_as4"]),
    (["visualize", "filters"], ["filters_conv1.png"], ["filters/conv1"]),
    (["visualize"], ["filters_conv1.png", "activations_conv1.png", "routing_couplings.png",
                     "saliency_integrated-gradients_class*.png", "top_conv1_0.png"],
     ["filters/conv1", "routing/couplings", "top_activating/conv1_0"]),
    (["visualize", "activations", "--index", "2"], ["activations_conv1.png", "activations_primary_lengths.png"],
     ["activations/conv1", "activations/primary_lengths"]),
    (["visualize", "routing", "--index", "1"], ["routing_couplings.png"], ["routing/couplings"]),
    (["visualize", "saliency", "--method", "grad-cam"], ["saliency_grad-cam_class*.png"], ["saliency/class"]),
    (["visualize", "saliency", "--steps", "8"], ["saliency_integrated-gradients_class*.png"], ["saliency/class"]),
    (["visualize", "top-activating", "--layer", "primary_caps", "--channel", "2", "--k", "5"],
     ["top_primary_caps_2.png"], ["top_activating/primary_caps_2"]),
])
def test_picture_commands_write_pngs_and_log_images(trained, monkeypatch, args, files, keys):
    monkeypatch.chdir(trained)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    pictures = next(trained.glob("runs/tiny/*/pictures"))
    for pattern in files:
        found = list(pictures.glob(pattern))
        assert found, (pattern, sorted(p.name for p in pictures.iterdir()))
        assert Image.open(found[0]).size[0] > 28
    client = MlflowClient(f"sqlite:///{trained}/runs/mlflow.db")
    run_id = pictures.parent.name
    logged = [a.path for a in client.list_artifacts(run_id, "images")]
    for key in keys:
        assert any(f"images/{key.replace('/', '~')}" in p for p in logged), (key, logged)  # MLflow writes / as ~


@pytest.mark.parametrize("args,words", [
    (["perturb", "--dim", "99"], ["--dim 99", "out of range", "8 dimensions"]),
    (["perturb", "--dim", "1", "--dims", "all"], ["not both"]),
    (["perturb", "--range", "x"], ["--range", "START:STOP"]),
    (["perturb", "--class", "42"], ["--class 42", "out of range"]),
    (["reconstruct", "--force-class", "11"], ["--force-class 11"]),
    (["visualize", "filters", "--layer", "nope"], ["--layer 'nope'", "conv1"]),
    (["visualize", "activations", "--index", "5000"], ["--index 5000", "out of range"]),
    (["visualize", "saliency", "--method", "shap"], ["--method", "grad-cam"]),
    (["perturb", "--run", "latest", "--checkpoint", "x.pt"], ["not both"]),
    (["perturb", "--image", "missing.png"], ["missing.png", "not found"]),
])
def test_picture_commands_bad_input(trained, monkeypatch, args, words):
    monkeypatch.chdir(trained)
    res = runner.invoke(app, [*args, "--no-log"] if args[0] != "visualize" else [*args, "--no-log"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_user_image_for_a_stereo_model_fills_both_views(tmp_path):
    page = np.zeros((60, 60), np.uint8)
    page[10:50, 25:35] = 255
    Image.fromarray(page).save(tmp_path / "bar.png")
    grey = load_user_image(tmp_path / "bar.png", (1, 32, 32))
    stereo = load_user_image(tmp_path / "bar.png", (2, 32, 32))  # smallNORB's two cameras
    assert stereo.shape == (1, 2, 32, 32)
    assert torch.equal(stereo[:, 0], grey[:, 0]) and torch.equal(stereo[:, 1], grey[:, 0])


def test_layer_output_stops_the_forward_at_the_layer_and_gives_what_the_layer_computed():
    model = build_model(MODELS.get("capsnet")(**{k: v for k, v in TINY_CAPSNET.items() if k != "name"}),
                        (1, 28, 28), 10).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ran = []
    model.primary_caps.register_forward_hook(lambda *a: ran.append("primary"))
    out = inside.layer_output(model, model.conv1, x)
    assert torch.equal(out, model.conv1(x)) and ran == []  # nothing after conv1 ran
    caps = inside.layer_output(model, model.primary_caps, x)
    assert ran == ["primary"] and torch.allclose(caps, model.primary_caps(torch.relu(model.conv1(x))), atol=1e-6)


def test_layer_output_of_a_model_that_encodes_in_chunks_has_every_image_and_skips_the_routing():
    model = build_model(MODELS.get("capsnet")(**{k: v for k, v in TINY_CAPSNET.items() if k != "name"}),
                        (1, 28, 28), 10).eval()
    caps = model.class_caps
    caps.INFERENCE_BYTES = 2 * caps.weight[..., 0].numel() * 4  # u_hat of two images: chunks of 2
    assert model.inference_chunk == 2
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    routed = []
    caps.register_forward_hook(lambda mod, inp, out: routed.append(len(inp[0])))
    out = inside.layer_output(model, model.conv1, x)
    assert out.shape[0] == 7 and torch.allclose(out, model.conv1(x), atol=1e-6) and routed == []
    with torch.no_grad():
        chunked = model.encode(x)
    assert routed == [2, 2, 2, 1]  # encoded two images at a time, as the chunk says
    with torch.enable_grad():
        whole = model.encode(x)  # with autograd: one pass over all seven
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_the_capsx_process_logs_its_pictures_through_the_tracking_process(trained):
    """As a user runs it (`capsx` in a fresh process, MLflow not yet imported): the logging runs in a
    second process, and the command ends with every image in the run; a dead store is one line."""
    import subprocess
    import sys

    capsx = [sys.executable, "-m", "capsx"]
    out = subprocess.run([*capsx, "perturb", "--dim", "1", "--samples", "2"], cwd=trained, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "logged 1 image(s) to run" in out.stdout, out.stdout + out.stderr
    run_id = next(trained.glob("runs/tiny/*/pictures")).parent.name
    client = MlflowClient(f"sqlite:///{trained}/runs/mlflow.db")
    assert any("images/perturb~dim1" in a.path for a in client.list_artifacts(run_id, "images"))
    dead = subprocess.run([*capsx, "visualize", "filters", "--tracking-uri", "http://127.0.0.1:9"], cwd=trained,
                          capture_output=True, text=True, timeout=120)
    assert dead.returncode != 0 and "Traceback" not in dead.stderr, dead.stderr
    assert dead.stderr.strip().startswith("error: ") and len(dead.stderr.strip().splitlines()) == 1, dead.stderr


def test_reconstruct_quotes_the_checkpoints_evaluation_and_it_matches_a_fresh_measurement(trained, monkeypatch):
    """By default `reconstruct` takes the mean error and the mistakes from the evaluation that wrote the
    checkpoint (no pass over the test split); measuring over the same 32 test images gives the same."""
    monkeypatch.chdir(trained)

    def said(args: list[str]) -> tuple[float, int, str]:
        res = runner.invoke(app, ["reconstruct", "--no-log", *args])
        assert res.exit_code == 0, res.output
        line = next(ln for ln in res.output.splitlines() if ln.startswith("mean reconstruction error"))
        error, wrong = line.split(": ")[-1].split("; ")
        return float(error), int(wrong.split()[0]), line

    recorded, recorded_wrong, line = said([])
    assert "over 32 test images, from the evaluation at epoch 1" in line
    measured, measured_wrong, line = said(["--error-images", "32"])
    assert "from the evaluation" not in line
    assert recorded == pytest.approx(measured, rel=1e-4) and recorded_wrong == measured_wrong
    best = Checkpoint.read(next(trained.glob("runs/tiny/*/checkpoints/best.pt")))
    assert best.state.test_mistakes is not None and len(best.state.test_mistakes) == recorded_wrong
    from capsx.jobs.context import Context
    from capsx.jobs.reconstruct import reconstruction_error
    from capsx.jobs.trained import open_run

    t = open_run("latest", Context(runs_dir=trained / "runs", device="cpu"))
    test = t.test_set()
    _, wrong = reconstruction_error(t, t.model, test.images, test.labels)
    assert best.state.test_mistakes == wrong  # the same images, named by their index in the test split


def _logged_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    """key -> the steps its images were logged at, read back through MLflow (its files: key+step+N+...)."""
    steps: dict[str, list[int]] = {}
    for a in MlflowClient(uri).list_artifacts(run_id, "images"):
        if a.path.endswith(".png"):
            key, _, step = a.path.split("/")[1].split("+")[:3]
            steps.setdefault(key.replace("~", "/"), []).append(int(step))
    return {k: sorted(v) for k, v in steps.items()}


@pytest.mark.parametrize("every,steps", [(1, [0, 1, 2, 3]), (2, [0, 2]), (0, [])])
def test_training_logs_its_pictures_epoch_by_epoch(workdir, every, steps):
    """The pictures of a 3-epoch CapsNet run, at step = epoch (0: untrained, what MLflow's image cards open
    on), under the picture commands' keys; and a picture command afterwards lands at the checkpoint's epoch."""
    recipe = workdir / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 3, "seed": 0},
                                                 tracking={"pictures_every": every})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    uri = f"sqlite:///{workdir}/runs/mlflow.db"
    run_id = next(workdir.glob("runs/tiny/*/run.json")).parent.name
    logged = _logged_steps(uri, run_id)
    keys = ["filters/conv1", "activations/conv1", "activations/primary_lengths", "recon/test", "routing/couplings"]
    if steps:
        assert all(logged.get(k) == steps for k in keys), logged
        assert any(k.startswith("perturb/class") and v == steps for k, v in logged.items()), logged
        cost = MlflowClient(uri).get_metric_history(run_id, "time/pictures_s")
        assert [m.step for m in cost] == steps and all(m.value > 0 for m in cost)
    else:
        assert logged == {}
    best = Checkpoint.read(next(workdir.glob("runs/tiny/*/checkpoints/best.pt")))
    assert runner.invoke(app, ["visualize", "filters"]).exit_code == 0
    assert _logged_steps(uri, run_id)["filters/conv1"] == sorted([*steps, best.epoch])


def test_drawing_the_pictures_leaves_the_training_as_it_was(workdir):
    """Weights after 2 epochs with pictures at every step (0, 1, 2) are bit-identical to those without."""
    weights = []
    for every in (1, 0):
        recipe = workdir / f"every{every}.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(name=f"every{every}", train={"epochs": 2, "seed": 0},
                                                     data={"name": "shapes", "train_size": 64, "test_size": 16,
                                                           "batch_size": 16, "augment": {"shift": 2}},
                                                     tracking={"pictures_every": every})))
        assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
        weights.append(Checkpoint.read(next(workdir.glob(f"runs/every{every}/*/checkpoints/last.pt"))).model)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_cnn_training_logs_filters_activations_and_saliency(workdir):
    recipe = workdir / "cnn.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model={"name": "convnet_small", "channels": [4, 8], "hidden": [16]},
                                                 train={"epochs": 2, "seed": 0})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run_id = next(workdir.glob("runs/tiny/*/run.json")).parent.name
    logged = _logged_steps(f"sqlite:///{workdir}/runs/mlflow.db", run_id)
    label = Checkpoint.read(next(workdir.glob("runs/tiny/*/checkpoints/best.pt")))  # the run's own test #0:
    first = recipe_from_dict(label.recipe, "t").data.load_test_split(workdir).labels[0]
    assert logged == {"filters/features.0": [0, 1, 2], "activations/features.0": [0, 1, 2],
                      f"saliency/class{int(first)}": [0, 1, 2]}, logged  # its own class's map: one key


def test_perturbation_columns_never_read_minus_zero():
    def columns(values: torch.Tensor) -> list[str]:  # as run_perturb labels them
        return [canvas.number(v, "+.2f") for v in values.tolist()]

    assert columns(torch.linspace(-0.25, 0.25, 11))[5] == "+0.00"
    assert columns(torch.tensor([-0.004, -1e-8, -0.0, 0.006])) == ["+0.00", "+0.00", "+0.00", "+0.01"]


def test_pictures_of_an_untracked_run_say_where_they_go(workdir):
    recipe = workdir / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert runner.invoke(app, ["train", str(recipe), "--no-track"]).exit_code == 0
    res = runner.invoke(app, ["visualize", "filters"])
    assert res.exit_code == 0, res.output
    assert "trained with tracking off (--no-track): its pictures go to" in res.output.replace("\n", " ")
    assert "logged" not in res.output


@pytest.mark.mnist
def test_a_real_digit_scanned_dark_on_white_comes_back_as_mnist_drew_it(tmp_path):
    """200 real MNIST test digits printed 5x larger, dark on a white page, off centre: `--image`'s
    preparation (invert, ink box to 20/28, centre of mass at the canvas centre) gives the digit back
    (MNIST's centres of mass sit at pixel 14, not 13.5: a one-pixel offset halves the thin digits' match)."""
    from tests.conftest import real_mnist_root

    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST is not here ($CAPSX_DATA or ../shared/data)")
    from capsx.data.mnist import read_mnist_test

    digits = read_mnist_test(root).images[:200, 0]
    match = []
    for i, digit in enumerate(digits):
        page = 255 - np.kron(digit.numpy(), np.ones((5, 5), np.uint8))
        Image.fromarray(np.pad(page, ((30, 10), (5, 60)), constant_values=255)).save(tmp_path / f"{i}.png")
        x = load_user_image(tmp_path / f"{i}.png", (1, 28, 28))[0, 0]
        match.append(torch.corrcoef(torch.stack([x.flatten(), digit.flatten().float()]))[0, 1].item())
    match_ = np.array(match)
    assert np.median(match_) > 0.985 and (match_ > 0.9).mean() >= 0.95, np.sort(match_)[:10]


def _numbers(line: str) -> list[tuple[int, float]]:
    tail = line.split("(index: score): ")[1]
    return [(int(a), float(b)) for a, b in (item.split(": ") for item in tail.split(", "))]


def test_picture_options_change_the_picture_they_name(trained, monkeypatch, tmp_path):
    """--limit, --in-channel and --image each take effect: the same call twice draws the same picture,
    another value another one; a limit keeps the top images among the first N."""
    monkeypatch.chdir(trained)
    pictures = next(trained.glob("runs/tiny/*/pictures"))

    def draw(*args: str, name: str) -> np.ndarray:
        res = runner.invoke(app, [*args, "--no-log"])
        assert res.exit_code == 0, res.output
        return np.asarray(Image.open(pictures / name))

    res = runner.invoke(app, ["visualize", "top-activating", "--limit", "32", "--k", "32", "--no-log"])
    everyone = dict(_numbers(next(x for x in res.output.splitlines() if "(index: score)" in x)))
    assert sorted(everyone) == list(range(32))
    res = runner.invoke(app, ["visualize", "top-activating", "--limit", "5", "--k", "3", "--no-log"])
    top = _numbers(next(x for x in res.output.splitlines() if "(index: score)" in x))
    expected = sorted(range(5), key=lambda i: -everyone[i])[:3]
    assert [i for i, _ in top] == expected and all(v == pytest.approx(everyone[i], abs=1e-3) for i, v in top)

    conv = "primary_caps.conv"  # 16 input channels
    first = draw("visualize", "filters", "--layer", conv, "--in-channel", "0", name=f"filters_{conv}.png")
    again = draw("visualize", "filters", "--layer", conv, "--in-channel", "0", name=f"filters_{conv}.png")
    other = draw("visualize", "filters", "--layer", conv, "--in-channel", "3", name=f"filters_{conv}.png")
    assert np.array_equal(first, again) and not np.array_equal(first, other)

    rec = recipe_from_dict(tiny_recipe(), "t")
    test = rec.data.load_splits(trained).test
    paths = []
    for i in (0, 1):
        paths.append(tmp_path / f"shape{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(paths[-1])
    acts = [draw("visualize", "activations", "--image", str(p), name="activations_conv1.png") for p in paths]
    assert not np.array_equal(*acts)
    assert np.array_equal(acts[0], draw("visualize", "activations", "--image", str(paths[0]),
                                        name="activations_conv1.png"))

    # reconstruct and perturb --image: the picture is of the user's images, in the class the model gives them
    from capsx.train.loop import load_model

    _, model = load_model(Checkpoint.read(next(pictures.parent.glob("checkpoints/best.pt"))), torch.device("cpu"))
    with torch.no_grad():
        predicted = model.eval()(load_user_image(paths[0], (1, 28, 28))).scores.argmax(1).item()
    one = draw("reconstruct", "--image", str(paths[0]), name="recon_images.png")
    two = draw("reconstruct", "--image", str(paths[0]), "--image", str(paths[1]), name="recon_images.png")
    assert two.shape[1] > one.shape[1]  # a column per image
    draw("perturb", "--image", str(paths[0]), name=f"perturb_sample_class{predicted}_0.png")
