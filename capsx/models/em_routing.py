"""EM routing (Hinton, Sabour, Frosst, "Matrix capsules with EM routing", ICLR 2018, Procedure 1).

Each parent capsule j is a Gaussian over the 16 entries of the children's votes V_ij (4x4 pose matrices),
fitted by weighted EM; its activation a_j = logistic(lambda (beta_a - sum_h cost_j^h)) with
cost_j^h = (beta_u + log sigma_j^h) sum_i R_ij a_i.

Numerically safe where the paper's formulas are not: the variances get `VAR_EPS` (all-equal or all-zero
votes make sigma 0 and log sigma -inf), the E-step works in log space (p_j underflows to 0 for 16 entries
far from the mean, and 0/0 is NaN) with the log of a_j floored at `LOG_EPS`, and the M-step's
normalisation of R_ij a_i over the children gets `MASS_EPS` (all children inactive). `em_routing` is the
fast path; `em_routing_reference` is Procedure 1 line by line, the oracle of the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VAR_EPS = 1e-4  # sigma^2 floor: a parent that explains its votes exactly has a finite cost
MASS_EPS = 1e-8  # sum_i R_ij a_i floor: a parent no active child votes for
LOG_EPS = 1e-12  # log a_j floor in the E-step


def inverse_temperatures(final: float, iterations: int) -> list[float]:
    """lambda per iteration, rising to `final` (the paper fixes a schedule without giving it; this is
    the public reimplementations': lambda_t = final (1 - 0.95^(t+1)), so early iterations are soft)."""
    return [final * (1 - 0.95 ** (t + 1)) for t in range(iterations)]


def em_routing(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
               final_lambda: float) -> tuple[Tensor, Tensor]:
    """votes (N, I, J, P) of I children for J parents (P = 16 pose entries), child activations a_in (N, I),
    per-parent-type beta_u, beta_a (J,) -> parent poses mu (N, J, P) and activations a (N, J)."""
    N, I, J, P = votes.shape
    lambdas = inverse_temperatures(final_lambda, iterations)
    R = votes.new_full((N, I, J), 1.0 / J)
    a = a_in.unsqueeze(-1)  # (N, I, 1)
    mu = a_out = None
    for t in range(iterations):
        # M-step: the parents' Gaussians and activations from the children's weighted votes
        Ra = R * a  # (N, I, J)
        mass = Ra.sum(dim=1, keepdim=True) + MASS_EPS  # (N, 1, J): sum_i R_ij a_i
        w = (Ra / mass).unsqueeze(-1)  # (N, I, J, 1)
        mu = (w * votes).sum(dim=1, keepdim=True)  # (N, 1, J, P)
        diff2 = (votes - mu) ** 2
        var = (w * diff2).sum(dim=1, keepdim=True) + VAR_EPS  # (N, 1, J, P)
        log_sigma = 0.5 * torch.log(var)
        cost = ((beta_u.view(1, 1, J, 1) + log_sigma) * mass.unsqueeze(-1)).sum(dim=-1)  # (N, 1, J)
        a_out = torch.sigmoid(lambdas[t] * (beta_a.view(1, 1, J) - cost))  # (N, 1, J)
        if t + 1 < iterations:
            # E-step: each child's responsibilities, a_j p_j normalised over the parents, in log space
            log_p = -0.5 * (diff2 / var).sum(dim=-1) - log_sigma.sum(dim=-1) - 0.5 * P * math.log(2 * math.pi)
            R = torch.softmax(torch.log(a_out.clamp(min=LOG_EPS)) + log_p, dim=2)  # (N, I, J)
    assert mu is not None and a_out is not None
    return mu.squeeze(1), a_out.squeeze(1)


def em_routing_reference(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
                         final_lambda: float) -> tuple[Tensor, Tensor]:
    """Procedure 1 of the paper, parent by parent (with the same safety floors)."""
    N, I, J, P = votes.shape
    lambdas = inverse_temperatures(final_lambda, iterations)
    R = torch.full((N, I, J), 1.0 / J, dtype=votes.dtype, device=votes.device)
    mus: list[Tensor] = []
    acts: list[Tensor] = []
    for t in range(iterations):
        mus, sigmas2, acts = [], [], []
        for j in range(J):  # M-STEP(a, R, V, j)
            r = R[:, :, j] * a_in  # R_ij <- R_ij a_i
            total = r.sum(dim=1) + MASS_EPS  # (N,)
            mu = (r.unsqueeze(-1) * votes[:, :, j]).sum(dim=1) / total.unsqueeze(-1)  # (N, P)
            s2 = (r.unsqueeze(-1) * (votes[:, :, j] - mu.unsqueeze(1)) ** 2).sum(dim=1) / total.unsqueeze(-1)
            s2 = s2 + VAR_EPS
            cost = (beta_u[j] + torch.log(torch.sqrt(s2))) * total.unsqueeze(-1)  # (N, P): cost^h
            acts.append(torch.sigmoid(lambdas[t] * (beta_a[j] - cost.sum(dim=-1))))
            mus.append(mu)
            sigmas2.append(s2)
        if t + 1 == iterations:
            break
        log_ap = []
        for j in range(J):  # E-STEP: p_j = N(V_ij; mu_j, sigma_j^2), R_ij = a_j p_j / sum_k a_k p_k
            d = votes[:, :, j] - mus[j].unsqueeze(1)  # (N, I, P)
            log_p = (-(d ** 2) / (2 * sigmas2[j].unsqueeze(1))).sum(-1) \
                - 0.5 * torch.log(2 * math.pi * sigmas2[j]).sum(-1, keepdim=True)
            log_ap.append(torch.log(acts[j].clamp(min=LOG_EPS)).unsqueeze(1) + log_p)
        R = torch.softmax(torch.stack(log_ap, dim=2), dim=2)
    return torch.stack(mus, dim=1), torch.stack(acts, dim=1)
