"""On CUDA: the same weights give the CPU's outputs, a training step works in fp32, bf16 and fp16, and
`capsx train` then `--resume` run there. Skipped (with the reason) where torch sees no GPU; `make gpu-check`
runs them as `pytest -m gpu`."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from capsx.cli import app
from capsx.models import build_model
from capsx.recipe import Recipe, load_recipe
from capsx.train.checkpoint import load_checkpoint
from capsx.train.device import autocast
from tests.conftest import REPO, tiny_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"CUDA not available: torch {torch.__version__} sees no GPU"),
]

CUDA = torch.device("cuda")
RECIPES = {"capsnet": REPO / "recipes" / "mnist-capsnet.yaml", "baseline_cnn": REPO / "recipes" / "mnist-cnn.yaml"}


def _model(name: str) -> tuple[Recipe, nn.Module]:
    """The paper recipe's model, initialised from seed 0 on the CPU."""
    recipe = load_recipe(RECIPES[name])
    torch.manual_seed(0)
    return recipe, build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes), recipe.data.objects)


def _inputs(recipe: Recipe, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, *recipe.data.input_shape, generator=g),
            torch.randint(len(recipe.data.classes), (n,), generator=g))


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 on CUDA as fp32: TF32 rounds products to 10 mantissa bits, far outside a CPU comparison."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the largest magnitude: capsule entries near 0 make elementwise rtol meaningless."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# batch 300 for the CapsNet: the CPU takes its frequency-domain PrimaryCaps (>= 32 images) in chunks of 256,
# and both devices route in chunks of 256 under inference mode; CUDA's convolutions are cuDNN's direct ones
@pytest.mark.parametrize("name,batch", [("capsnet", 300), ("baseline_cnn", 8)])
def test_cuda_gives_the_cpus_outputs_for_the_same_weights(name, batch, no_tf32):
    recipe, cpu_model = _model(name)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    x, _ = _inputs(recipe, batch)
    cpu_model.eval()
    cuda_model.eval()
    with torch.inference_mode():
        want, got = cpu_model(x), cuda_model(x.to(CUDA))
    pairs = [("scores", want.scores, got.scores)]
    if want.capsules is not None:
        pairs += [("capsules", want.capsules, got.capsules), ("reconstruction", want.reconstruction,
                                                              got.reconstruction)]
    for what, w, g in pairs:
        assert g is not None and g.device.type == "cuda"
        assert _relative(g.cpu(), w) < 1e-4, what


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["capsnet", "baseline_cnn"])
def test_a_training_step_on_cuda(name, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"bf16 not supported on {torch.cuda.get_device_name()}")
    recipe, model = _model(name)
    model.to(CUDA).train()
    x, y = (t.to(CUDA) for t in _inputs(recipe, 16))
    criterion = recipe.loss_config
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # as capsx/engine.py trains fp16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # GradScaler skips a step whose scaled gradients overflow and halves its scale (its job, not a failure):
    # a few tries, as a run's first steps would
    for _ in range(5):
        with autocast(CUDA, precision):
            terms = criterion(model(x, y), x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.unscale_(opt)
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        if grads_finite:
            break
    assert math.isfinite(terms.total.item()), terms.total
    assert grads_finite
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    changed = _changed(before, model)
    assert changed, "no weight moved"
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed), set(trainable) - set(changed)


def test_train_then_resume_on_cuda_into_a_real_mlflow_store(workdir):
    raw = tiny_recipe(train={"epochs": 1, "seed": 0, "log_every": 2})
    raw["device"] = "cuda"
    recipe = workdir / "tiny-cuda.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(recipe)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "cuda (" in res.output  # the banner's describe_device
    first = load_checkpoint(next((workdir / "runs" / "tiny").glob("*/checkpoints/last.pt")))
    assert first["state"]["epoch"] == 1 and "cuda" in first["rng"]

    res = runner.invoke(app, ["train", "--resume", "latest", "train.epochs=2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (last,) = (workdir / "runs" / "tiny").glob("*/checkpoints/last.pt")  # the same run directory
    resumed = load_checkpoint(last)
    steps = 96 // 16
    assert resumed["state"]["epoch"] == 2 and resumed["state"]["global_step"] == 2 * steps
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())
    moved = [k for k, v in resumed["model"].items() if v.is_floating_point() and not torch.equal(v, first["model"][k])]
    assert moved, "the second epoch changed nothing"

    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])  # one run, continued
    assert run.info.status == "FINISHED" and run.data.tags["capsx.device"].startswith("cuda")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2]


def test_shift_and_crop_offsets_are_the_cpus_on_cuda():
    """The same seed gives the same training data on either device (offsets are drawn on the CPU)."""
    from capsx.data import Batches, ImageSet

    g = torch.Generator().manual_seed(3)
    data = ImageSet(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (40,), generator=g))

    def batches(d: ImageSet) -> list[torch.Tensor]:
        return [b.images.cpu() for b in Batches(d, 16, shuffle=True, seed=5, shift=2, crop=10).epoch(1)]
    on_cpu, on_cuda = batches(data), batches(data.to(CUDA))
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, on_cuda, strict=True))


def _synchronizing_calls(recipe: Recipe, tmp_path) -> int:
    """How many calls of one CPU-side `fit` waited for the GPU (torch's sync debug mode warns on each)."""
    import warnings

    from capsx.track.tracker import NullTracker
    from capsx.train.loop import QuietReporter, Run, fit

    (tmp_path / "checkpoints").mkdir(parents=True)
    run = Run(device=CUDA, data_root=tmp_path, run_dir=tmp_path, tracker=NullTracker("local"),
              reporter=QuietReporter())
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(recipe, run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_a_training_step_on_cuda_waits_for_the_gpu_less_than_once(tmp_path):
    """Syncs per step from two trainings that differ only in their number of steps (the same
    evaluation, checkpoints and set-up): the loop reads the losses every 16 steps, not 4 times a step."""
    from capsx.recipe import recipe_from_dict

    def recipe(train_size: int) -> Recipe:
        raw = tiny_recipe(data={"name": "shapes", "train_size": train_size, "test_size": 32, "batch_size": 16,
                                "augment": {"shift": 2}}, train={"epochs": 1, "seed": 0, "log_every": 16})
        raw["device"] = "cuda"
        raw["tracking"] = {"pictures_every": 0}
        return recipe_from_dict(raw, "t")

    short = _synchronizing_calls(recipe(16 * 32), tmp_path / "short")
    long = _synchronizing_calls(recipe(16 * 96), tmp_path / "long")
    per_step = (long - short) / 64
    assert per_step <= 2 / 16, f"{per_step:.3f} synchronizing calls per training step ({short} and {long})"


def test_bf16_on_a_gpu_without_bf16_units_is_told_to_use_fp16():
    from capsx.train.preflight import bf16_advice

    native = torch.cuda.is_bf16_supported(including_emulation=False)
    advice = bf16_advice(CUDA, "bf16")
    assert (advice is None) == native and bf16_advice(CUDA, "fp32") is None
    if advice is not None:
        assert "train.precision=fp16" in advice and torch.cuda.get_device_name(CUDA) in advice
