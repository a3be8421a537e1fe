"""Feature-map information bottleneck: sampled in training, deterministic in eval, the
documented straight-through gradient, and the I(X;F) value."""
import math

import pytest
import torch

from aqd_d2.modeling.bidet import FeatureBottleneck


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"p2": torch.randn(2, 3, 4, 4, generator=g), "p3": torch.randn(2, 3, 2, 2, generator=g)}


@pytest.mark.parametrize("prior", ["binomial", "categorical", "gaussian"])
def test_sampled_in_training_deterministic_in_eval(prior):
    ib = FeatureBottleneck(prior=prior, bits=2)
    params = _params()
    ib.train()
    a, _ = ib(params)
    b, _ = ib(params)
    assert not torch.equal(a["p2"], b["p2"])
    ib.eval()
    c, _ = ib(params)
    d, _ = ib(params)
    assert torch.equal(c["p2"], d["p2"]) and torch.equal(c["p3"], d["p3"])
    if prior == "binomial":
        assert torch.equal(c["p2"], torch.where(params["p2"] >= 0, 1.0, -1.0))
        assert set(a["p2"].unique().tolist()) <= {-1.0, 1.0}
    elif prior == "categorical":
        levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
        nearest = levels[(params["p2"].unsqueeze(-1) - levels).abs().argmin(-1)]
        assert torch.allclose(c["p2"], nearest)
    else:
        assert torch.equal(c["p2"], params["p2"])


def test_binomial_sample_frequency_and_straight_through_gradient():
    a = torch.full((1, 1, 100, 100), math.log(3.0), requires_grad=True)  # p(+1) = 0.75
    ib = FeatureBottleneck(prior="binomial").train()
    torch.manual_seed(0)
    f, kl = ib({"x": a})
    assert f["x"].eq(1).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert kl.shape == (1,) and kl.item() == pytest.approx(0.130812, abs=1e-5)
    f["x"].sum().backward()
    # d tanh(a/2) / da = (1 - tanh(a/2)^2) / 2 = 0.5 * (1 - 0.25) = 0.375
    assert torch.allclose(a.grad, torch.full_like(a, 0.375))


def test_kl_is_per_image_mean_over_all_treated_maps():
    params = _params()
    ib = FeatureBottleneck(prior="gaussian", in_features=["p3"]).eval()
    out, kl = ib(params)
    assert torch.equal(out["p2"], params["p2"])  # untreated
    expected = (0.5 * params["p3"] ** 2).flatten(1).mean(1)
    assert torch.allclose(kl, expected)
    with pytest.raises(KeyError, match="IB_FEATURES"):
        FeatureBottleneck(in_features=["p9"])(params)


def test_official_l2_variant_is_deterministic():
    params = _params()
    ib = FeatureBottleneck(as_l2=True).train()
    out, kl = ib(params)
    assert torch.equal(out["p2"], params["p2"])
    n = params["p2"][0].numel() + params["p3"][0].numel()
    expected = (0.5 * params["p2"] ** 2).flatten(1).sum(1) + (0.5 * params["p3"] ** 2).flatten(1).sum(1)
    assert torch.allclose(kl, expected / n)


def test_bad_prior_names_the_key():
    with pytest.raises(ValueError, match="MODEL.BIDET.FEATURE_PRIOR"):
        FeatureBottleneck(prior="laplace")
