"""Squash and dynamic routing against the paper's definitions and the literal Procedure 1."""

import pytest
import torch

from capsx.models.routing import (
    RoutingTrace,
    agreement,
    capsule_length,
    dynamic_routing,
    route,
    route_reference,
    routing_reference,
    squash,
    squash_exp,
)

pytestmark = pytest.mark.numerics  # run again under a lower CPU capability (tests/lower_isa.py)


def _directions(n: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return (s / s.norm(dim=-1, keepdim=True)).to(dtype)


def test_squash_keeps_direction_and_follows_eq_1_with_length_in_unit_interval():
    lengths = torch.logspace(-3, 7, 1000)  # past |s| ~ 4096, where fp32 rounds 1 + |s|^2 to |s|^2
    s = _directions(1000, 16, seed=1) * lengths.unsqueeze(1)
    v = squash(s)
    norms = v.norm(dim=-1)
    # The promise in fp32: [0, 1] up to the rounding of s / |s| (a few ulp), on any CPU's summation order.
    assert (norms >= 0).all() and (norms <= 1 + 4 * torch.finfo(torch.float32).eps).all()
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # Eq. 1 by hand: |v| = |s|^2 / (1 + |s|^2)
    n = s.double().norm(dim=-1)
    assert torch.allclose(norms.double(), n**2 / (1 + n**2), rtol=1e-6, atol=1e-7)


def test_squash_length_is_strictly_below_one_where_the_dtype_can_tell():
    # fp32 tells 1 + |s|^2 from |s|^2 up to |s|^2 = 2^24; fp64 far beyond (up to 2^53).
    s32 = _directions(200, 16, seed=2) * torch.logspace(-3, 3, 200).unsqueeze(1)
    assert (squash(s32).double().norm(dim=-1) < 1).all()
    s64 = _directions(200, 16, seed=3, dtype=torch.float64) * torch.logspace(-3, 7, 200, dtype=torch.float64)[:, None]
    assert (squash(s64).norm(dim=-1) < 1).all()


def test_squash_is_finite_for_large_inputs_and_squashes_half_precision_in_fp32():
    s = _directions(50, 16, seed=4) * 1e18  # (1 + |s|^2) * |s| would overflow fp32
    assert torch.allclose(squash(s).norm(dim=-1), torch.ones(50), atol=1e-6)
    h = (_directions(50, 16, seed=5) * 300).half()  # |s|^2 = 90,000 overflows fp16 (max 65,504)
    v = squash(h)
    assert v.dtype == torch.float16 and torch.isfinite(v).all()
    assert torch.allclose(v.float(), squash(h.float()), atol=1e-3)


def test_squash_known_value():
    v = squash(torch.tensor([[3.0, 4.0]]))  # |s| = 5 -> |v| = 25/26, direction (0.6, 0.8)
    assert torch.allclose(v, torch.tensor([[0.6, 0.8]]) * 25 / 26, atol=1e-6)


def test_squash_and_length_at_zero_are_finite_with_finite_gradient():
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    length = capsule_length(v)
    length.sum().backward()
    assert torch.isfinite(v).all() and torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(s.grad).all()


def _u_hat(B=4, I=30, J=5, D=6, scale=0.3, seed=0):
    return torch.randn(B, I, J, D, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_fast_routing_equals_literal_procedure_1(iterations):
    u = _u_hat().double().requires_grad_()
    weights = torch.randn(4, 5, 6, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    fast = dynamic_routing(u, iterations)
    assert "DynamicRouting" in type(fast.grad_fn).__name__  # the backward written out, not autograd's
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), u)
    ref = routing_reference(u, iterations)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), u)
    assert torch.allclose(fast, ref, atol=1e-12)
    assert torch.allclose(g_fast, g_ref, atol=1e-12)


def test_couplings_sum_to_one_over_parent_capsules():
    trace = RoutingTrace()
    dynamic_routing(_u_hat(), 3, trace)
    assert len(trace.couplings) == 3 and len(trace.mean_abs_delta_b) == 3
    for c in trace.couplings:
        assert torch.allclose(c.sum(dim=2), torch.ones(c.shape[:2]), atol=1e-6)
    assert torch.allclose(trace.couplings[0], torch.full_like(trace.couplings[0], 1 / 5))  # b = 0 at first
    assert not torch.allclose(trace.couplings[2], trace.couplings[0])  # routing moved them


def test_routing_is_per_sample_independent_of_batch_composition():
    u = _u_hat(B=6)
    together = dynamic_routing(u, 3)
    alone = torch.cat([dynamic_routing(u[i:i + 1], 3) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-6)
    shuffled = dynamic_routing(u.flip(0), 3).flip(0)
    assert torch.allclose(together, shuffled, atol=1e-6)


def test_routing_increases_agreement_toward_consensus():
    # Half the inputs agree on parent 0's direction; routing should give parent 0 more of them.
    B, I, J, D = 1, 40, 2, 4
    u = torch.randn(B, I, J, D, generator=torch.Generator().manual_seed(2)) * 0.05
    u[:, :20, 0] = torch.tensor([1.0, 0, 0, 0]) * 0.5
    trace = RoutingTrace()
    dynamic_routing(u, 3, trace)
    assert trace.couplings[-1][0, :20, 0].mean() > 0.5 + 0.1


# The other routings (`model.routing`): each fast path against its literal version, values and gradients.

def _grads(fn, u, weights):
    out = fn(u)
    (g,) = torch.autograd.grad((out * weights).sum(), u)
    return out, g


@pytest.mark.parametrize("routing,iterations,squash_fn", [("leaky", 1, squash), ("leaky", 3, squash),
                                                          ("none", 1, squash), ("none", 3, squash),
                                                          ("attention", 1, squash), ("attention", 1, squash_exp)],
                         ids=["leaky-1", "leaky-3", "none-1", "none-3", "attention", "attention-exp-squash"])
def test_each_routing_fast_path_equals_its_literal_version(routing, iterations, squash_fn):
    u = _u_hat().double().requires_grad_()
    prior = torch.randn(30, 5, dtype=torch.double, generator=torch.Generator().manual_seed(3)) * 0.1
    prior.requires_grad_()
    weights = torch.randn(4, 5, 6, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    fast = route(u, routing, iterations, prior, squash_fn=squash_fn)
    ref = route_reference(u, routing, iterations, prior, squash_fn=squash_fn)
    inputs = [u, prior] if routing == "attention" else [u]  # only attention has priors
    g_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    g_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    assert torch.allclose(fast, ref, atol=1e-12)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    if routing == "attention":  # the authors' code's style, `capsx bench`'s baseline, is the same function
        published = route_reference(u, routing, iterations, prior, squash_fn=squash_fn, literal=False)
        assert torch.allclose(published, ref, atol=1e-12)


def test_no_routing_is_the_squashed_vote_sum_over_j_by_hand():
    u = torch.zeros(1, 2, 2, 2)
    u[0, 0, 0] = torch.tensor([3.0, 0.0])  # parent 0 gets (3, 0) and (1, 0) -> s_0 = (4, 0) / 2 = (2, 0)
    u[0, 1, 0] = torch.tensor([1.0, 0.0])
    u[0, :, 1] = torch.tensor([0.0, 2.0])  # parent 1: both vote (0, 2) -> s_1 = (0, 4) / 2 = (0, 2)
    v = route(u, "none", 3)  # iterations do not count
    assert torch.allclose(v, torch.tensor([[[0.8, 0.0], [0.0, 0.8]]]), atol=1e-6)  # |v| = 4 / 5


def test_leaky_routing_by_hand_keeps_a_share_for_the_orphan():
    # One input, two parents, logits after one agreement step b = (u0.v0, u1.v1): the couplings are
    # softmax(b0, b1, 0)[:2], so they sum to less than one.
    u = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]]).permute(0, 2, 1, 3).contiguous()  # (B=1, I=1, J=2, D=2)
    trace = RoutingTrace()
    v = dynamic_routing(u, 2, trace, leaky=True)
    v1 = squash(u.sum(dim=1) / 3)  # first pass: c = 1/3 each (J + 1 = 3)
    b = (u[0, 0] * v1[0]).sum(-1)  # (2,)
    c = torch.exp(b) / (torch.exp(b).sum() + 1.0)
    assert torch.allclose(trace.couplings[0], torch.full((1, 1, 2), 1 / 3))
    assert torch.allclose(trace.couplings[1][0, 0], c, atol=1e-6) and float(c.sum()) < 1
    assert torch.allclose(v[0], squash(c.unsqueeze(-1) * u[0, 0]), atol=1e-6)


def test_attention_routing_by_hand_and_its_priors_add_to_the_couplings():
    # Two inputs, two parents. Parent 0: votes (1, 0) and (1, 0) agree; parent 1: (1, 0) and (-1, 0) cancel.
    u = torch.zeros(1, 2, 2, 2)
    u[0, :, 0] = torch.tensor([1.0, 0.0])
    u[0, 0, 1], u[0, 1, 1] = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    # agreement a_ij = u_hat(j|i) . sum_k u_hat(j|k) / sqrt(2): parent 0: 2/sqrt2 for both; parent 1: 0.
    a0 = 2 / 2 ** 0.5
    c0 = torch.exp(torch.tensor(a0)) / (torch.exp(torch.tensor(a0)) + 1)  # softmax over (a0, 0)
    trace = RoutingTrace()
    v = route(u, "attention", 1, torch.zeros(2, 2), trace)
    assert torch.allclose(trace.couplings[0][0, :, 0], c0.expand(2), atol=1e-6)
    assert torch.allclose(v[0, 0], squash(torch.tensor([2 * c0, 0.0])), atol=1e-6)
    assert torch.allclose(v[0, 1], torch.zeros(2), atol=1e-6)  # the two votes cancel
    prior = torch.tensor([[0.5, 0.0], [0.5, 0.0]])  # b_i0 = 0.5: s_0 = sum_i (c_i0 + 0.5) u_hat(0|i)
    v = route(u, "attention", 1, prior)
    assert torch.allclose(v[0, 0], squash(torch.tensor([2 * (c0 + 0.5), 0.0])), atol=1e-6)


def test_exp_squash_follows_efficient_capsnet_eq_4_and_is_finite():
    s = _directions(100, 8, seed=6) * torch.logspace(-3, 3, 100).unsqueeze(1)
    n = s.double().norm(dim=-1)
    assert torch.allclose(squash_exp(s).double().norm(dim=-1), 1 - torch.exp(-n), rtol=1e-5, atol=1e-7)
    z = torch.zeros(2, 8, requires_grad=True)
    capsule_length(squash_exp(z)).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert torch.isfinite(squash_exp(torch.full((1, 8), 1e20))).all()


@pytest.mark.parametrize("routing", ["dynamic", "leaky", "none", "attention"])
def test_every_routing_is_per_sample(routing):
    u = _u_hat(B=6)
    prior = torch.randn(30, 5, generator=torch.Generator().manual_seed(4)) * 0.1
    together = route(u, routing, 3, prior)
    alone = torch.cat([route(u[i:i + 1], routing, 3, prior) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_agreement_is_each_row_block_times_its_vector():
    torch.manual_seed(0)
    u, v = torch.randn(5, 7, 3, dtype=torch.double), torch.randn(5, 3, dtype=torch.double)
    want = torch.stack([u[n] @ v[n] for n in range(5)])  # (I, D) @ (D,) per block, by hand
    assert agreement(u, v).shape == (5, 7)
    assert torch.allclose(agreement(u, v), want, atol=1e-12)
