"""AutoBiDet's complexity estimator (CES, paper 000 sec. 3.2.1, eq. 9-10) and the appendix
ablations (001 Tables 5-6).

- ``"gan"``: an SN-GAN-style generator G (a spectrally normalised conv *input layer* taking
  the high-level feature maps, then upsampling conv blocks) reconstructs the image at
  ``out_scale`` of its side (1/2 SSD, 1/4 Faster R-CNN), and a spectrally normalised
  discriminator D scores real vs reconstructed images. Score s = D(G(f)) (a probability).
- ``"beta_vae"``: a beta-VAE (conv encoder on f to a Gaussian latent, the same decoder as G);
  s = exp(-MSE(reconstruction, image)) in (0, 1]: high for well reconstructed (simple)
  images, like D(G(f)). (Appendix: "the normalised L2 distance as s".)
- ``"random_uniform"`` / ``"random_beta"``: s ~ U[0,1] / Beta(a, b), no parameters.

Parameters are created with ``requires_grad=False``: detectron2's ``build_optimizer`` (which
takes only parameters that require grad) therefore leaves them out of the detector's
optimizer, also under the stock DefaultTrainer. :class:`aqd_d2.engine.gan_loop.BiDetGANLoop`
switches them on only inside its own D / G steps (:func:`trainable`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["Generator", "Discriminator", "ComplexityEstimator", "trainable", "real_images"]


def _sn_conv(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, s, k // 2 if s == 1 else (k - s + 1) // 2))


class Generator(nn.Module):
    """Feature maps (N, C_in, h, w) -> image (N, 3, H', W') in [-1, 1].

    Args:
        in_channels: C_in of the feature map fed to the conv input layer.
        channels: width of the generator.
        num_up: number of x2 upsampling blocks (nearest + SN conv + BN + ReLU).
    """

    def __init__(self, in_channels: int, channels: int, num_up: int):
        super().__init__()
        self.input_layer = _sn_conv(in_channels, channels)
        blocks: List[nn.Module] = []
        for _ in range(num_up):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), _sn_conv(channels, channels),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                          _sn_conv(channels, 3), nn.Tanh())

    def forward(self, f: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Returns (N, 3, *size): the reconstruction, resized to ``size`` if needed."""
        x = self.output_layer(self.blocks(self.input_layer(f)))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class Discriminator(nn.Module):
    """Image (N, 3, H, W) -> logit (N,) that the image is real (SN-GAN-style, sum pooling)."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            _sn_conv(3, c), nn.LeakyReLU(0.1),
            _sn_conv(c, 2 * c, 4, 2), nn.LeakyReLU(0.1),
            _sn_conv(2 * c, 2 * c), nn.LeakyReLU(0.1),
            _sn_conv(2 * c, 4 * c, 4, 2), nn.LeakyReLU(0.1),
        )
        self.linear = spectral_norm(nn.Linear(4 * c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.body(x).sum(dim=(2, 3))).squeeze(1)


@contextlib.contextmanager
def trainable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Let ``params`` require grad inside the block (the estimator's are frozen otherwise)."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def real_images(images: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                scale: float) -> torch.Tensor:
    """The detector's normalised input batch (N, 3, H, W) as [-1, 1] images at ``scale``."""
    x = (images * pixel_std + pixel_mean) / 127.5 - 1.0
    size = (max(8, round(x.shape[-2] * scale)), max(8, round(x.shape[-1] * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(-1, 1)


class ComplexityEstimator(nn.Module):
    """Per-image score s in [0, 1] of how well the features explain the image (high = simple).

    Args:
        kind: "gan" | "beta_vae" | "random_uniform" | "random_beta".
        in_channels: channels of the feature map (the generator's / encoder's input).
        feature_stride: stride of that map w.r.t. the input image.
        out_scale: side of the reconstruction relative to the input (eq.: 1/2 or 1/4).
        channels: width of G / D (or of the VAE).
        g_loss: "minimax" (eq. 9 as written) or "non_saturating".
        vae_beta: weight of the beta-VAE's KL term.
        beta_dist: (a, b) of the Beta distribution for "random_beta".
    """

    def __init__(self, kind: str, in_channels: int, feature_stride: int, out_scale: float,
                 channels: int = 64, g_loss: str = "minimax", vae_beta: float = 1.0,
                 beta_dist: Tuple[float, float] = (2.0, 2.0)):
        super().__init__()
        self.kind = kind
        self.out_scale = float(out_scale)
        self.g_loss = g_loss
        self.vae_beta = float(vae_beta)
        self.beta_dist = (float(beta_dist[0]), float(beta_dist[1]))
        num_up = max(0, round(math.log2(max(feature_stride * out_scale, 1.0))))
        if kind == "gan":
            self.generator = Generator(in_channels, channels, num_up)
            self.discriminator = Discriminator(channels)
        elif kind == "beta_vae":
            self.encoder = nn.Conv2d(in_channels, 2 * channels, 3, padding=1)  # mean, logvar
            self.generator = Generator(channels, channels, num_up)
        elif kind not in ("random_uniform", "random_beta"):
            raise ValueError(f"MODEL.BIDET.AUTO.ESTIMATOR = {kind!r}; choose one of "
                             "['beta_vae', 'gan', 'random_beta', 'random_uniform']")
        for p in self.parameters():
            p.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, out_scale={self.out_scale}, g_loss={self.g_loss}"

    def generator_parameters(self) -> List[nn.Parameter]:
        """Parameters updated by the generator step (the whole VAE for "beta_vae")."""
        if self.kind == "gan":
            return list(self.generator.parameters())
        if self.kind == "beta_vae":
            return list(self.encoder.parameters()) + list(self.generator.parameters())
        return []

    def discriminator_parameters(self) -> List[nn.Parameter]:
        """Parameters updated by the discriminator steps (none unless "gan")."""
        return list(self.discriminator.parameters()) if self.kind == "gan" else []

    def _vae(self, f: torch.Tensor, size, sample: bool):
        mean, logvar = self.encoder(f).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.generator(z, size), mean, logvar

    @torch.no_grad()
    def score(self, f: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """s (N,) in [0, 1], without gradient (beta = T(s) is a weight, not a path to G/D).

        Args:
            f: (N, C, h, w) high-level feature map; real: (N, 3, H', W') images in [-1, 1].
        """
        n = f.shape[0]
        if self.kind == "gan":
            return torch.sigmoid(self.discriminator(self.generator(f, real.shape[-2:])))
        if self.kind == "beta_vae":
            recon, _, _ = self._vae(f, real.shape[-2:], sample=False)
            return torch.exp(-((recon - real) ** 2).flatten(1).mean(1))
        if self.kind == "random_uniform":
            return torch.rand(n, device=f.device)
        dist = torch.distributions.Beta(*[torch.tensor(v, device=f.device) for v in self.beta_dist])
        return dist.sample((n,))

    def discriminator_loss(self, f: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``-[log D(x) + log(1 - D(G(f)))]`` (paper 000 eq. 9, D maximises it), batch mean;
        G's output is detached."""
        fake = self.generator(f, real.shape[-2:]).detach()
        return F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()

    def generator_loss(self, f: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Generator step loss. "gan": ``log(1 - D(G(f)))`` (eq. 9, G minimises it) or the
        non-saturating ``-log D(G(f))``; "beta_vae": per-image squared error (sum over pixels,
        batch mean) + vae_beta * KL(q(z|f) || N(0, I))."""
        if self.kind == "gan":
            logit = self.discriminator(self.generator(f, real.shape[-2:]))
            if self.g_loss == "minimax":
                return -F.softplus(logit).mean()  # log(1 - sigmoid(z)) = -softplus(z)
            return F.softplus(-logit).mean()  # -log sigmoid(z)
        if self.kind == "beta_vae":
            recon, mean, logvar = self._vae(f, real.shape[-2:], sample=True)
            rec = ((recon - real) ** 2).flatten(1).sum(1).mean()
            kl = (0.5 * (logvar.exp() + mean ** 2 - 1 - logvar)).flatten(1).sum(1).mean()
            return rec + self.vae_beta * kl
        raise RuntimeError(f"the {self.kind!r} estimator has nothing to train")
