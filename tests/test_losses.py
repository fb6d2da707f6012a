"""Margin and reconstruction losses against values computed by hand."""

import pytest
import torch

from capsx.models.output import ModelOutput
from capsx.train.losses import CrossEntropyConfig, MarginLossConfig, margin_loss, reconstruction_loss

pytestmark = pytest.mark.numerics  # run again under a lower CPU capability (tests/lower_isa.py)


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.30, 0.05], [0.50, 0.08, 0.92]])
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    # sample 0: present 0.95 >= 0.9 -> 0; absent 0.30: 0.5*(0.2)^2 = 0.02; absent 0.05 < 0.1 -> 0
    # sample 1: absent 0.50: 0.5*0.4^2 = 0.08; absent 0.08 -> 0; present 0.92 -> 0
    assert torch.allclose(margin_loss(lengths, targets), torch.tensor([0.02, 0.08]), atol=1e-7)
    # a present class that is too short: (0.9 - 0.6)^2 = 0.09
    assert torch.allclose(margin_loss(torch.tensor([[0.6]]), torch.tensor([[1.0]])), torch.tensor([0.09]))


def test_margin_loss_parameters():
    lengths, targets = torch.tensor([[0.7, 0.4]]), torch.tensor([[1.0, 0.0]])
    # m+ 0.8: (0.1)^2 = 0.01; m- 0.2, lambda 1: (0.2)^2 = 0.04
    got = margin_loss(lengths, targets, m_plus=0.8, m_minus=0.2, down_weight=1.0)
    assert torch.allclose(got, torch.tensor([0.05]))


def test_reconstruction_loss_is_sum_of_squares_per_image():
    recon = torch.zeros(2, 1, 2, 2)
    images = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.2]]]])
    assert torch.allclose(reconstruction_loss(recon, images), torch.tensor([1.25, 0.04]))


def test_margin_criterion_adds_scaled_reconstruction():
    out = ModelOutput(scores=torch.tensor([[0.6, 0.2]]), reconstruction=torch.zeros(1, 1, 2, 2))
    images = torch.ones(1, 1, 2, 2)  # sum of squares 4
    terms = MarginLossConfig(recon_weight=0.5)(out, images, torch.tensor([0]))
    margin = 0.3**2 + 0.5 * 0.1**2
    assert torch.allclose(terms.parts["margin_loss"], torch.tensor([margin]))
    assert torch.allclose(terms.parts["recon_loss"], torch.tensor([4.0]))
    assert torch.allclose(terms.total, torch.tensor(margin + 0.5 * 4.0))


def test_cross_entropy_matches_log_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    terms = CrossEntropyConfig()(ModelOutput(scores=logits), torch.zeros(1), torch.tensor([0]))
    expected = -torch.log_softmax(logits, dim=1)[0, 0]
    assert torch.allclose(terms.total, expected)


def test_label_smoothing_mixes_the_one_hot_target_with_the_uniform():
    """loss = (1 - e) * CE(true) + e * mean over classes of CE(class), here by hand (e = 0.3, 3 classes)."""
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    logp = torch.log_softmax(logits, dim=1)[0]
    expected = -(0.7 * logp[1] + 0.3 * logp.mean())
    terms = CrossEntropyConfig(label_smoothing=0.3)(ModelOutput(scores=logits), torch.zeros(1), torch.tensor([1]))
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.total.item() != pytest.approx(-logp[1].item(), rel=1e-3)  # not the plain loss
