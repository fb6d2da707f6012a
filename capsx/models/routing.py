"""Squash and dynamic routing (Sabour, Frosst, Hinton 2017, Eq. 1-3 and Procedure 1).

`dynamic_routing` is the fast path the models use. `routing_reference` is
Procedure 1 written literally, broadcast products and all; it stays as the
oracle the tests compare the fast path against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SQUASH_EPS = 1e-8  # |s| can be exactly 0 (a dead primary capsule); keep sqrt's gradient finite


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|  (Eq. 1), direction kept.

    What it promises in floating point: the length factor |s|^2 / (1 + |s|^2) is in [0, 1] exactly
    (a correctly rounded division of a by b >= a), so |v| is in [0, 1] up to the rounding of s / |s|
    (a few ulp). Eq. 1's strict |v| < 1 holds only while 1 + |s|^2 differs from |s|^2: in fp32 up to
    |s| ~ 4096, beyond which the length is 1 (the result then depends on the CPU's summation order).
    Half-precision input is squashed in fp32 (|s|^2 overflows fp16 from |s| > 256) and cast back.
    """
    x = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    n2 = (x * x).sum(dim=dim, keepdim=True)
    # The factors kept apart: (1 + n2) * sqrt(n2) would overflow fp32 from |s| ~ 1e13.
    v = x * ((n2 / (1.0 + n2)) * torch.rsqrt(n2 + SQUASH_EPS))
    return v.to(s.dtype)


def capsule_length(v: Tensor, dim: int = -1) -> Tensor:
    """|v| with the same epsilon, so the zero vector has a finite gradient."""
    return torch.sqrt((v * v).sum(dim=dim) + SQUASH_EPS)


@dataclass
class RoutingTrace:
    """What routing did, per iteration (for tests, pictures and the appendix diagnostic)."""

    couplings: list[Tensor] = field(default_factory=list)  # c (B, I, J) used at each iteration
    mean_abs_delta_b: list[float] = field(default_factory=list)  # mean |b_ij update| after each iteration


class _Agreement(torch.autograd.Function):
    """a = u v per row block: (N, I, D) @ (N, D) -> (N, I), with a backward in the layouts that are fast.

    autograd's own backward of `bmm(u, v)` takes the gradient of v as `u^T @ g`, a (D, I) @ (I, 1)
    product over a transposed view of u: measured 96 ms a call at batch 128 on an AVX2 CPU, a sixth of a
    CapsNet training step. As `g^T @ u`, (1, I) @ (I, D) over u as it lies, the same sums take 17 ms."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(u, v)
        return torch.bmm(u, v.unsqueeze(2)).squeeze(2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        u, v = ctx.saved_tensors
        grad_u = grad.unsqueeze(2) * v.unsqueeze(1) if ctx.needs_input_grad[0] else None  # g_i v^T
        grad_v = torch.bmm(grad.unsqueeze(1), u).squeeze(1) if ctx.needs_input_grad[1] else None  # sum_i g_i u_i
        return grad_u, grad_v


def dynamic_routing(u_hat: Tensor, iterations: int, trace: RoutingTrace | None = None) -> Tensor:
    """Route predictions u_hat (B, I, J, D) of I input capsules for J output capsules.

    Returns v (B, J, D). The logits b are per sample, so a sample's result
    does not depend on the rest of the batch. If `trace` is given, it is filled in.
    """
    B, I, J, D = u_hat.shape
    # One copy into (B*J, I, D): both routing products become contiguous matrix-vector
    # bmm's, faster than einsum on (B, I, J, D), which permutes u_hat twice per iteration.
    u = u_hat.transpose(1, 2).reshape(B * J, I, D)
    # First iteration: b = 0, so c_ij = 1/J for every pair and s_j = sum_i u_hat(j|i) / J.
    v = squash(u_hat.sum(dim=1) / J)  # (B, J, D)
    if trace is not None:
        trace.couplings.append(u_hat.new_full((B, I, J), 1.0 / J).detach())
    b = None
    for _ in range(1, iterations):
        agreement = _Agreement.apply(u, v.reshape(B * J, D)).view(B, J, I)  # u_hat(j|i) . v_j
        b = agreement if b is None else b + agreement  # (B, J, I)
        c = b.softmax(dim=1)  # each input capsule i splits itself over the J parents
        v = squash(torch.bmm(c.view(B * J, 1, I), u).view(B, J, D))  # s_j = sum_i c_ij u_hat(j|i)
        if trace is not None:
            trace.mean_abs_delta_b.append(agreement.detach().abs().mean().item())
            trace.couplings.append(c.detach().transpose(1, 2))  # as (B, I, J)
    if trace is not None:  # the update the last iteration would make (Procedure 1, line 7)
        last = torch.bmm(u, v.reshape(B * J, D, 1))
        trace.mean_abs_delta_b.append(last.detach().abs().mean().item())
    return v


def routing_reference(u_hat: Tensor, iterations: int) -> Tensor:
    """Procedure 1, line by line (the plain style of the public implementations)."""
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)  # (B, I, J)
    v = None
    for _ in range(iterations):
        c = torch.softmax(b, dim=2)  # line 4: softmax over the parents j
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)  # line 5: s_j = sum_i c_ij u_hat(j|i)
        v = squash(s)  # line 6
        b = b + (u_hat * v.unsqueeze(1)).sum(dim=-1)  # line 7: b_ij += u_hat(j|i) . v_j
    assert v is not None
    return v
