"""The information bottleneck on the high-level feature maps (paper 000 sec. 3.1, eq. 3 / 7).

The backbone's last layer outputs the *parameters* of the feature-map posterior p(f|x); this
parameter-free module turns them into feature maps and the I(X;F) term:

- ``"binomial"`` (binary detectors, the paper's default): ``p = sigmoid(a)`` is the
  probability that f = +1. Training: f is a Monte-Carlo sample, +1 with probability p else -1.
  Gradient estimator: straight-through on the Bernoulli sample through its mean,
  ``f = sample + (E[f] - E[f].detach())`` with ``E[f] = 2p - 1 = tanh(a/2)``, so
  ``df/da = (1 - tanh(a/2)^2) / 2``. Eval: ``f = sign(a)`` (sign(0) = +1, the project's
  binary convention), deterministic. I(X;F): KL(Bern(p) || Bern(1/2)) (closed form).
- ``"categorical"`` (n-bit maps, appendix 001 B.2): posterior over the 2^n levels v_k of
  [-1, 1], a discretised Gaussian around a, ``p_k ~ exp(-(a - v_k)^2 / (2 D^2))`` with D the
  level spacing. Training: sample a level, straight-through via ``E[f] = sum_k p_k v_k``.
  Eval: the most probable (nearest) level. I(X;F): KL against the uniform 2^n-class prior.
- ``"gaussian"`` (real-valued maps of pruned / efficient models): posterior N(a, 1);
  training ``f = a + eps`` (reparameterisation), eval ``f = a``; KL to N(0,1) = a^2/2.
- ``as_l2=True`` (official BiDet code): deterministic ``f = a`` and the penalty a^2/2.

Kept out of the backbone (it is applied by the meta-architecture right after
``self.backbone``) so the backbone's state_dict keys, the MODEL.QUANT component prefixes and
float checkpoints stay those of the float detector, and so the KL can reach the loss dict.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from .losses import binomial_kl, categorical_kl, categorical_levels, gaussian_kl

__all__ = ["FeatureBottleneck"]


class FeatureBottleneck(nn.Module):
    """Samples / binarizes the named feature maps and returns the per-image I(X;F) term.

    Args:
        prior: "binomial" | "categorical" | "gaussian".
        bits: bits of the feature maps for "categorical".
        in_features: names of the maps to treat; empty = all.
        as_l2: official-code variant (see module doc).
    """

    @configurable
    def __init__(self, *, prior: str = "binomial", bits: int = 2,
                 in_features: Sequence[str] = (), as_l2: bool = False):
        super().__init__()
        if prior not in ("binomial", "categorical", "gaussian"):
            raise ValueError(f"MODEL.BIDET.FEATURE_PRIOR = {prior!r}; choose one of "
                             "['binomial', 'categorical', 'gaussian']")
        self.prior = prior
        self.bits = int(bits)
        self.in_features = tuple(in_features)
        self.as_l2 = bool(as_l2)

    @classmethod
    def from_config(cls, cfg) -> dict:
        b = cfg.MODEL.BIDET
        return {"prior": b.FEATURE_PRIOR, "bits": b.FEATURE_BITS,
                "in_features": list(b.IB_FEATURES), "as_l2": b.IB_AS_L2}

    def extra_repr(self) -> str:
        return f"prior={self.prior}, bits={self.bits}, in_features={self.in_features}, as_l2={self.as_l2}"

    def _one(self, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(feature map, elementwise KL) for one map of parameters ``a`` (N, C, H, W)."""
        if self.as_l2:
            return a, gaussian_kl(a)
        if self.prior == "gaussian":
            f = a + torch.randn_like(a) if self.training else a
            return f, gaussian_kl(a)
        if self.prior == "binomial":
            kl = binomial_kl(a)
            if not self.training:
                return torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a)), kl
            mean = torch.tanh(0.5 * a)  # E[f] = 2p - 1
            sample = torch.where(torch.rand_like(a) < torch.sigmoid(a), 1.0, -1.0).to(a.dtype)
            return sample + (mean - mean.detach()), kl
        levels = categorical_levels(self.bits, device=a.device, dtype=a.dtype)  # (K,)
        spacing = 2.0 / (levels.numel() - 1)
        logits = -((a.unsqueeze(-1) - levels) ** 2) / (2 * spacing ** 2)  # (N, C, H, W, K)
        probs = logits.softmax(-1)
        kl = categorical_kl(probs)
        if not self.training:
            return levels[logits.argmax(-1)], kl
        mean = (probs * levels).sum(-1)
        idx = torch.multinomial(probs.detach().reshape(-1, levels.numel()), 1).view(a.shape)
        return levels[idx] + (mean - mean.detach()), kl

    def forward(self, params: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Feature maps and I(X;F).

        Args:
            params: backbone outputs {name: (N, C, H, W)}: the posterior parameters.
        Returns:
            (features, kl): the same dict with the treated maps replaced by sampled (training)
            or deterministic (eval) features; ``kl`` (N,) is the per-image I(X;F) term,
            the elementwise KL summed over all treated maps and divided by their number of
            elements per image (a mean, so its scale does not depend on the image size).
        """
        names = self.in_features or tuple(params.keys())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"MODEL.BIDET.IB_FEATURES names {missing}, not backbone outputs "
                           f"{sorted(params)}")
        out = dict(params)
        total, count = None, 0
        for n in names:
            f, kl = self._one(params[n])
            out[n] = f
            per_img = kl.flatten(1).sum(1)
            total = per_img if total is None else total + per_img
            count += kl[0].numel()
        return out, total / max(count, 1)
