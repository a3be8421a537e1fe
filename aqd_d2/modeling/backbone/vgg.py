"""VGG16 backbone of SSD300 (Liu et al. 2016) with the SSD extra layers, registered as
``"build_vgg16_ssd_backbone"``; the binary "(SC)" variant of BiDet (paper 000, Table 2).

Layers (names are module names, so MODEL.QUANT rules are regexes of them; every conv is a
detectron2 ``Conv2d`` with its norm inside, which the conversion pass swaps):

    conv1_1 conv1_2 | pool1 | conv2_1 conv2_2 | pool2 | conv3_1..conv3_3 | pool3 (ceil mode) |
    conv4_1..conv4_3 [-> conv4_3_norm: L2Norm, "conv4_3"] | pool4 | conv5_1..conv5_3 |
    pool5 (3x3, stride 1) | fc6 (3x3, dilation 6) | fc7 (1x1) ["fc7"] |
    conv8_1 (1x1) conv8_2 (3x3 s2) ["conv8_2"] | conv9_1 conv9_2 (3x3 s2) ["conv9_2"] |
    conv10_1 conv10_2 (3x3 valid) ["conv10_2"] | conv11_1 conv11_2 (3x3 valid) ["conv11_2"]

At 300 x 300 the six outputs are 38, 19, 10, 5, 3, 1 pixels wide. All layers, extras
included, are the "backbone" component of MODEL.QUANT (prefix ``backbone.``) and ``conv1_1``
is its first conv (KEEP_FIRST_FP).

Options (MODEL.VGG.*): ``NORM`` ("" = SSD's plain convs with bias; "BN" after every conv, which
binary VGG needs), ``ACTIVATION`` ("relu"; "none" for binary nets, where the next layer's sign
is the non-linearity: sign(relu(x)) would be +1 everywhere), ``SHORTCUT`` (Bi-Real-Net's extra
identity shortcut around every conv whose input and output shapes are equal), ``DOWNSAMPLE``
("maxpool", or "strided_conv": pool1-pool4 are dropped and the conv after each becomes a
stride-2 conv, with a shortcut of 2x2 average pooling + 1x1 conv + norm when SHORTCUT is on,
as BiDet's binary VGG (SC); pool5 keeps stride 1 and stays a max-pool), ``WIDTH_MULT``.
Layers after the last feature that MODEL.SSD.IN_FEATURES uses are not built (so a 128-pixel
input with the four levels conv4_3 .. conv9_2 works: the valid convs of conv10_2 / conv11_2
need at least 3 x 3 inputs).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["L2Norm", "VGG16SSD", "build_vgg16_ssd_backbone", "ssd_width"]

# (name, out channels, kernel, stride, padding, dilation); "pool<k>" entries are pools.
_VGG16: Tuple[tuple, ...] = (
    ("conv1_1", 64, 3, 1, 1, 1), ("conv1_2", 64, 3, 1, 1, 1), ("pool1",),
    ("conv2_1", 128, 3, 1, 1, 1), ("conv2_2", 128, 3, 1, 1, 1), ("pool2",),
    ("conv3_1", 256, 3, 1, 1, 1), ("conv3_2", 256, 3, 1, 1, 1), ("conv3_3", 256, 3, 1, 1, 1),
    ("pool3",),
    ("conv4_1", 512, 3, 1, 1, 1), ("conv4_2", 512, 3, 1, 1, 1), ("conv4_3", 512, 3, 1, 1, 1),
    ("pool4",),
    ("conv5_1", 512, 3, 1, 1, 1), ("conv5_2", 512, 3, 1, 1, 1), ("conv5_3", 512, 3, 1, 1, 1),
    ("pool5",),
    ("fc6", 1024, 3, 1, 6, 6), ("fc7", 1024, 1, 1, 0, 1),
    ("conv8_1", 256, 1, 1, 0, 1), ("conv8_2", 512, 3, 2, 1, 1),
    ("conv9_1", 128, 1, 1, 0, 1), ("conv9_2", 256, 3, 2, 1, 1),
    ("conv10_1", 128, 1, 1, 0, 1), ("conv10_2", 256, 3, 1, 0, 1),
    ("conv11_1", 128, 1, 1, 0, 1), ("conv11_2", 256, 3, 1, 0, 1),
)
# output feature name -> (layer producing it, stride)
_OUTPUTS = {"conv4_3": ("conv4_3", 8), "fc7": ("fc7", 16), "conv8_2": ("conv8_2", 32),
            "conv9_2": ("conv9_2", 64), "conv10_2": ("conv10_2", 100), "conv11_2": ("conv11_2", 300)}


def ssd_width(c: int, mult: float) -> int:
    """Channel count ``c`` scaled by ``mult`` (at least 8)."""
    return max(8, int(round(c * mult)))


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels with a learnable per-channel scale
    (ParseNet, used by SSD on conv4_3): ``y_c = gamma_c * x_c / ||x||_2``.

    Args:
        channels: C.
        init_scale: initial gamma (SSD: 20).
        eps: added to the norm.
    """

    def __init__(self, channels: int, init_scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init_scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, C, H, W). Returns: (N, C, H, W)."""
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class VGG16SSD(Backbone):
    """VGG16 + SSD extras (see the module docstring).

    Args:
        in_channels: input channels (3).
        width_mult: channel multiplier (1.0 = VGG16).
        norm: "" or a detectron2 norm name ("BN", "SyncBN", ...), after every conv.
        activation: "relu" or "none".
        shortcut: Bi-Real extra shortcuts.
        downsample: "maxpool" or "strided_conv".
        l2norm_scale: initial L2Norm scale on conv4_3.
        out_features: the outputs to produce (a subset of the six, default all); layers after
            the last one are not built, so smaller inputs work (e.g. 128 px: conv4_3 .. conv9_2).
    """

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, norm: str = "",
                 activation: str = "relu", shortcut: bool = False, downsample: str = "maxpool",
                 l2norm_scale: float = 20.0, out_features: Optional[Sequence[str]] = None):
        super().__init__()
        out_features = list(_OUTPUTS) if out_features is None else list(out_features)
        unknown = [f for f in out_features if f not in _OUTPUTS]
        if unknown or not out_features:
            raise ValueError(f"VGG16SSD outputs {unknown or out_features} unknown; choose from {list(_OUTPUTS)}")
        last_layer = max((_OUTPUTS[f][0] for f in out_features), key=[x[0] for x in _VGG16].index)
        if activation not in ("relu", "none"):
            raise ValueError(f"MODEL.VGG.ACTIVATION = {activation!r}; choose 'relu' or 'none'")
        if downsample not in ("maxpool", "strided_conv"):
            raise ValueError(f"MODEL.VGG.DOWNSAMPLE = {downsample!r}; choose 'maxpool' or 'strided_conv'")
        self._relu = activation == "relu"
        # plan entries: (kind, name, shortcut kind) with kind "conv" | "pool" and shortcut
        # kind None | "identity" | "module" (a registered "<name>_shortcut").
        self._plan: List[Tuple[str, str, Optional[str]]] = []
        c = in_channels
        pending_stride = 1  # a dropped max-pool moves its stride into the next conv
        pending_ceil = False
        for spec in _VGG16:
            name = spec[0]
            if len(spec) == 1:
                if name != "pool5" and downsample == "strided_conv":
                    pending_stride, pending_ceil = 2, name == "pool3"
                else:
                    self._plan.append(("pool", name, None))
                continue
            _, out, k, stride, pad, dil = spec
            out = ssd_width(out, width_mult)
            stride = stride * pending_stride
            conv = Conv2d(c, out, k, stride=stride, padding=pad, dilation=dil, bias=not norm,
                          norm=get_norm(norm, out) if norm else None)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.add_module(name, conv)
            sc = None
            if shortcut and c == out and stride == 1 and 2 * pad == dil * (k - 1):
                sc = "identity"
            elif shortcut and pending_stride == 2:
                # BiDet (SC): 2x2 average pool (ceil mode where pool3 was) + 1x1 conv + norm
                self.add_module(f"{name}_shortcut", nn.Sequential(
                    nn.AvgPool2d(2, 2, ceil_mode=pending_ceil),
                    Conv2d(c, out, 1, bias=not norm, norm=get_norm(norm, out) if norm else None)))
                sc = "module"
            self._plan.append(("conv", name, sc))
            if name == "conv4_3" and "conv4_3" in out_features:
                self.conv4_3_norm = L2Norm(out, l2norm_scale)
            pending_stride, pending_ceil = 1, False
            c = out
            if name == last_layer:
                break
        self._out_features = [f for f in _OUTPUTS if f in out_features]
        self._out_feature_channels = {f: getattr(self, _OUTPUTS[f][0]).out_channels
                                      for f in self._out_features}
        self._out_feature_strides = {f: _OUTPUTS[f][1] for f in self._out_features}

    @staticmethod
    def _pool(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "pool5":
            return F.max_pool2d(x, 3, 1, 1)
        return F.max_pool2d(x, 2, 2, ceil_mode=name == "pool3")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args: x (N, C, H, W), normalised images. Returns: {feature name: (N, C_f, H_f, W_f)}
        for conv4_3 (after L2Norm), fc7, conv8_2, conv9_2, conv10_2, conv11_2 (those built)."""
        by_layer = {_OUTPUTS[f][0]: f for f in self._out_features}
        out: Dict[str, torch.Tensor] = {}
        for kind, name, sc in self._plan:
            if kind == "pool":
                x = self._pool(name, x)
                continue
            y = getattr(self, name)(x)
            if sc == "identity":
                y = y + x
            elif sc == "module":
                y = y + getattr(self, f"{name}_shortcut")(x)
            x = F.relu(y) if self._relu else y
            if name in by_layer:
                out[by_layer[name]] = self.conv4_3_norm(x) if name == "conv4_3" else x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


@BACKBONE_REGISTRY.register()
def build_vgg16_ssd_backbone(cfg, input_shape: ShapeSpec) -> VGG16SSD:
    """VGG16 + SSD extras from ``MODEL.VGG.*`` (see :class:`VGG16SSD`), built up to the last of
    ``MODEL.SSD.IN_FEATURES`` (all six when none of them is a VGG16SSD output).

    Args:
        cfg: config with aqd_d2's keys.
        input_shape: its ``channels`` are the image channels.
    Returns:
        the backbone.
    """
    v = cfg.MODEL.VGG
    wanted = [f for f in _OUTPUTS if f in cfg.MODEL.SSD.IN_FEATURES] or None
    return VGG16SSD(input_shape.channels, v.WIDTH_MULT, v.NORM, v.ACTIVATION, v.SHORTCUT,
                    v.DOWNSAMPLE, v.L2NORM_SCALE, wanted)
