"""BiDet on SSD (paper 000 with SSD300, :class:`aqd_d2.modeling.bidet.ssd.BiDetSSD`):
MODEL.BIDET.SSD_LOCATION_LOSS and MODEL.BIDET.SSD_SAMPLE_SCALE.

The paper's location term (eq. 7) is the Gaussian ``-log p(l|f) / p(l)``; the official BiDet
SSD code instead applies SSD's smooth L1 to a reparameterised sample of the location
posterior, which has no ``exp(-logvar)`` factor on the means' gradient. Both are offered; the
paper's is the default.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import check_choice, check_range

SSD_LOCATION_LOSSES = ("gaussian", "sampled_smooth_l1")


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it); needs MODEL.BIDET."""
    _C = cfg
    # Location term of BiDetSSD: "gaussian" (paper 000 eq. 7: 0.5((l-mu)^2 exp(-lv) + lv)
    # - 0.5 l^2 per offset, N(0, I) prior) or "sampled_smooth_l1" (official BiDet SSD code:
    # SSD's smooth L1 between l and mu + SSD_SAMPLE_SCALE * exp(lv / 2) * eps, eps ~ N(0, I)).
    _C.MODEL.BIDET.SSD_LOCATION_LOSS = "gaussian"
    # Scale of the posterior sample for SSD_LOCATION_LOSS "sampled_smooth_l1" (the official
    # code's --sigma, default 0 there: the smooth L1 of the means).
    _C.MODEL.BIDET.SSD_SAMPLE_SCALE = 0.0


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
    check_choice(cfg, "MODEL.BIDET.SSD_LOCATION_LOSS", SSD_LOCATION_LOSSES)
    check_range(cfg, "MODEL.BIDET.SSD_SAMPLE_SCALE", 0.0)
