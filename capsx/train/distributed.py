"""Data-parallel training on PyTorch's own engine: torchrun starts the workers,
DistributedDataParallel averages the gradients, and `Group` is the little the
loop needs to know about the others (who am I, sum this, do we all stop).

Without torchrun's environment there is one process and every call is a no-op,
so the single-process path runs the same code.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from capsx.errors import CapsxError


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (CPU for gloo)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone talks to the user, logs to MLflow and writes checkpoints."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over all processes (a new tensor on t's device)."""
        if not self.active:
            return t.clone()
        buf = t.detach().to(self.device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any: all stop at the same step, or none does."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([int(flag)])).item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Group()


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the recipe's (global) batch; it must divide evenly."""
    if batch_size % processes:
        raise CapsxError(f"data.batch_size {batch_size} is the global batch and must divide evenly "
                         f"over {processes} processes")
    return batch_size // processes


def in_worker() -> bool:
    """Started by torchrun (or another launcher that sets the same variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun describes in the environment; returns it and this process's device
    (cuda:LOCAL_RANK on CUDA). Backend: NCCL on CUDA, gloo otherwise."""
    if not in_worker():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        check_gpus(local_world)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
        # the cores are shared by the processes on this node: oversubscribing them is much slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        raise CapsxError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not {device.type}; "
                         "set device: cpu or cuda")
    if not dist.is_initialized():  # NCCL bound to this process's GPU now, not guessed at the first collective
        dist.init_process_group(backend, timeout=timedelta(minutes=10),
                                device_id=device if backend == "nccl" else None)
    comm = device if backend == "nccl" else torch.device("cpu")
    return Group(rank, world, local_rank, local_world, comm), device


def check_gpus(processes: int) -> None:
    """One GPU per process on this machine, or one line saying how many there are."""
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise CapsxError(f"--nproc {processes} on CUDA takes a GPU per process, and this machine has {gpus}; "
                         f"use --nproc {gpus} or fewer, or device: cpu")


def leave(together: bool = False) -> None:
    """Leave the process group. `together` (the training ended normally on every process): first wait for
    the others, so no process tears its connections down while another still uses them (with gloo, a
    worker leaving early can abort the other in C++ at exit). Not after an error: the others may be gone."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def launch(nproc: int, capsx_args: list[str]) -> int:
    """Run `capsx <capsx_args>` in `nproc` processes on this machine through torch's elastic launcher
    (what `torchrun --standalone --nproc-per-node N -m capsx ...` does); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)("-m", "capsx", *capsx_args)
    except SignalException as e:
        return 128 + int(e.sigval)  # the workers saw the signal too: rank 0 has saved and said so
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: f.timestamp)
        code = first.exitcode
        if code < 0:  # killed by a signal
            return 128 + -code
        # the worker printed its own error line; a non-zero code without one is the launcher's
        return code or 1
    return 0
