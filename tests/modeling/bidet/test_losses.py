"""BiDet objective terms (paper 000 eq. 6, 7, 10, 11) against hand-computed values."""
import math

import pytest
import torch

from aqd_d2.modeling.bidet.losses import (beta_transform, binomial_kl, categorical_kl, csop_loss,
                                          gaussian_kl, location_info_loss, sop_loss,
                                          sparse_object_prior)


def test_binomial_kl_hand_values():
    # p = sigmoid(log 3) = 0.75: 0.75 ln 0.75 + 0.25 ln 0.25 + ln 2 = 0.130812
    kl = binomial_kl(torch.tensor([0.0, math.log(3.0), -math.log(3.0)]))
    assert torch.allclose(kl, torch.tensor([0.0, 0.130812, 0.130812]), atol=1e-6)


def test_categorical_and_gaussian_kl_hand_values():
    # half the mass on two of four levels: 2 * 0.5 ln 0.5 + ln 4 = ln 2
    assert categorical_kl(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert categorical_kl(torch.full((4,), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    assert gaussian_kl(torch.tensor(2.0)).item() == pytest.approx(2.0)  # mean^2 / 2
    # (var + mean^2 - 1 - logvar) / 2 with mean 1, var 1
    assert gaussian_kl(torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(0.5)


def test_location_info_loss_hand_values():
    t = torch.tensor([1.0, 1.0, 1.0])
    mu = torch.tensor([0.0, 1.0, 1.0])
    lv = torch.tensor([0.0, math.log(4.0), math.log(4.0)])
    prior_mu = torch.tensor([0.0, 0.0, 1.0])
    # 0.5*((l-mu)^2/var + logvar) - 0.5*((l-mu0)^2/var0 + logvar0)
    # [0.5 - 0.5, 0.5 ln 4 - 0.5, 0.5 ln 4 - 0]
    expected = torch.tensor([0.0, math.log(2.0) - 0.5, math.log(2.0)])
    out = location_info_loss(t, mu, lv, prior_mean=prior_mu, prior_logvar=torch.zeros(3))
    assert torch.allclose(out, expected, atol=1e-6)
    # default prior N(0, 1) equals an explicit one
    assert torch.allclose(location_info_loss(t, mu, lv)[:2], expected[:2], atol=1e-6)


def test_sop_hand_value_and_normalisation():
    # s = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 0.5 ln 4 = 1.039721, / m = 3
    assert sop_loss(torch.tensor([0.5, 0.25, 0.25])).item() == pytest.approx(1.039721 / 3, abs=1e-6)
    # scores are normalised: doubling them changes nothing
    assert sop_loss(torch.tensor([1.0, 0.5, 0.5])).item() == pytest.approx(1.039721 / 3, abs=1e-6)
    empty = torch.zeros(0, requires_grad=True)
    assert sop_loss(empty).item() == 0.0


def test_sop_gradient_and_detached_normaliser():
    p = torch.tensor([0.6, 0.3], requires_grad=True)
    sop_loss(p).backward()
    g_full = p.grad.clone()
    # scale invariance: the full gradient is orthogonal to p
    assert abs(float((g_full * p.detach()).sum())) < 1e-6
    p.grad = None
    sop_loss(p, detach_norm=True).backward()
    # with a detached normaliser: d/dp_j of -(1/m) sum s log s = -(1/m)(log s_j + 1)/N
    s = torch.tensor([2 / 3, 1 / 3])
    expected = -(torch.log(s) + 1) / 0.9 / 2
    assert torch.allclose(p.grad, expected, atol=1e-6)
    assert not torch.allclose(p.grad, g_full)


def test_csop_hand_values():
    scores = torch.tensor([0.6, 0.2, 0.9])
    classes = torch.tensor([0, 0, 1])
    counts = torch.tensor([2, 1])
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.562335; class 1 alone: 0
    assert csop_loss(scores, classes, counts).item() == pytest.approx(h0 / 2, abs=1e-6)
    assert csop_loss(scores, classes, counts, use_nc=False).item() == pytest.approx(h0, abs=1e-6)
    # a class without ground truth is weighted 1 (1/max(n_c, 1))
    assert csop_loss(scores, classes, torch.tensor([0, 1])).item() == pytest.approx(h0, abs=1e-6)


def test_sparse_object_prior_batch_mean_and_modes():
    scores = [torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.6, 0.2, 0.9])]
    classes = [torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])]
    gts = [torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])]
    sop = sparse_object_prior(scores, classes, gts, 2, "sop")
    assert sop.item() == pytest.approx(0.5 * (sop_loss(scores[0]) + sop_loss(scores[1])).item())
    csop = sparse_object_prior(scores, classes, gts, 2, "csop")
    h1 = math.log(2.0) / 2  # image 1: class 1 has s = (0.5, 0.5) and n_c = 2
    assert csop.item() == pytest.approx(0.5 * (h1 + 0.562335 / 2), abs=1e-6)
    with pytest.raises(ValueError, match="MODEL.BIDET.SOP"):
        sparse_object_prior(scores, classes, gts, 2, "bad")


def test_eq10_transforms():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(beta_transform(s, "linear", 10, 5), torch.tensor([10.0, 12.5, 15.0]))
    assert torch.allclose(beta_transform(s, "exponential", 10, 5),
                          torch.tensor([10.0, 10 * math.exp(2.5), 10 * math.exp(5.0)]))
    assert torch.allclose(beta_transform(s, "sine", 10, 5),
                          torch.tensor([10.0, 10 + 5 * math.sqrt(0.5), 15.0]))
    with pytest.raises(ValueError, match="MODEL.BIDET.AUTO.TRANSFORM"):
        beta_transform(s, "cubic", 10, 5)
