"""Throughput of the paper's CapsNet: capsx's path against the plain reference.

Rounds alternate the two on the same weights and inputs, so a noisy machine
slows both alike; we report medians and the median of per-round ratios.
Training: batch 128 (margin + reconstruction loss, Adam step). Inference: batch 1000.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from capsx.losses import MarginLossConfig
from capsx.models.capsnet import CapsNet
from capsx.models.reference import ReferenceCapsNet
from capsx.runtime import keep_large_tensors_on_heap


def train_rate(model: CapsNet, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = MarginLossConfig()
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        terms = loss_fn(model(x, y), x, y)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t)


def infer_rate(model: CapsNet, x: torch.Tensor, steps: int) -> float:
    model.eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            model(x)
    return steps * len(x) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=1000)
    args = p.parse_args()
    keep_large_tensors_on_heap()
    torch.manual_seed(0)
    fast = CapsNet((1, 28, 28), 10)
    ref = ReferenceCapsNet((1, 28, 28), 10)
    ref.load_state_dict(fast.state_dict())
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(10, (args.batch,))
    xi = torch.rand(args.infer_batch, 1, 28, 28)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    train_rate(fast, x, y, 1), train_rate(ref, x, y, 1)  # warm-up
    rows: dict[str, list[float]] = {"train_fast": [], "train_ref": [], "infer_fast": [], "infer_ref": []}
    for r in range(args.rounds):
        rows["train_fast"].append(train_rate(fast, x, y, 3))
        rows["train_ref"].append(train_rate(ref, x, y, 3))
        rows["infer_fast"].append(infer_rate(fast, xi, 1))
        rows["infer_ref"].append(infer_rate(ref, xi, 1))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()))
    for kind in ("train", "infer"):
        f, rr = rows[f"{kind}_fast"], rows[f"{kind}_ref"]
        ratio = statistics.median(a / b for a, b in zip(f, rr, strict=True))
        batch = args.batch if kind == "train" else args.infer_batch
        print(f"{kind} (batch {batch}): capsx {statistics.median(f):.1f} img/s, "
              f"reference {statistics.median(rr):.1f} img/s, ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
