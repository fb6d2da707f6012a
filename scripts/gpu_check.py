"""`make gpu-check`: everything capsx promises on CUDA, in one command of at most five minutes.

Without CUDA it prints one line and exits 0: there is nothing to check. With CUDA it runs the steps below,
each in its own process with a timeout (a hung kernel or launcher cannot hang the check), in a temporary
folder (runs, MLflow store, pictures: nothing is written into the repository), on generated data only, and
prints one table: a line per step, ok / FAILED / skipped, its figure and seconds. Exit 1 if a step failed.

`--rehearse-on-cpu` runs every step it can on the CPU instead, at small batches (fp16 and NCCL need CUDA:
they are listed as skipped), so the step code is proven on a machine without a GPU; its figures are not
the GPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 300  # the whole check on CUDA
REHEARSAL_BUDGET_S = 1200  # the CPU is ~100x slower, even at the rehearsal's small batches
ROWS_MARK = "GPU_CHECK_ROWS "  # a child's last stdout line: this, then its rows as JSON
RESUME_TOLERANCE = 1e-4  # largest weight difference / the tensor's largest magnitude, straight vs resumed


@dataclass
class Row:
    step: str
    status: str  # ok, FAILED or skipped
    figure: str
    seconds: float


@dataclass
class Context:
    device: str  # cuda, or cpu for the rehearsal
    rehearse: bool
    tmp: Path
    deadline: float
    env: dict[str, str]

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------------------- processes


def _run(cmd: list[str], ctx: Context, timeout: float, cwd: Path | None = None) -> tuple[int | None, str, float]:
    """Run `cmd` in its own process group; on timeout kill the whole group (torchrun's workers too).
    Returns (exit code or None on timeout, stdout + stderr, seconds)."""
    timeout = max(1.0, min(timeout, ctx.left()))
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd or ctx.tmp, env=ctx.env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - t


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1][:150] if lines else "(no output)"


def _why(code: int | None, out: str) -> str:
    return f"timed out: {_last_line(out)}" if code is None else f"exit {code}: {_last_line(out)}"


def _capsx(*args: str) -> list[str]:
    return [sys.executable, "-m", "capsx", *args]


def _child(ctx: Context, name: str, timeout: float) -> list[Row]:
    """One of this script's in-process steps (`--child NAME`), in a process of its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", ctx.device, "--tmp",
           str(ctx.tmp), *(["--rehearse-on-cpu"] if ctx.rehearse else [])]
    code, out, seconds = _run(cmd, ctx, timeout)
    marked = [ln for ln in out.splitlines() if ln.startswith(ROWS_MARK)]
    if code == 0 and marked:
        return [Row(*r) for r in json.loads(marked[-1][len(ROWS_MARK):])]
    return [Row(name, "FAILED", _why(code, out), seconds)]


# ------------------------------------------------------------------------------------------- the steps


def step_pytest(ctx: Context) -> list[Row]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--basetemp",
           str(ctx.tmp / "pytest")]
    code, out, seconds = _run(cmd, ctx, 150, cwd=REPO)
    summary = _last_line(out).strip("= ")
    note = " (CPU rehearsal: the tests need CUDA)" if ctx.rehearse and "skipped" in summary else ""
    return [Row("pytest -m gpu", "ok" if code == 0 else "FAILED", summary + note if code == 0 else _why(code, out),
                seconds)]


def step_train_times(ctx: Context) -> list[Row]:
    return [*_child(ctx, "steps:capsnet", 75), *_child(ctx, "steps:baseline_cnn", 75)]


def step_memory(ctx: Context) -> list[Row]:
    return _child(ctx, "memory", 60)


def _quick_runs(ctx: Context) -> Path:
    return ctx.tmp / "quickstart"


def step_quickstart(ctx: Context) -> list[Row]:
    """The brief's one-GPU run. With --nproc 1 capsx trains in this process (it starts torchrun only for
    N > 1), so NCCL is checked on its own below; this run also gives the picture steps their model."""
    cmd = _capsx("train", str(REPO / "recipes" / "quickstart.yaml"), "--nproc", "1", "--set", f"device={ctx.device}",
                 "--set", "train.epochs=1", "--set", "data.train_size=512", "--set", "data.test_size=256",
                 "--no-track", "--runs-dir", str(_quick_runs(ctx)))
    code, out, seconds = _run(cmd, ctx, 90)
    name = f"train quickstart --nproc 1 ({ctx.device})"
    if code != 0:
        return [Row(name, "FAILED", _why(code, out), seconds)]
    error = _final_error(next(_quick_runs(ctx).glob("*/*/checkpoints/last.pt")))
    return [Row(name, "ok", f"test error {100 * error:.2f}% after 1 epoch of 512", seconds)]


def step_nccl(ctx: Context) -> list[Row]:
    if ctx.rehearse:
        return [Row("NCCL all_reduce + DDP step", "skipped", "needs CUDA (CPU rehearsal)", 0.0)]
    rows = _child(ctx, "nccl", 60)
    import torch

    name = "train quickstart --nproc 2 (NCCL)"
    if torch.cuda.device_count() < 2:
        return [*rows, Row(name, "skipped", f"needs 2 GPUs, this machine has {torch.cuda.device_count()}", 0.0)]
    cmd = _capsx("train", str(REPO / "recipes" / "quickstart.yaml"), "--nproc", "2", "--set", "device=cuda",
                 "--set", "train.epochs=1", "--set", "data.train_size=512", "--set", "data.test_size=256",
                 "--no-track", "--runs-dir", str(ctx.tmp / "nproc2"))
    code, out, seconds = _run(cmd, ctx, 120)
    if code != 0:
        return [*rows, Row(name, "FAILED", _why(code, out), seconds)]
    error = _final_error(next((ctx.tmp / "nproc2").glob("*/*/checkpoints/last.pt")))
    return [*rows, Row(name, "ok", f"test error {100 * error:.2f}% after 1 epoch of 512", seconds)]


def step_resume(ctx: Context) -> list[Row]:
    """2 epochs straight against 1 epoch then `--resume DIR train.epochs=2`, through the CLI: with
    torch's default kernels (CUDA's are not bitwise deterministic: within RESUME_TOLERANCE), and with
    `train.deterministic` (bit-identical)."""
    return [_resume_row(ctx, deterministic=False), _resume_row(ctx, deterministic=True)]


def _resume_row(ctx: Context, deterministic: bool) -> Row:
    import yaml

    name = f"--resume ({ctx.device}{', deterministic' if deterministic else ''})"
    tag = "det" if deterministic else "default"
    recipe = ctx.tmp / f"resume-{tag}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "resume", "device": ctx.device,
        "model": {"name": "capsnet", "conv1_channels": 32, "primary_types": 8, "class_dim": 16,
                  "decoder_hidden": [64, 128]},
        "data": {"name": "shapes", "train_size": 512, "test_size": 256, "batch_size": 32, "augment": {"shift": 2}},
        # the default exponential schedule: its lr does not depend on train.epochs, so 1 + 1 epochs are 2
        "train": {"epochs": 2, "seed": 0, "deterministic": deterministic}}))
    straight, cut = ctx.tmp / f"resume-straight-{tag}", ctx.tmp / f"resume-cut-{tag}"
    t = time.monotonic()
    for cmd in (_capsx("train", str(recipe), "--no-track", "--runs-dir", str(straight)),
                _capsx("train", str(recipe), "--set", "train.epochs=1", "--no-track", "--runs-dir", str(cut))):
        code, out, _ = _run(cmd, ctx, 60)
        if code != 0:
            return Row(name, "FAILED", _why(code, out), time.monotonic() - t)
    (run_dir,) = cut.glob("resume/*")
    code, out, _ = _run(_capsx("train", "--resume", str(run_dir), "train.epochs=2", "--no-track", "--runs-dir",
                               str(cut)), ctx, 60)
    if code != 0:
        return Row(name, "FAILED", "the resume: " + _why(code, out), time.monotonic() - t)
    from capsx.train.checkpoint import load_checkpoint

    a = load_checkpoint(next(straight.glob("resume/*/checkpoints/last.pt")))
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    ea, eb = a["state"]["history"][-1]["test/error"], b["state"]["history"][-1]["test/error"]
    diff = max(((a["model"][k].double() - b["model"][k].double()).abs().max()
                / a["model"][k].double().abs().max().clamp_min(1e-30)).item()
               for k in a["model"] if a["model"][k].is_floating_point())
    same = "matches" if ea == eb else "differs"
    tolerance = 0.0 if deterministic else RESUME_TOLERANCE
    ok = diff <= tolerance and b["state"]["epoch"] == 2
    return Row(name, "ok" if ok else "FAILED", f"test error {100 * ea:.2f}% vs {100 * eb:.2f}% ({same}); "
               f"max weight diff {diff:.1e} rel (pass <= {tolerance:g})", time.monotonic() - t)


def step_bench(ctx: Context) -> list[Row]:
    small = ["--batch", "16", "--infer-batch", "32", "--steps", "1"] if ctx.rehearse else []
    cmd = _capsx("bench", str(REPO / "recipes" / "mnist-capsnet.yaml"), "--device", ctx.device, "--rounds", "2",
                 "--json", "--no-track", *small)
    code, out, seconds = _run(cmd, ctx, 120)
    name = f"capsx bench --device {ctx.device}"
    if code != 0:
        return [Row(name, "FAILED", _why(code, out), seconds)]
    r = json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("{")))
    peak = r["peak_gpu_mb"] if r["peak_gpu_mb"] is not None else r["peak_rss_mb"]
    return [Row(name, "ok", f"train {r['train_images_per_s']:,.0f} img/s (x{r['train_speedup']} vs reference), "
                            f"infer {r['infer_images_per_s']:,.0f} img/s (x{r['infer_speedup']}), peak {peak} MB",
                seconds)]


PICTURES = [
    ("perturb", []), ("reconstruct", ["--error-images", "256"]), ("visualize filters", []),
    ("visualize activations", []), ("visualize routing", []), ("visualize saliency", []),
    ("visualize top-activating", []),
]


def step_pictures(ctx: Context) -> list[Row]:
    rows = []
    have_run = any(_quick_runs(ctx).glob("*/*/checkpoints/best.pt"))
    for command, extra in PICTURES:
        name = f"{command} ({ctx.device})"
        if not have_run:
            rows.append(Row(name, "FAILED", "no model: the quickstart training step failed", 0.0))
            continue
        cmd = _capsx(*command.split(), "--run", "latest", "--runs-dir", str(_quick_runs(ctx)), "--device",
                     ctx.device, "--no-log", *extra)
        code, out, seconds = _run(cmd, ctx, 45)
        wrote = out.count("  wrote ")
        ok = code == 0 and wrote > 0
        rows.append(Row(name, "ok" if ok else "FAILED", f"{wrote} PNG(s)" if ok else _why(code, out), seconds))
    return rows


STEPS: list[tuple[str, Callable[[Context], list[Row]]]] = [
    ("pytest -m gpu", step_pytest), ("train step times", step_train_times), ("peak memory", step_memory),
    ("quickstart --nproc 1", step_quickstart), ("NCCL", step_nccl), ("--resume", step_resume),
    ("capsx bench", step_bench), ("pictures", step_pictures),
]


def _final_error(last_pt: Path) -> float:
    from capsx.train.checkpoint import load_checkpoint

    return float(load_checkpoint(last_pt)["state"]["history"][-1]["test/error"])


# --------------------------------------------------------------------------- in-process steps (children)


def _paper_model(which: str, device: Any) -> tuple[Any, Any, Any]:
    import torch

    from capsx.models import build_model
    from capsx.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / ("mnist-capsnet.yaml" if which == "capsnet" else "mnist-cnn.yaml"))
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes), recipe.data.objects)
    return recipe, model.to(device), recipe.loss_config


def _batch(recipe: Any, n: int, device: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *recipe.data.input_shape, generator=g)
    y = torch.randint(len(recipe.data.classes), (n,), generator=g)
    return x.to(device), y.to(device)


def _train_step(model: Any, criterion: Any, x: Any, y: Any, opt: Any, scaler: Any, precision: str) -> float:
    from capsx.jobs.bench import train_step

    return float(train_step(model, criterion, x, y, opt, scaler, precision).item())


def child_steps(which: str, device: Any, rehearse: bool) -> list[Row]:
    """ms per training step at batch 128 (rehearsal: 8 or 4), fp32 / bf16 / fp16, median after warm-up."""
    import torch

    from capsx.train.device import synchronize

    recipe, model, criterion = _paper_model(which, device)
    batch = (8 if which == "capsnet" else 4) if rehearse else 128
    warmup, timed = (1, 2) if rehearse else (3, 10)
    x, y = _batch(recipe, batch, device)
    model.train()
    rows = []
    for precision in ("fp32", "bf16", "fp16"):
        name = f"train step {which} {precision} b{batch}"
        if precision == "fp16" and device.type != "cuda":
            rows.append(Row(name, "skipped", "fp16 needs CUDA (CPU rehearsal)", 0.0))
            continue
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            rows.append(Row(name, "skipped", f"bf16 not supported on {torch.cuda.get_device_name(device)}", 0.0))
            continue
        t0 = time.monotonic()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        times, loss = [], math.nan
        for i in range(warmup + timed):
            synchronize(device)
            t = time.perf_counter()
            loss = _train_step(model, criterion, x, y, opt, scaler, precision)  # .item() waits for the step
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        ok = math.isfinite(loss)
        rows.append(Row(name, "ok" if ok else "FAILED", f"{1000 * statistics.median(times):.1f} ms/step "
                        f"(median of {timed}){'' if ok else f', loss {loss}'}", time.monotonic() - t0))
        del opt, scaler
    if device.type == "cuda":
        convs, matmuls = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        rows[0].figure += (f"; torch defaults: TF32 convs {'on' if convs else 'off'}, "
                           f"matmuls {'on' if matmuls else 'off'}")
    return rows


def child_memory(device: Any, rehearse: bool) -> list[Row]:
    """The CapsNet's peak for a batch-128 training step (weights, gradients, Adam state, activations) and a
    batch-1000 inference; the rehearsal reads the process's peak RSS at small batches."""
    import torch

    from capsx.train.memory import peak_bytes

    recipe, model, criterion = _paper_model("capsnet", device)
    train_b, infer_b = (16, 100) if rehearse else (128, 1000)
    x, y = _batch(recipe, train_b, device)
    xi, _ = _batch(recipe, infer_b, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    _train_step(model, criterion, x, y, opt, scaler, "fp32")  # Adam's state exists from the first step on

    def peak(fn: Callable[[], object]) -> int | None:
        return peak_bytes(fn, device)

    what = "GPU memory (max_memory_allocated)" if device.type == "cuda" else "RSS above start (CPU rehearsal)"
    rows = []
    t = time.monotonic()
    train_peak = peak(lambda: _train_step(model, criterion, x, y, opt, scaler, "fp32"))
    rows.append(Row(f"peak memory capsnet train b{train_b}", "ok", f"{(train_peak or 0) / 2**20:,.0f} MB {what}",
                    time.monotonic() - t))
    opt.state.clear()  # inference needs neither Adam's state nor gradients: freed, not counted
    model.zero_grad(set_to_none=True)
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(xi)

    t = time.monotonic()
    infer_peak = peak(infer)
    rows.append(Row(f"peak memory capsnet infer b{infer_b}", "ok", f"{(infer_peak or 0) / 2**20:,.0f} MB {what}",
                    time.monotonic() - t))
    return rows


def child_nccl(device: Any) -> list[Row]:
    """NCCL as DDP uses it, in one process: capsx itself starts a process group only for --nproc > 1."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from capsx.recipe import load_recipe

    t = time.monotonic()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        v = torch.arange(4.0, device=device)
        dist.all_reduce(v)
        assert v.tolist() == [0.0, 1.0, 2.0, 3.0], v
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
        from capsx.models import build_model

        torch.manual_seed(0)
        model = build_model(recipe.model, recipe.data.input_shape, len(recipe.data.classes)).to(device)
        net = DistributedDataParallel(model, device_ids=[device.index or 0])
        x, y = _batch(recipe, 32, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = _train_step(net, recipe.loss_config, x, y, opt, torch.amp.GradScaler("cuda", enabled=False), "fp32")
        grads = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()
    version = ".".join(map(str, torch.cuda.nccl.version()))
    ok = math.isfinite(loss) and grads
    return [Row("NCCL all_reduce + DDP step", "ok" if ok else "FAILED",
                f"NCCL {version}, world 1: all_reduce right, DDP step loss {loss:.3f}", time.monotonic() - t)]


def child(name: str, device_name: str, rehearse: bool) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device(device_name)
    if name.startswith("steps:"):
        rows = child_steps(name.split(":", 1)[1], device, rehearse)
    elif name == "memory":
        rows = child_memory(device, rehearse)
    elif name == "nccl":
        rows = child_nccl(device)
    else:
        raise SystemExit(f"unknown child step {name!r}")
    print(ROWS_MARK + json.dumps([[r.step, r.status, r.figure, round(r.seconds, 1)] for r in rows]), flush=True)


# ------------------------------------------------------------------------------------------------ main


def _table(rows: list[Row]) -> str:
    head = ("step", "result", "figure", "seconds")
    cells = [head, *((r.step, r.status, r.figure, f"{r.seconds:.1f}") for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:<{widths[2]}}  {c[3]:>7}" for c in cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="Run every step that can run on the CPU, at small batches (no GPU needed).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.rehearse_on_cpu)
        return 0

    import torch

    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        why = ("is a CPU-only build" if torch.version.cuda is None else "sees no GPU")
        print(f"gpu-check: CUDA not available (torch {torch.__version__} {why}); nothing ran")
        return 0
    sys.path.insert(0, str(REPO))
    device = "cpu" if args.rehearse_on_cpu else "cuda"
    budget = REHEARSAL_BUDGET_S if args.rehearse_on_cpu else BUDGET_S
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="capsx-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "PYTHONDONTWRITEBYTECODE": "1", "CAPSX_CACHE": str(tmp / "cache"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "COLUMNS": "200"}
        ctx = Context(device, args.rehearse_on_cpu, tmp, start + budget, env)
        rows: list[Row] = []
        for label, step in STEPS:
            if ctx.left() < 5:
                rows.append(Row(label, "FAILED", f"not run: the {budget} s budget was spent", 0.0))
                continue
            try:
                new = step(ctx)
            except Exception as e:  # a bug in this script's step: say so in its row, run the others
                new = [Row(label, "FAILED", f"{type(e).__name__}: {str(e)[:140]}", 0.0)]
            for r in new:
                print(f"gpu-check: {r.step}: {r.status} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
            rows += new
    where = (f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda"
             else f"cpu ({torch.get_num_threads()} threads): a REHEARSAL, small batches, not GPU figures")
    print(f"gpu-check on {where}, torch {torch.__version__}, {time.monotonic() - start:.0f} s")
    print(_table(rows))
    failed = [r.step for r in rows if r.status == "FAILED"]
    if failed:
        print(f"gpu-check: {len(failed)} step(s) FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
