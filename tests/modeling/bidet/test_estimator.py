"""Complexity estimator (paper 000 sec. 3.2.1, eq. 9; appendix 001 Tables 5-6)."""
import torch
import pytest
import torch.nn.functional as F

from aqd_d2.modeling.bidet import ComplexityEstimator, trainable
from aqd_d2.modeling.bidet.estimator import real_images


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 4, 4, generator=g), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1


def test_gan_shapes_scores_and_frozen_parameters():
    est = ComplexityEstimator("gan", 8, feature_stride=16, out_scale=0.25, channels=8)
    f, real = _inputs()
    assert est.generator(f, (16, 16)).shape == (2, 3, 16, 16)  # 4 -> 16: two x2 blocks
    assert len(est.generator.blocks) == 2 * 4
    s = est.score(f, real)
    assert s.shape == (2,) and bool(((s > 0) & (s < 1)).all())
    assert not any(p.requires_grad for p in est.parameters())
    with trainable(est.discriminator_parameters()):
        assert all(p.requires_grad for p in est.discriminator.parameters())
        assert not any(p.requires_grad for p in est.generator.parameters())
    assert not any(p.requires_grad for p in est.parameters())


def test_gan_losses_match_eq9():
    est = ComplexityEstimator("gan", 8, feature_stride=16, out_scale=0.25, channels=8).eval()
    f, real = _inputs()
    with torch.no_grad():
        d_real = est.discriminator(real)
        d_fake = est.discriminator(est.generator(f, (16, 16)))
        d_loss = est.discriminator_loss(f, real)
        g_loss = est.generator_loss(f, real)
    # D: -[log D(x) + log(1 - D(G(f)))]; G (minimax): log(1 - D(G(f)))
    expected_d = -(torch.log(torch.sigmoid(d_real)).mean() + torch.log(1 - torch.sigmoid(d_fake)).mean())
    assert d_loss.item() == pytest.approx(expected_d.item(), abs=1e-5)
    assert g_loss.item() == pytest.approx(torch.log(1 - torch.sigmoid(d_fake)).mean().item(), abs=1e-5)
    est.g_loss = "non_saturating"
    with torch.no_grad():
        ns = est.generator_loss(f, real)
    assert ns.item() == pytest.approx(-torch.log(torch.sigmoid(d_fake)).mean().item(), abs=1e-5)


def test_generator_loss_reaches_only_generator():
    est = ComplexityEstimator("gan", 8, feature_stride=16, out_scale=0.25, channels=8)
    f, real = _inputs()
    with trainable(est.generator_parameters()):
        est.generator_loss(f, real).backward()
    assert all(p.grad is not None for p in est.generator_parameters())
    assert all(p.grad is None for p in est.discriminator_parameters())


def test_beta_vae_and_random_scores():
    f, real = _inputs()
    vae = ComplexityEstimator("beta_vae", 8, feature_stride=16, out_scale=0.25, channels=8,
                              vae_beta=0.5).eval()
    with torch.no_grad():
        recon, _, _ = vae._vae(f, (16, 16), sample=False)
        s = vae.score(f, real)
    assert torch.allclose(s, torch.exp(-F.mse_loss(recon, real, reduction="none").flatten(1).mean(1)))
    assert vae.discriminator_parameters() == [] and vae.generator_parameters()
    u = ComplexityEstimator("random_uniform", 8, 16, 0.25)
    b = ComplexityEstimator("random_beta", 8, 16, 0.25, beta_dist=(3.0, 1.0))
    assert list(u.parameters()) == [] and u.generator_parameters() == []
    torch.manual_seed(0)
    su = u.score(torch.zeros(4000, 1, 1, 1), real)
    sb = b.score(torch.zeros(4000, 1, 1, 1), real)
    assert abs(su.mean().item() - 0.5) < 0.03 and abs(sb.mean().item() - 0.75) < 0.03  # E[Be(3,1)] = 3/4
    with pytest.raises(ValueError, match="MODEL.BIDET.AUTO.ESTIMATOR"):
        ComplexityEstimator("vae", 8, 16, 0.25)


def test_real_images_range_and_size():
    mean = torch.tensor([103.5, 116.3, 123.7]).view(3, 1, 1)
    std = torch.ones(3, 1, 1)
    raw = torch.tensor([0.0, 255.0]).repeat_interleave(32 * 16).view(1, 1, 32, 32).expand(1, 3, 32, 32)
    out = real_images((raw - mean) / std, mean, std, 0.5)
    assert out.shape == (1, 3, 16, 16)
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() == pytest.approx(1.0)
