"""Squash and the routing algorithms a capsule layer can use (`model.routing`).

- `dynamic`: Sabour, Frosst, Hinton 2017, Eq. 1-3 and Procedure 1.
- `leaky`: Procedure 1 with the leaky softmax of the paper's own code (`_leaky_routing` in Sabour's
  `capsules/models/layers.py`; Zhao et al. 2018 name it): each input capsule's softmax over the
  parents gets an extra logit fixed at 0, an orphan parent whose share is dropped, so a capsule that
  agrees with no parent sends less to all of them. Unlike `none_of_the_above`, the orphan has no votes,
  no weights and no capsule.
- `none`: no routing, the critiques' baseline (Gu & Tresp 2019): every coupling c_ij = 1/J, the value
  Procedure 1 starts from (softmax of b = 0), one pass; the same function as `dynamic` with 1 iteration.
- `attention`: the self-attention routing of Efficient-CapsNet (Mazzia, Salvetti, Chiaberge 2021,
  Eq. 5-7): c_ij = softmax_j( u_hat(j|i) . sum_k u_hat(j|k) / sqrt(D) ), s_j = sum_i (c_ij + b_ij) u_hat(j|i)
  with learned log priors b_ij, no iterations.

Each fast path (`dynamic_routing`, `attention_routing`) has a literal version (`routing_reference`,
`attention_reference`) written from the equations; the tests hold one to the other, values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


def squash_exp(s: Tensor, dim: int = -1) -> Tensor:
    """Efficient-CapsNet's squash (Mazzia et al. 2021, Eq. 4): v = (1 - 1/e^|s|) s / |s|.

    Written as 1 - e^-|s| (e^|s| overflows fp32 from |s| ~ 89); |v| in [0, 1), and finite with a finite
    gradient at s = 0 (the same epsilon as `squash`). Half precision is computed in fp32 and cast back."""
    x = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    n2 = (x * x).sum(dim=dim, keepdim=True) + SQUASH_EPS
    n = torch.sqrt(n2)
    v = x * (-torch.expm1(-n) / n)
    return v.to(s.dtype)


def capsule_length(v: Tensor, dim: int = -1) -> Tensor:
    """|v| with the same epsilon, so the zero vector has a finite gradient."""
    return torch.sqrt((v * v).sum(dim=dim) + SQUASH_EPS)


@dataclass
class RoutingTrace:
    """What routing did, per iteration (for tests, pictures and the appendix diagnostic)."""

    couplings: list[Tensor] = field(default_factory=list)  # c (B, I, J) used at each iteration
    mean_abs_delta_b: list[float] = field(default_factory=list)  # mean |b_ij update| after each iteration


def agreement(u: Tensor, v: Tensor) -> Tensor:
    """u v per row block: (N, I, D) @ (N, D) -> (N, I), taken as v^T u^T, (1, D) @ (D, I).

    The same sums as `bmm(u, v)`, in the layout MKL streams fastest: at batch 128 (u 94 MB) a call took
    8 ms against 24 ms as u @ v on an AMD EPYC (AVX2) CPU, where u @ v was a quarter of the routing's
    time in a training step."""
    return torch.bmm(v.unsqueeze(1), u.transpose(1, 2)).squeeze(1)


class _Agreement(torch.autograd.Function):
    """`agreement` with a backward in the layouts that are fast.

    autograd's own backward of `bmm(u, v)` takes the gradient of v as `u^T @ g`, a (D, I) @ (I, 1)
    product over a transposed view of u: measured 96 ms a call at batch 128 on an AVX2 CPU, a sixth of a
    CapsNet training step. As `g^T @ u`, (1, I) @ (I, D) over u as it lies, the same sums take 17 ms."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(u, v)
        return agreement(u, v)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        u, v = ctx.saved_tensors
        grad_u = grad.unsqueeze(2) * v.unsqueeze(1) if ctx.needs_input_grad[0] else None  # g_i v^T
        grad_v = torch.bmm(grad.unsqueeze(1), u).squeeze(1) if ctx.needs_input_grad[1] else None  # sum_i g_i u_i
        return grad_u, grad_v


Routing = Literal["dynamic", "leaky", "none", "attention"]
ROUTINGS: tuple[str, ...] = ("dynamic", "leaky", "none", "attention")


def _couplings(b: Tensor, leaky: bool) -> Tensor:
    """softmax over the parents (dim 1 of b (B, J, I)); leaky: with an orphan logit 0 whose share is dropped."""
    if not leaky:
        return b.softmax(dim=1)
    m = b.amax(dim=1, keepdim=True).clamp(min=0)  # the largest logit, the orphan's 0 included
    e = (b - m).exp()
    return e / (e.sum(dim=1, keepdim=True) + (-m).exp())


def dynamic_routing(u_hat: Tensor, iterations: int, trace: RoutingTrace | None = None,
                    leaky: bool = False) -> Tensor:
    """Route predictions u_hat (B, I, J, D) of I input capsules for J output capsules.

    Returns v (B, J, D). The logits b are per sample, so a sample's result
    does not depend on the rest of the batch. If `trace` is given, it is filled in.
    `leaky`: the leaky softmax (see the module's docstring); the first couplings are then 1/(J + 1).
    With autograd, the iterations run as one function with its own backward (`_DynamicRouting`).
    """
    B, I, J, D = u_hat.shape
    # One copy into (B*J, I, D): both routing products become contiguous matrix-vector
    # bmm's, faster than einsum on (B, I, J, D), which permutes u_hat twice per iteration.
    u = u_hat.transpose(1, 2).reshape(B * J, I, D)
    if trace is None and torch.is_grad_enabled() and u.requires_grad:
        v: Tensor = _DynamicRouting.apply(u, B, iterations, leaky)
        return v
    return _iterate(u, B, iterations, leaky, trace)[0]


@dataclass
class _Iterates:
    """What Procedure 1 computed at each iteration t = 1..T, kept for the backward."""

    s: list[Tensor] = field(default_factory=list)  # (B*J, D) before the squash
    v: list[Tensor] = field(default_factory=list)  # (B*J, D)
    b: list[Tensor] = field(default_factory=list)  # (B, J, I) logits of iterations 2..T


def _iterate(u: Tensor, B: int, iterations: int, leaky: bool,
             trace: RoutingTrace | None = None) -> tuple[Tensor, _Iterates]:
    """Procedure 1 on u (B*J, I, D): v (B, J, D) and the iterates."""
    N, I, D = u.shape
    J = N // B
    it = _Iterates()
    first = _first_coupling(J, leaky)
    s = u.sum(dim=1) * first  # (B*J, D)
    v = squash(s)
    it.s.append(s)
    it.v.append(v)
    if trace is not None:
        trace.couplings.append(u.new_full((B, I, J), first).detach())
    b = None
    for _ in range(1, iterations):
        a = _Agreement.apply(u, v).view(B, J, I)  # u_hat(j|i) . v_j
        b = a if b is None else b + a  # (B, J, I)
        c = _couplings(b, leaky)  # each input capsule i splits itself over the J parents
        s = torch.bmm(c.view(N, 1, I), u).view(N, D)  # s_j = sum_i c_ij u_hat(j|i)
        v = squash(s)
        it.b.append(b)
        it.s.append(s)
        it.v.append(v)
        if trace is not None:
            trace.mean_abs_delta_b.append(a.detach().abs().mean().item())
            trace.couplings.append(c.detach().transpose(1, 2))  # as (B, I, J)
    if trace is not None:  # the update the last iteration would make (Procedure 1, line 7)
        last = agreement(u, v.view(N, D))
        trace.mean_abs_delta_b.append(last.detach().abs().mean().item())
    return v.view(B, J, D), it


def _first_coupling(J: int, leaky: bool) -> float:
    """Iteration 1's c_ij: b = 0, so 1/J for every pair (1/(J + 1) with the leaky softmax's orphan)."""
    return 1.0 / (J + 1) if leaky else 1.0 / J


def _vjp(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """fn(x) and grad^T d fn(x) / dx by autograd, for the small per-iteration maps (squash, the couplings)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y, x, grad)
    return y.detach(), g


class _DynamicRouting(torch.autograd.Function):
    """Procedure 1 with a backward that writes the gradient of u_hat once.

    u enters every iteration twice (the agreement u . v_{t-1} and the sum s_t = sum_i c_ti u_i), so
    autograd's gradient of u is 2T - 1 outer products of (B*J, I) by (B*J, D), each summed into the
    last: that was 120 ms of the routing's 165 ms forward + backward at batch 128. Written out,
    grad u[n, i] = sum_t c_t[n, i] gs_t[n] + sum_t gb_t[n, i] v_{t-1}[n] + gs_1[n] / J, one batched
    product of (I, 2T - 1) coefficients by (2T - 1, D) vectors per row n. Not twice differentiable."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, B: int, iterations: int, leaky: bool) -> Tensor:
        v, it = _iterate(u, B, iterations, leaky)
        ctx.save_for_backward(u, *it.s, *it.v, *it.b)  # the couplings are recomputed from b
        ctx.config = (B, iterations, leaky)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_v: Tensor) -> tuple[Tensor | None, None, None, None]:
        B, T, leaky = ctx.config
        u, *rest = ctx.saved_tensors
        s, v, b = rest[:T], rest[T:2 * T], rest[2 * T:]
        N, I, D = u.shape
        J = N // B
        coefficients, vectors = [], []  # grad u = sum_k coefficients[k] (N, I) x vectors[k] (N, D)
        gv = grad_v.reshape(N, D)
        gb_later = None  # d loss / d b_t through the later iterations (b_{t+1} = b_t + a_{t+1})
        for t in range(T - 1, 0, -1):  # iteration t + 1 of Procedure 1 (0-based lists)
            gs = _vjp(squash, s[t], gv)[1]
            gc = agreement(u, gs).view(B, J, I)  # s = c u  ->  dc = u . gs
            c, gb = _vjp(lambda x: _couplings(x, leaky), b[t - 1], gc)
            if gb_later is not None:
                gb = gb + gb_later
            coefficients += [c.reshape(N, I), gb.reshape(N, I)]
            vectors += [gs, v[t - 1]]
            gv = torch.bmm(gb.reshape(N, 1, I), u).view(N, D)  # a = u . v_{t-1}  ->  dv_{t-1} = gb u
            gb_later = gb
        coefficients.append(u.new_full((N, I), _first_coupling(J, leaky)))
        vectors.append(_vjp(squash, s[0], gv)[1])
        grad_u = torch.bmm(torch.stack(coefficients, dim=2), torch.stack(vectors, dim=1))
        return grad_u, None, None, None


def attention_routing(u_hat: Tensor, prior: Tensor, trace: RoutingTrace | None = None,
                      squash_fn: Callable[[Tensor], Tensor] = squash) -> Tensor:
    """Self-attention routing: u_hat (B, I, J, D), log priors `prior` (I, J) -> v (B, J, D).

    The agreement of a vote with the others, u_hat(j|i) . sum_k u_hat(j|k), is the row sum of the
    paper's I x I attention matrix U_j U_j^T without forming it: one matrix-vector product per parent."""
    B, I, J, D = u_hat.shape
    u = u_hat.transpose(1, 2).reshape(B * J, I, D)  # the layout of dynamic_routing's products
    total = u.sum(dim=1)  # (B*J, D): sum_k u_hat(j|k)
    a = _Agreement.apply(u, total).view(B, J, I) * D ** -0.5
    c = a.softmax(dim=1)  # over the parents j
    weights = c + prior.t().to(c.dtype)  # (B, J, I): c_ij + b_ij
    v = squash_fn(torch.bmm(weights.view(B * J, 1, I), u).view(B, J, D))
    if trace is not None:
        trace.couplings.append(c.detach().transpose(1, 2))
    return v


def uniform_routing(u_hat: Tensor, trace: RoutingTrace | None = None) -> Tensor:
    """No routing: c_ij = 1/J for every pair, v_j = squash(sum_i u_hat(j|i) / J)."""
    return dynamic_routing(u_hat, 1, trace)


def route(u_hat: Tensor, routing: str, iterations: int, prior: Tensor | None = None,
          trace: RoutingTrace | None = None, squash_fn: Callable[[Tensor], Tensor] = squash) -> Tensor:
    """The fast path of the named routing (`model.routing`); `prior` is attention's (I, J) log priors.
    `squash_fn`: attention's output non-linearity (Efficient-CapsNet has its own); the others use Eq. 1."""
    if routing == "dynamic":
        return dynamic_routing(u_hat, iterations, trace)
    if routing == "leaky":
        return dynamic_routing(u_hat, iterations, trace, leaky=True)
    if routing == "none":
        return uniform_routing(u_hat, trace)
    if routing == "attention":
        assert prior is not None, "attention routing needs its log priors"
        return attention_routing(u_hat, prior, trace, squash_fn)
    raise ValueError(f"unknown routing {routing!r}; expected one of {', '.join(ROUTINGS)}")


def route_reference(u_hat: Tensor, routing: str, iterations: int, prior: Tensor | None = None,
                    squash_fn: Callable[[Tensor], Tensor] = squash, literal: bool = True) -> Tensor:
    """The literal version of `route`; `literal=False`: attention as the authors' code computes it
    (`attention_as_published`: the I x I matrices of the literal one do not fit a benchmark's batch)."""
    if routing in ("dynamic", "leaky"):
        return routing_reference(u_hat, iterations, leaky=routing == "leaky")
    if routing == "none":
        return squash((u_hat / u_hat.shape[2]).sum(dim=1))  # c_ij = 1/J, s_j = sum_i c_ij u_hat(j|i)
    if routing == "attention":
        assert prior is not None
        return (attention_reference if literal else attention_as_published)(u_hat, prior, squash_fn)
    raise ValueError(f"unknown routing {routing!r}")


def attention_reference(u_hat: Tensor, prior: Tensor, squash_fn: Callable[[Tensor], Tensor] = squash) -> Tensor:
    """Eq. 5-7 of Efficient-CapsNet, literally: A_j = U_j U_j^T / sqrt(D) (I x I per parent),
    C = softmax over j of A_j's row sums, s_j = sum_i u_hat(j|i) (c_ij + b_ij)."""
    D = u_hat.shape[-1]
    U = u_hat.permute(0, 2, 1, 3)  # (B, J, I, D)
    A = U @ U.transpose(-1, -2) / D ** 0.5  # (B, J, I, I)
    c = torch.softmax(A.sum(dim=-1), dim=1)  # (B, J, I), softmax over the parents
    s = ((c + prior.t()).unsqueeze(-1) * U).sum(dim=2)  # (B, J, D)
    return squash_fn(s)


def attention_as_published(u_hat: Tensor, prior: Tensor, squash_fn: Callable[[Tensor], Tensor] = squash) -> Tensor:
    """Attention routing in the style of the Efficient-CapsNet code (its FCCaps layer): the agreements as
    one einsum over (votes, votes), couplings broadcast against the votes; the baseline of `capsx bench`."""
    U = u_hat.permute(0, 2, 1, 3)  # (B, J, I, D)
    c = torch.einsum("bjid,bjkd->bji", U, U) / U.shape[-1] ** 0.5  # einsum sums k out first: no I x I
    c = torch.softmax(c, dim=1) + prior.t()
    return squash_fn((U * c.unsqueeze(-1)).sum(dim=2))


def routing_reference(u_hat: Tensor, iterations: int, leaky: bool = False) -> Tensor:
    """Procedure 1, line by line (the plain style of the public implementations); `leaky` appends
    the orphan's zero logit to each softmax and drops its share, as the paper's code does."""
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)  # (B, I, J)
    v = None
    for _ in range(iterations):
        if leaky:
            c = torch.softmax(torch.cat([b, torch.zeros_like(b[..., :1])], dim=2), dim=2)[..., :-1]
        else:
            c = torch.softmax(b, dim=2)  # line 4: softmax over the parents j
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)  # line 5: s_j = sum_i c_ij u_hat(j|i)
        v = squash(s)  # line 6
        b = b + (u_hat * v.unsqueeze(1)).sum(dim=-1)  # line 7: b_ij += u_hat(j|i) . v_j
    assert v is not None
    return v
