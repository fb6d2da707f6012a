"""Squash and dynamic routing against the paper's definitions and the literal Procedure 1."""

import pytest
import torch

from capsx.models.routing import RoutingTrace, capsule_length, dynamic_routing, routing_reference, squash

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
