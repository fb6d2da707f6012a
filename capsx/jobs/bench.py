"""`capsx bench`: throughput of a recipe's CapsNet against the plain reference, in one process.

The machine is noisy (the same run can differ 2x from one minute to the
next), so the two paths alternate, round after round, on the same weights and
inputs; we report medians and the median of the per-round ratios. Achieved
GFLOP/s is set against a large matrix product's rate measured in the same run.

On CUDA (`device`), the models, inputs and the matrix product run there, every
clock read waits for the device (kernels are asynchronous), and peak memory is
the allocator's peak (max_memory_allocated), not the process's RSS.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from capsx.errors import CapsxError
from capsx.models.capsnet import CapsNet, CapsNetConfig
from capsx.models.conv_algorithm import choices_made
from capsx.models.conv_algorithm import forget as forget_conv_choices
from capsx.models.reference import ReferenceCapsNet
from capsx.recipe import Recipe
from capsx.track.tracker import Tracker
from capsx.train.device import autocast, describe_device, synchronize
from capsx.train.memory import peak_bytes


@dataclass
class PathResult:
    train: list[float] = field(default_factory=list)  # images/s per round
    infer: list[float] = field(default_factory=list)
    infer_peak_bytes: int | None = None  # the process's RSS on the CPU; None on a GPU
    infer_peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated on CUDA; None elsewhere

    @property
    def train_median(self) -> float:
        return statistics.median(self.train)

    @property
    def infer_median(self) -> float:
        return statistics.median(self.infer)


@dataclass
class BenchResult:
    batch: int
    infer_batch: int
    precision: str
    rounds: int
    train_flops_per_image: float  # the direct computation's (the paper's layers as written)
    infer_flops_per_image: float
    train_flops_computed_per_image: float  # what capsx's fast path actually multiplies and adds
    matmul_peak_gflops: float
    fast: PathResult
    reference: PathResult
    compile_seconds: float | None = None  # torch.compile's first training + inference call (--compile)
    device: str = "cpu"  # describe_device's words
    matmul_peak_note: str = ""  # the product's dtype and, on CUDA, whether TF32 was allowed
    routing: str = "dynamic"  # the CapsNet's model.routing, benchmarked on both paths
    paths: dict[str, str] = field(default_factory=dict)  # PrimaryCaps' conv algorithm per problem, and why

    def ratio(self, kind: str) -> float:
        fast, ref = getattr(self.fast, kind), getattr(self.reference, kind)
        return statistics.median(f / r for f, r in zip(fast, ref, strict=True))

    @property
    def gflops_achieved(self) -> float:
        """Effective: the direct computation's FLOPs per second of capsx's training."""
        return self.train_flops_per_image * self.fast.train_median / 1e9

    @property
    def gflops_computed(self) -> float:
        """The arithmetic capsx actually performs per second of training."""
        return self.train_flops_computed_per_image * self.fast.train_median / 1e9

    def as_json(self) -> dict[str, float | int | str | dict[str, str] | None]:
        def mb(b: int | None) -> float | None:
            return None if b is None else round(b / 2**20, 1)

        return {
            "device": self.device, "routing": self.routing,
            "batch": self.batch, "infer_batch": self.infer_batch, "precision": self.precision, "rounds": self.rounds,
            "train_images_per_s": round(self.fast.train_median, 2),
            "infer_images_per_s": round(self.fast.infer_median, 2),
            "peak_rss_mb": mb(self.fast.infer_peak_bytes),
            "peak_gpu_mb": mb(self.fast.infer_peak_gpu_bytes),
            "gflops_achieved": round(self.gflops_achieved, 1),
            "matmul_peak_gflops": round(self.matmul_peak_gflops, 1),
            "matmul_peak_note": self.matmul_peak_note,
            "percent_of_matmul_peak": round(100 * self.gflops_achieved / self.matmul_peak_gflops, 1),
            "gflops_computed": round(self.gflops_computed, 1),
            "reference_train_images_per_s": round(self.reference.train_median, 2),
            "reference_infer_images_per_s": round(self.reference.infer_median, 2),
            "reference_peak_rss_mb": mb(self.reference.infer_peak_bytes),
            "reference_peak_gpu_mb": mb(self.reference.infer_peak_gpu_bytes),
            "train_speedup": round(self.ratio("train"), 2),
            "infer_speedup": round(self.ratio("infer"), 2),
            "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 1),
            "paths": self.paths,  # type: ignore[dict-item]
        }


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                       device: torch.device = torch.device("cpu"), budget_s: float = 5.0) -> float:
    """The best rate of an n x n matrix product on `device`, the machine's practical ceiling (fp32 on CUDA:
    TF32 or not as torch.backends.cuda.matmul.allow_tf32 says; torch's default is not). A lower precision
    is timed as training computes it, fp32 weights under autocast (on a CPU that is oneDNN's bf16 product;
    a bare bf16 `a @ b` there is a ~1.5 GFLOP/s fallback on CPUs without bf16 units). Where the product is
    slow, n is halved until the products fit `budget_s`, judged from a 256 x 256 product."""
    if device.type == "cuda":
        n = max(n, 8192)  # 2048 is over in microseconds on a GPU: the launch would dominate
    else:
        n = product_size(min(_product_seconds(256, dtype, device) for _ in range(2)), n, repeats, budget_s)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    product = _product(dtype, device)
    product(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        product(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def product_size(seconds_at_256: float, n: int, repeats: int, budget_s: float) -> int:
    """The largest n / 2^k (at least 256) whose repeats + 1 products, at the n^3 rate a 256 x 256 product
    took, fit `budget_s`."""
    while n > 256 and (repeats + 1) * seconds_at_256 * (n / 256) ** 3 > budget_s:
        n //= 2
    return n


def _product(dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if dtype == torch.float32:
        return torch.matmul

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype):
            return torch.nn.functional.linear(a, b)
    return product


def _product_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    product = _product(dtype, device)
    product(a, b)
    t = time.perf_counter()
    product(a, b)
    return time.perf_counter() - t


def matmul_note(dtype: torch.dtype, device: torch.device) -> str:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if device.type == "cuda" and dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return f"{name} matmul on {device.type}, TF32 {'on' if tf32 else 'off'} (torch.backends.cuda.matmul)"
    if dtype != torch.float32:
        return f"{name} matmul on {device.type} (fp32 operands under autocast, as training runs it)"
    return f"{name} matmul on {device.type}"


# torch's counter has no formula for the in-place batched product that the frequency-domain conv accumulates
# with (a third of its products went uncounted): the same formula as the out-of-place one
def _baddbmm_flop(self_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: object,
                  **kwargs: object) -> int:
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]


IN_PLACE_PRODUCTS = {torch.ops.aten.baddbmm_: _baddbmm_flop}


def _flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_PRODUCTS) as counter:
        fn()
    return float(counter.get_total_flops())


def _train_rate(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor, steps: int,
                precision: str) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=precision == "fp16")  # as the engine trains fp16
    model.train()
    synchronize(x.device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, criterion, x, y, opt, scaler, precision)
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - t)


def train_step(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
               opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: str) -> torch.Tensor:
    """One optimiser step on (x, y), the images their own reconstruction targets, as the engine steps
    (autocast, the GradScaler that fp16 needs); returns the loss, not waited for."""
    with autocast(x.device, precision):
        terms = criterion(model(x, y), x, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    scaler.step(opt)
    scaler.update()
    return terms.total.detach()


def _infer_rate(model: nn.Module, x: torch.Tensor, precision: str) -> float:
    model.eval()
    synchronize(x.device)
    t = time.perf_counter()
    with torch.inference_mode(), autocast(x.device, precision):
        model(x)
    synchronize(x.device)
    return len(x) / (time.perf_counter() - t)


def _costs(fast: CapsNet, ref: ReferenceCapsNet, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
           device: torch.device) -> tuple[float, float, float]:
    """FLOPs per image: of a training step and an inference as the paper computes them (direct convolutions),
    counted on the reference on the CPU (the same architecture everywhere), and of the arithmetic capsx's
    training step performs at the full batch on `device` (its frequency-domain PrimaryCaps, CPU only, does
    fewer multiply-adds for the same layer; its GFLOP/s is the rate it delivers the direct computation's
    work at, an effective rate). Moves both models to `device`."""
    def train_step() -> None:
        criterion(ref(x[:1], y[:1]), x[:1], y[:1]).total.backward()

    train_flops = _flops(train_step)
    infer_flops = _flops(lambda: ref.eval()(x[:1]))
    ref.zero_grad(set_to_none=True)
    fast.to(device)
    ref.to(device)
    xd, yd = x.to(device), y.to(device)

    def fast_train_step() -> None:  # at the full batch, on the device: which algorithm runs depends on both
        criterion(fast(xd, yd), xd, yd).total.backward()

    computed_flops = _flops(fast_train_step) / len(x)  # the same algorithm as under bf16 autocast
    fast.zero_grad(set_to_none=True)
    return train_flops, infer_flops, computed_flops


def log_bench(result: BenchResult, recipe: Recipe, uri: str) -> None:
    """A run in the MLflow experiment `bench`: the settings as params, every figure as a metric."""
    out = result.as_json()
    tracker = Tracker.start(uri, "bench", tags={"capsx.recipe": recipe.name, "capsx.host": platform.node(),
                                               "capsx.torch": torch.__version__})
    tracker.log_params({"batch": result.batch, "infer_batch": result.infer_batch, "precision": result.precision,
                        "rounds": result.rounds, "threads": torch.get_num_threads(),
                        "compile": result.compile_seconds is not None, "device": out["device"],
                        "routing": result.routing})
    tracker.log_metrics({k: float(v) for k, v in out.items() if isinstance(v, int | float)}, step=0)
    if result.paths:
        tracker.log_dict(result.paths, "conv_paths.json")
    tracker.end()


def bench_models(recipe: Recipe) -> tuple[CapsNet, ReferenceCapsNet]:
    """capsx's CapsNet and the plain reference of the same architecture, holding the same weights."""
    assert isinstance(recipe.model, CapsNetConfig)
    shape, classes = recipe.data.input_shape, len(recipe.data.classes)
    fast = recipe.model.build(shape, classes)
    assert isinstance(fast, CapsNet)
    kwargs = recipe.model.kwargs()
    kwargs["decoder_hidden"] = tuple(kwargs["decoder_hidden"])
    ref = ReferenceCapsNet(shape, classes, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def run_bench(recipe: Recipe, *, batch: int, infer_batch: int, rounds: int, steps: int, precision: str,
              compile: bool = False, device: torch.device = torch.device("cpu"),
              progress: Callable[[str], None] = lambda s: None) -> BenchResult:
    if not isinstance(recipe.model, CapsNetConfig):
        raise CapsxError(f"capsx bench compares CapsNet paths; recipe model is {recipe.model.name!r}")
    if precision == "fp16" and device.type != "cuda":
        raise CapsxError(f"--precision fp16 needs --device cuda (got {device.type}); use bf16 or fp32")
    torch.manual_seed(0)  # weights and inputs are drawn on the CPU, the same whatever the device
    forget_conv_choices()  # report this model's conv problems only (verdicts stay in the machine's cache)
    fast, ref = bench_models(recipe)
    shape, classes = recipe.data.input_shape, len(recipe.data.classes)
    criterion = recipe.loss_config
    x, y = torch.rand(batch, *shape), torch.randint(classes, (batch,))
    xi = torch.rand(infer_batch, *shape)

    train_flops, infer_flops, computed_flops = _costs(fast, ref, criterion, x, y, device)
    x, y, xi = x.to(device), y.to(device), xi.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak = matmul_peak_gflops(dtype, device=device)
    result = BenchResult(batch, infer_batch, precision, rounds, train_flops, infer_flops, computed_flops, peak,
                         PathResult(), PathResult(), device=describe_device(device),
                         matmul_peak_note=matmul_note(dtype, device), routing=recipe.model.routing)
    timed: nn.Module = fast
    if compile:
        timed = torch.compile(fast)  # type: ignore[assignment]
        t = time.perf_counter()
        _train_rate(timed, criterion, x, y, 1, precision)
        _infer_rate(timed, xi, precision)
        result.compile_seconds = time.perf_counter() - t
    for model in (timed, ref):  # warm-up: first calls allocate and pick kernels (capsx's: measure its conv's)
        _train_rate(model, criterion, x, y, 1, precision)
        if device.type != "cpu" or model is timed:
            _infer_rate(model, xi, precision)
    result.paths = {problem: choice.describe() for problem, choice in choices_made().items()}
    for r in range(rounds):
        for name, model, res in (("capsx", timed, result.fast), ("reference", ref, result.reference)):
            res.train.append(_train_rate(model, criterion, x, y, steps, precision))
            res.infer.append(_infer_rate(model, xi, precision))
            progress(f"round {r + 1}/{rounds} {name}: train {res.train[-1]:.1f} img/s, "
                     f"infer {res.infer[-1]:.1f} img/s")
    for model, res in ((timed, result.fast), (ref, result.reference)):
        def infer_once(m: nn.Module = model) -> None:
            _infer_rate(m, xi, precision)

        if device.type in ("cuda", "cpu"):
            peak_mem = peak_bytes(infer_once, device)
            if device.type == "cuda":
                res.infer_peak_gpu_bytes = peak_mem
            else:
                res.infer_peak_bytes = peak_mem
    return result
