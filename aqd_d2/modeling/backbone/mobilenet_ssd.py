"""MobileNetV1 SSD backbone (paper 000's MobileNetV1 SSD300 rows), registered as
``"build_mobilenet_ssd_backbone"``.

MobileNet v1 (Howard et al. 2017) as :class:`~aqd_d2.modeling.backbone.darknet.MobileNetYOLO`
builds it (conv1 3x3 s2, then depthwise ``*_dw`` + pointwise ``*_sep`` pairs up to conv6;
every conv = Conv2d + BN + activation), followed by the SSD extras of MobileNet-SSD: pairs of
1x1 and 3x3 stride-2 convs ``conv7_1/conv7_2`` (256/512), ``conv8_*`` (128/256),
``conv9_*`` (128/256), ``conv10_*`` (64/128). Outputs (at 300 px): ``conv5`` (conv5_5_sep,
19x19, 512 ch), ``conv6`` (10x10, 1024), ``conv7_2`` (5x5), ``conv8_2`` (3x3), ``conv9_2``
(2x2), ``conv10_2`` (1x1). ``conv1`` is the first conv (KEEP_FIRST_FP).

Options (MODEL.MOBILENET_SSD.*): ``WIDTH_MULT``; ``ACTIVATION`` "relu" (MobileNet) or
"none" (binary nets: the next layer's sign is the non-linearity).
"""
from __future__ import annotations

from typing import Optional, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .darknet import MobileNetYOLO, _w, conv_bn_leaky

__all__ = ["MobileNetV1SSD", "build_mobilenet_ssd_backbone", "MOBILENET_SSD_FEATURES"]

MOBILENET_SSD_FEATURES = ["conv5", "conv6", "conv7_2", "conv8_2", "conv9_2", "conv10_2"]

# (1x1 name, 1x1 channels, 3x3 stride-2 name, 3x3 channels)
_EXTRAS = (("conv7_1", 256, "conv7_2", 512), ("conv8_1", 128, "conv8_2", 256),
           ("conv9_1", 128, "conv9_2", 256), ("conv10_1", 64, "conv10_2", 128))


class MobileNetV1SSD(MobileNetYOLO):
    """MobileNet v1 + SSD extras (see the module docstring).

    Args:
        in_channels: image channels.
        width_mult: channel multiplier.
        activation: "relu" or "none" (identity).
        out_features: outputs to produce (default all six); extras after the last one are not
            built.
    """

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, activation: str = "relu",
                 out_features: Optional[Sequence[str]] = None):
        if activation not in ("relu", "none"):
            raise ValueError(f"MODEL.MOBILENET_SSD.ACTIVATION = {activation!r}; choose 'relu' or 'none'")
        # leaky ReLU with slope 0 is ReLU, with slope 1 the identity
        slope = 0.0 if activation == "relu" else 1.0
        super().__init__(in_channels, width_mult, negative_slope=slope)
        out_features = list(MOBILENET_SSD_FEATURES if out_features is None else out_features)
        if not out_features or any(f not in MOBILENET_SSD_FEATURES for f in out_features):
            raise ValueError(f"MobileNetV1SSD outputs {out_features}: choose from {MOBILENET_SSD_FEATURES}")
        n_extras = max(MOBILENET_SSD_FEATURES.index(f) for f in out_features) - 1
        c = self._specs["conv6"].channels
        strides = {"conv7_2": 64, "conv8_2": 100, "conv9_2": 150, "conv10_2": 300}
        for n1, c1, n2, c2 in _EXTRAS[: max(n_extras, 0)]:
            c1, c2 = _w(c1, width_mult), _w(c2, width_mult)
            self._add(n1, conv_bn_leaky(c, c1, 1, negative_slope=slope))
            self._add(n2, conv_bn_leaky(c1, c2, 3, stride=2, negative_slope=slope))
            self._outputs[n2] = n2
            self._specs[n2] = ShapeSpec(channels=c2, stride=strides[n2])
            c = c2
        for f in [f for f in self._outputs if f not in out_features]:
            del self._outputs[f], self._specs[f]

    @property
    def size_divisibility(self) -> int:
        return 0  # SSD resizes to a fixed square input


@BACKBONE_REGISTRY.register()
def build_mobilenet_ssd_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV1SSD:
    """MobileNetV1 SSD from ``MODEL.MOBILENET_SSD.*``, built up to the last of
    ``MODEL.SSD.IN_FEATURES`` (all six when none of them is an output).

    Args:
        cfg: config with aqd_d2's keys.
        input_shape: its ``channels`` are the image channels.
    Returns:
        the backbone.
    """
    m = cfg.MODEL.MOBILENET_SSD
    wanted = [f for f in MOBILENET_SSD_FEATURES if f in cfg.MODEL.SSD.IN_FEATURES] or None
    return MobileNetV1SSD(input_shape.channels, m.WIDTH_MULT, m.ACTIVATION, wanted)
