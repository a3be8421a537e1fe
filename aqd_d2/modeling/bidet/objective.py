"""What every BiDet detector shares: the feature bottleneck, the per-image beta (fixed, or
AutoBiDet's T(s) from the complexity estimator) and the warm-up gate of the extra terms.

Meta-architectures hold one :class:`BiDetObjective` as ``self.bidet``; its estimator's
parameters (``bidet.estimator.*``) belong to no MODEL.QUANT component, so they stay float.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage
from torch import nn

from .bottleneck import FeatureBottleneck
from .estimator import ComplexityEstimator, real_images
from .losses import beta_transform

__all__ = ["BiDetObjective"]


class BiDetObjective(nn.Module):
    """Args:
        bottleneck: the I(X;F) module.
        beta: fixed beta (eq. 7), used when ``estimator`` is None.
        feature_weight: weight of I(X;F) (1 in eq. 7).
        warmup_iters: iterations without I(X;F) / SOP and with beta = 1.
        estimator: AutoBiDet's complexity estimator, or None (BiDet).
        transform, delta, theta: eq. 10.
        in_feature: the feature map fed to the estimator.
        out_scale: reconstruction side relative to the input.
    """

    @configurable
    def __init__(self, *, bottleneck: FeatureBottleneck, beta: float = 10.0,
                 feature_weight: float = 1.0, warmup_iters: int = 0,
                 estimator: Optional[ComplexityEstimator] = None, transform: str = "sine",
                 delta: float = 10.0, theta: float = 5.0, in_feature: str = "",
                 out_scale: float = 0.25):
        super().__init__()
        self.bottleneck = bottleneck
        self.beta = float(beta)
        self.feature_weight = float(feature_weight)
        self.warmup_iters = int(warmup_iters)
        self.estimator = estimator
        self.transform = transform
        self.delta = float(delta)
        self.theta = float(theta)
        self.in_feature = in_feature
        self.out_scale = float(out_scale)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        b, a = cfg.MODEL.BIDET, cfg.MODEL.BIDET.AUTO
        ib_names = list(b.IB_FEATURES) or list(input_shape.keys())
        in_feature = a.IN_FEATURE or ib_names[0]
        if in_feature not in input_shape:
            from aqd_d2.config import ConfigError

            raise ConfigError(f"MODEL.BIDET.AUTO.IN_FEATURE = {in_feature!r} is not a backbone "
                              f"output; choose one of {sorted(input_shape)}")
        warmup = b.WARMUP_ITERS
        if b.WARMUP_UNTIL_FIRST_DECAY:
            warmup = int(cfg.SOLVER.STEPS[0]) if len(cfg.SOLVER.STEPS) else 0
        estimator = None
        if a.ENABLED:
            shape = input_shape[in_feature]
            estimator = ComplexityEstimator(
                a.ESTIMATOR, shape.channels, shape.stride or 1, a.OUT_SCALE, a.CHANNELS,
                g_loss=a.G_LOSS, vae_beta=a.VAE_BETA, beta_dist=tuple(a.BETA_DIST))
        return {"bottleneck": FeatureBottleneck(cfg), "beta": b.BETA,
                "feature_weight": b.FEATURE_WEIGHT, "warmup_iters": warmup,
                "estimator": estimator, "transform": a.TRANSFORM, "delta": a.DELTA,
                "theta": a.THETA, "in_feature": in_feature, "out_scale": a.OUT_SCALE}

    def active(self) -> bool:
        """False during the warm-up iterations (read from detectron2's EventStorage; True
        outside a training loop)."""
        if self.warmup_iters <= 0:
            return True
        try:
            return get_event_storage().iter >= self.warmup_iters
        except AssertionError:  # no EventStorage in use
            return True

    def real_images(self, images: torch.Tensor, pixel_mean: torch.Tensor,
                    pixel_std: torch.Tensor) -> torch.Tensor:
        """The estimator's target: (N, 3, H*out_scale, W*out_scale) images in [-1, 1]."""
        return real_images(images, pixel_mean, pixel_std, self.out_scale)

    def image_betas(self, features: Dict[str, torch.Tensor], real: Optional[torch.Tensor],
                    n: int, device: torch.device) -> torch.Tensor:
        """(n,) beta per image: fixed ``beta`` or ``T(s)`` (eq. 10) with s from the estimator
        (no gradient). ``real`` may be None when there is no estimator."""
        if self.estimator is None:
            return torch.full((n,), self.beta, device=device)
        s = self.estimator.score(features[self.in_feature].detach(), real)
        return beta_transform(s, self.transform, self.delta, self.theta)

    def forward(self, params: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Features and the weighted per-image I(X;F) term (N,) (see FeatureBottleneck)."""
        features, kl = self.bottleneck(params)
        return features, self.feature_weight * kl
