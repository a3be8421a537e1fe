"""What every BiDet detector shares: the feature bottleneck, the per-image beta (fixed, or
AutoBiDet's T(s) from the complexity estimator) and the warm-up gate of the extra terms.

Meta-architectures hold one :class:`BiDetObjective` as ``self.bidet``; its estimator's
parameters (``bidet.estimator.*``) belong to no MODEL.QUANT component, so they stay float.

The balance of the terms (paper 000 eq. 7), per image::

    J = sum_{t,s} KL(f_st)  +  beta * sum_i D_i  +  gamma * J2

with ``KL(f_st) = log p(f_st|x)/p(f_st)`` over the E elements of the high-level feature maps,
``D_i = -log p(c_i|f)/p(c_i) - log p(l_i|f)/p(l_i)`` over the detection terms (the sampled RoIs
of a Faster R-CNN, SSD's positives and mined negatives) and J2 the SOP term (eq. 6 / 11). The
detectors average their detection terms over Z per image (detectron2: the R sampled RoIs of
the batch, Z = ROI_HEADS.BATCH_SIZE_PER_IMAGE; SSD: the positives), so the loss they return is
``FEATURE_WEIGHT * reduce(KL) + beta * sum_i D_i / Z + GAMMA * J2``, i.e. eq. 7 / Z exactly
when ``FEATURE_REDUCTION`` is "sum", ``FEATURE_WEIGHT = 1/Z`` and ``GAMMA = gamma/Z``
(:func:`eq7_weights`; the paper configs ship these). :func:`eq7_effective_weights` gives the
weights of any setting relative to eq. 7 (the "mean" reduction weights the feature term
``1/E`` of the paper's).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage
from torch import nn

from aqd_d2.config.bidet import FEATURE_REDUCTIONS

from .bottleneck import FeatureBottleneck
from .estimator import ComplexityEstimator, real_images
from .losses import beta_transform

__all__ = ["BiDetObjective", "eq7_weights", "eq7_effective_weights", "FEATURE_REDUCTIONS"]



def eq7_weights(gamma: float, terms_per_image: float) -> Dict[str, float]:
    """MODEL.BIDET.FEATURE_WEIGHT / GAMMA that make the returned loss eq. 7 / Z (module doc).

    Paper 000 eq. 7 weights I(X;F) by 1, the detection terms by beta, J2 by gamma; the
    detectors average the detection terms over Z terms per image, so the other two are divided
    by the same Z (with FEATURE_REDUCTION "sum"). BETA stays beta.

    Args:
        gamma: eq. 7's gamma (0.2 in the paper).
        terms_per_image: Z (R-CNN: ROI_HEADS.BATCH_SIZE_PER_IMAGE; SSD: positives per image).
    Returns:
        {"FEATURE_WEIGHT": 1/Z, "GAMMA": gamma/Z}.
    """
    if terms_per_image <= 0:
        raise ValueError(f"eq7_weights: terms per image must be > 0, got {terms_per_image}")
    return {"FEATURE_WEIGHT": 1.0 / terms_per_image, "GAMMA": gamma / terms_per_image}


def eq7_effective_weights(feature_reduction: str, feature_weight: float, beta: float,
                          gamma: float, elements: float, terms_per_image: float) -> Dict[str, float]:
    """The weights of the three terms relative to paper 000 eq. 7 (module doc): the loss a
    detector returns per image is ``(1/Z) (w_F sum_e KL_e + w_D sum_i D_i + w_S J2)``; eq. 7 is
    ``w_F = 1, w_D = beta, w_S = gamma``.

    Args:
        feature_reduction: "sum" or "mean" (MODEL.BIDET.FEATURE_REDUCTION).
        feature_weight, beta, gamma: MODEL.BIDET.FEATURE_WEIGHT / BETA / GAMMA.
        elements: E, elements of the IB feature maps per image.
        terms_per_image: Z, the detection terms the detector averages over per image.
    Returns:
        {"feature": w_F, "detection": w_D, "sop": w_S}.
    """
    if feature_reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"MODEL.BIDET.FEATURE_REDUCTION = {feature_reduction!r}; choose one of "
                         f"{list(FEATURE_REDUCTIONS)}")
    per_element = 1.0 if feature_reduction == "sum" else 1.0 / elements
    return {"feature": feature_weight * terms_per_image * per_element, "detection": beta,
            "sop": gamma * terms_per_image}


class BiDetObjective(nn.Module):
    """Args:
        bottleneck: the I(X;F) module.
        beta: fixed beta (eq. 7), used when ``estimator`` is None.
        feature_weight: weight of I(X;F) (1 in eq. 7; 1/Z for eq. 7's balance, module doc).
        feature_reduction: "sum" (eq. 7) or "mean" over the feature elements of an image.
        warmup_iters: iterations without I(X;F) / SOP and with beta = 1.
        estimator: AutoBiDet's complexity estimator, or None (BiDet).
        transform, delta, theta: eq. 10.
        in_feature: the feature map fed to the estimator.
        out_scale: reconstruction side relative to the input.
    """

    @configurable
    def __init__(self, *, bottleneck: FeatureBottleneck, beta: float = 10.0,
                 feature_weight: float = 1.0, feature_reduction: str = "mean",
                 warmup_iters: int = 0,
                 estimator: Optional[ComplexityEstimator] = None, transform: str = "sine",
                 delta: float = 10.0, theta: float = 5.0, in_feature: str = "",
                 out_scale: float = 0.25):
        super().__init__()
        self.bottleneck = bottleneck
        self.beta = float(beta)
        self.feature_weight = float(feature_weight)
        if feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"MODEL.BIDET.FEATURE_REDUCTION = {feature_reduction!r}; choose one "
                             f"of {list(FEATURE_REDUCTIONS)}")
        self.feature_reduction = feature_reduction
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
                "feature_weight": b.FEATURE_WEIGHT, "feature_reduction": b.FEATURE_REDUCTION,
                "warmup_iters": warmup,
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

    def feature_elements(self, params: Dict[str, torch.Tensor]) -> int:
        """E: elements per image of the maps that carry the bottleneck (C*H*W summed)."""
        names = self.bottleneck.in_features or tuple(params.keys())
        return sum(params[n][0].numel() for n in names if n in params)

    def forward(self, params: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Features and the weighted per-image I(X;F) term (N,).

        The bottleneck (:class:`~.bottleneck.FeatureBottleneck`) returns the per-image mean
        over the E feature elements; FEATURE_REDUCTION "sum" multiplies it back by E: eq. 7's
        ``sum_{t,s} log p(f_st|x) / p(f_st)``. Returns ``FEATURE_WEIGHT`` times that."""
        features, kl = self.bottleneck(params)
        if self.feature_reduction == "sum":
            kl = kl * float(self.feature_elements(params))
        return features, self.feature_weight * kl
