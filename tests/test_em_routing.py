"""EM routing against Procedure 1 of "Matrix capsules with EM routing", finite where the formulas are not,
and the spread loss by hand."""

import pytest
import torch

from capsx.models.em_routing import em_routing, em_routing_reference, inverse_temperatures
from capsx.train.losses import SpreadLossConfig, spread_loss

pytestmark = pytest.mark.numerics


def _inputs(N=3, I=12, J=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(N, I, J, 16, generator=g, dtype=dtype)
    a_in = torch.rand(N, I, generator=g, dtype=dtype)
    beta_u = torch.randn(J, generator=g, dtype=dtype) * 0.1
    beta_a = torch.randn(J, generator=g, dtype=dtype) * 0.1
    return votes, a_in, beta_u, beta_a


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_fast_em_routing_equals_procedure_1_in_values_and_gradients(iterations):
    inputs = [t.requires_grad_() for t in _inputs()]
    w_mu = torch.randn(3, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_a = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = {}
    for name, fn in (("fast", em_routing), ("ref", em_routing_reference)):
        mu, a = fn(*inputs, iterations, 1.0)  # lambda 1: the sigmoid is not saturated, the gradients count
        grads = torch.autograd.grad((mu * w_mu).sum() + (a * w_a).sum(), inputs)
        outs[name] = (mu, a, grads)
    for x, y in zip(outs["fast"][:2], outs["ref"][:2], strict=True):
        assert torch.allclose(x, y, atol=1e-10)
    for x, y in zip(outs["fast"][2], outs["ref"][2], strict=True):
        assert torch.allclose(x, y, atol=1e-10)


def test_em_m_step_by_hand_two_children_one_parent():
    # one parent (J = 1, so R = 1): mu = activation-weighted mean, sigma^2 the weighted variance (+ floor)
    votes = torch.zeros(1, 2, 1, 16, dtype=torch.float64)
    votes[0, 0, 0], votes[0, 1, 0] = 1.0, 3.0
    a_in = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    mu, a = em_routing(votes, a_in, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 1, 1.0)
    mean = (1.0 * 1 + 0.5 * 3) / 1.5  # 5/3
    var = (1.0 * (1 - mean) ** 2 + 0.5 * (3 - mean) ** 2) / 1.5 + 1e-4
    assert torch.allclose(mu, torch.full((1, 1, 16), mean, dtype=torch.float64))
    cost = 16 * 0.5 * torch.log(torch.tensor(var, dtype=torch.float64)) * 1.5  # sum_h (0 + log sigma) * sum_i a_i
    assert torch.allclose(a, torch.sigmoid(lambda_final(1.0, 1) * -cost).view(1, 1))


def lambda_final(final, iterations):
    return inverse_temperatures(final, iterations)[-1]


@pytest.mark.parametrize("case", ["zero-votes", "equal-votes", "huge-votes", "inactive", "all-active-huge-cost"])
def test_em_routing_stays_finite_with_finite_gradients_on_adversarial_inputs(case):
    votes, a_in, beta_u, beta_a = _inputs(N=2, I=50, J=5, dtype=torch.float32)
    if case == "zero-votes":
        votes = torch.zeros_like(votes)  # sigma = 0: log sigma = -inf without the floor
    elif case == "equal-votes":
        votes = votes[:, :1].expand_as(votes).contiguous()
    elif case == "huge-votes":
        votes = votes * 1e15  # (V - mu)^2 / sigma^2 and exp(log p) far outside fp32 without log space
    elif case == "inactive":
        a_in = torch.zeros_like(a_in)  # sum_i R_ij a_i = 0
    else:
        a_in = torch.ones_like(a_in)
        beta_u = beta_u + 1e6  # cost ~ 1e6 * mass: the logistic saturates
    votes.requires_grad_()
    a_in.requires_grad_()
    beta_u.requires_grad_()
    mu, a = em_routing(votes, a_in, beta_u, beta_a, 3, 0.01)
    assert torch.isfinite(mu).all() and torch.isfinite(a).all() and (a >= 0).all() and (a <= 1).all()
    grads = torch.autograd.grad(mu.sum() + a.sum(), [votes, a_in, beta_u])
    assert all(torch.isfinite(g).all() for g in grads), case


def test_spread_loss_by_hand_and_its_margin_schedule():
    scores = torch.tensor([[0.9, 0.2, 0.5]])
    labels = torch.tensor([0])
    assert torch.allclose(spread_loss(scores, labels, 0.2), torch.tensor([0.0]))  # both gaps exceed 0.2
    assert torch.allclose(spread_loss(scores, labels, 0.9), torch.tensor([(0.9 - 0.7) ** 2 + (0.9 - 0.4) ** 2]))
    loss = SpreadLossConfig()
    assert [loss.margin(p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.2, 0.55, 0.9, 0.9])
    from capsx.models.output import ModelOutput

    out = ModelOutput(scores=scores)
    assert loss(out, scores, labels, progress=0.0).total == pytest.approx(0.0)  # training starts at 0.2
    assert loss(out, scores, labels).total == pytest.approx(0.29)  # evaluation: the final margin
