"""Data-parallel training: N processes (torchrun + DDP, gloo on CPU) see exactly the data one process sees,
end with the same weights, log one set of metrics, and resume exactly after Ctrl-C."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch.utils.data import DistributedSampler

from capsx.data import Batches, ImageSet
from tests.conftest import tiny_recipe

CAPSX = str(Path(sys.executable).with_name("capsx"))


def _imageset(n: int) -> ImageSet:
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(images, torch.arange(n))


def test_the_processes_batches_make_up_the_one_process_batch_with_the_same_shifts():
    data = _imageset(96)
    one = Batches(data, 16, shuffle=True, seed=3, shift=2)
    two = [Batches(data, 16, shuffle=True, seed=3, shift=2, rank=r, world=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 6
    for epoch in (0, 1):
        for (x, y, _), (x0, y0, _), (x1, y1, _) in zip(one.epoch(epoch), two[0].epoch(epoch), two[1].epoch(epoch),
                                                       strict=True):
            assert len(y0) == len(y1) == 8
            # rank r holds every 2nd image of the global batch, starting at r, shifted the same way
            assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
            assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
    assert not torch.equal(one.order(0), one.order(1))  # reshuffled every epoch


@pytest.mark.parametrize("n", [96, 25])
def test_each_process_gets_what_torchs_distributed_sampler_gives_it(n):
    data = _imageset(n)
    order = Batches(data, 4, shuffle=True, seed=1).order(0)  # the epoch's order, the same on every process
    for rank in range(2):
        mine = torch.cat([y for _, y, _ in Batches(data, 4, shuffle=True, seed=1, rank=rank, world=2).epoch(0)])
        sampler = DistributedSampler(order.tolist(), num_replicas=2, rank=rank, shuffle=False)  # type: ignore[arg-type]
        assert mine.tolist() == [int(order[i]) for i in sampler]


def test_sharded_evaluation_sees_every_test_image_once():
    data = _imageset(25)
    shards = [Batches(data, 4, rank=r, world=3) for r in range(3)]
    seen = torch.cat([y for b in shards for _, y, _ in b.epoch(0)])
    assert sorted(seen.tolist()) == list(range(25))
    # what evaluation names its mistakes by: each example's index in the split, whichever process saw it
    named = [(i, y) for b in shards for idx, (_, ys, _) in b.indexed(0) for i, y in zip(idx.tolist(), ys.tolist(),
                                                                                       strict=True)]
    assert sorted(i for i, _ in named) == list(range(25)) and all(i == y for i, y in named)  # label = index


def _last_weights(run_dir_glob: Path) -> dict[str, torch.Tensor]:
    (path,) = run_dir_glob.parent.glob(run_dir_glob.name + "/checkpoints/last.pt")
    return torch.load(path, weights_only=True)["model"]


def test_two_processes_match_one_and_resume_exactly_after_ctrl_c(workdir):
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 960, "test_size": 48, "batch_size": 16, "augment": {"shift": 2}},
        train={"epochs": 2, "seed": 0, "log_every": 25},
        # SGD: its step is linear in the gradient, so the two processes' averaged gradient must give the
        # one process's weights to rounding; Adam divides by sqrt(v), which turns rounding in near-zero
        # gradients into updates of lr's size (fused Adam: 4.8e-5 apart after 120 steps)
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})))
    env = {**os.environ, "COLUMNS": "200"}

    def train(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([CAPSX, "train", str(recipe), *args], cwd=workdir, env=env, text=True,
                             capture_output=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    train("--nproc", "2", "--runs-dir", "two")
    train("--runs-dir", "one", "--no-track")
    two, one = _last_weights(workdir / "two/tiny/*"), _last_weights(workdir / "one/tiny/*")
    for k in one:  # same global batches, gradients averaged over the two halves: the same steps
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    mistakes = [torch.load(next(workdir.glob(f"{d}/tiny/*/checkpoints/last.pt")), weights_only=True)["state"]
                ["test_mistakes"] for d in ("two", "one")]
    assert mistakes[0] == mistakes[1]  # the sharded evaluation names the same test images as one process

    client = MlflowClient(f"sqlite:///{workdir}/two/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])  # one run, not two
    assert run.data.params["distributed.processes"] == "2"
    assert run.data.tags["distributed.batch_per_process"] == "8"  # the global 16 over 2
    threads = max(1, (os.cpu_count() or 1) // 2)  # the cores shared by the two processes
    assert run.data.tags["capsx.device"].startswith(f"cpu ({threads} threads, "), run.data.tags["capsx.device"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/error")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")] == [25, 50, 75, 100]

    # Ctrl-C at a terminal signals the whole process group: the launcher and both workers
    proc = subprocess.Popen([CAPSX, "train", str(recipe), "--nproc", "2", "--runs-dir", "cut", "--no-track"],
                            cwd=workdir, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/2 step" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out
    assert "interrupted by SIGINT" in out and "--nproc 2" in out and "Traceback" not in out, out
    res = subprocess.run([CAPSX, "train", "--resume", "latest", "--nproc", "2", "--runs-dir", "cut", "--no-track"],
                         cwd=workdir, env=env, text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cut = _last_weights(workdir / "cut/tiny/*")
    for k in two:
        assert torch.equal(cut[k], two[k]), k


def test_two_processes_train_a_capsnet_whose_decoder_no_loss_trains(workdir):
    """`loss.recon_weight: 0` with the decoder kept (the paper's Table 1 "no reconstruction" cell): its
    parameters get no gradient, which data-parallel training must not wait for."""
    recipe = workdir / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        data={"name": "shapes", "train_size": 128, "test_size": 32, "batch_size": 16},
        loss={"name": "margin", "recon_weight": 0.0}, tracking={"pictures_every": 0})))
    res = subprocess.run([CAPSX, "train", str(recipe), "--nproc", "2", "--no-track"], cwd=workdir, text=True,
                         capture_output=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    last = torch.load(next(workdir.glob("runs/tiny/*/checkpoints/last.pt")), weights_only=True)
    assert last["state"]["epoch"] == 1  # the epoch ran to its end
    assert any(k.startswith("decoder.") for k in last["model"])  # the decoder kept, for the pictures


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs for --nproc 2")
def test_more_cuda_processes_than_gpus_is_one_line_before_any_worker_starts(workdir):
    """Refused in the launching process, so no worker prints torch's 'invalid device ordinal'."""
    from capsx.errors import CapsxError
    from capsx.train.distributed import check_gpus

    gpus = torch.cuda.device_count()
    with pytest.raises(CapsxError) as e:
        check_gpus(gpus + 1)
    assert str(e.value) == (f"--nproc {gpus + 1} on CUDA takes a GPU per process, and this machine has {gpus}; "
                            f"use --nproc {gpus} or fewer, or device: cpu")
    if gpus == 0:  # without CUDA the recipe's device is refused first, also before any worker
        recipe = workdir / "r.yaml"
        recipe.write_text(yaml.safe_dump({**tiny_recipe(), "device": "cuda"}))
        out = subprocess.run([sys.executable, "-m", "capsx", "train", str(recipe), "--nproc", "2"],
                             capture_output=True, text=True, timeout=120)
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: device 'cuda' is not available here")
