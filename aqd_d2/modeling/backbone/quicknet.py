"""QuickNet-style encoder of the binary CenterNet (paper 003, sec. 4), registered as
``"build_quicknet_backbone"``.

Notation of the paper -> config keys (``MODEL.QUICKNET.*``, :mod:`aqd_d2.config`):

* stem ``st(z, f_s)`` (``STEM_CHANNELS`` = f_s, 0 = f_e1 as in the paper, ``qn(z)``):
  3x3 conv stride 2 to f_s/4 maps + BN + ReLU; 3x3 depthwise conv stride 2 + BN; 1x1 conv to
  f_s + BN. Output at 1/4 of the input size z.
* encoder ``qn([n_1 x f_e1, ..., n_Ne x f_eNe])`` (``DEPTHS`` = n_i, ``WIDTHS`` = f_ei): at
  each scale i, n_i residual blocks of f_ei maps, then a transition layer to the next scale.
  Residual block: the shortcut bypasses ONE 3x3 conv (the layer made binary by the conversion
  pass; it is a plain float conv here), and the conv is followed by ReLU and BN with Keras
  momentum 0.9 / eps 1e-5 (PyTorch momentum 0.1; ``BN_MOMENTUM``/``BN_EPS``), then the sum
  ``x + BN(ReLU(conv(x)))``, as in QuickNet [15] (the paper's sentence can be read either
  way; this is the reference QuickNet order).
  Transition: ReLU, fixed 3x3 depthwise blur kernel ([1,2,1] x [1,2,1] / 16) with stride 2,
  full-precision 3x3 conv to f_e(i+1) (f_eNe after the last scale), BN.
* the output ``"enc"`` has stride ``4 * 2**N_e`` (N_e = len(DEPTHS)).

Layer names (for MODEL.QUANT.COMPONENT_PREFIXES / OVERRIDES and the stage hook):
``backbone.stem.{conv1,dw,pw}``, ``backbone.scale{i}.block{j}.conv`` (the binary candidates),
``backbone.scale{i}.transition.{blur,conv}`` (i, j from 1).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["QuickNet", "FixedBlurConv2d", "QuickNetBlock", "build_quicknet_backbone"]


def _bn(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum, eps=eps)


class FixedBlurConv2d(nn.Conv2d):
    """Depthwise 3x3 blur ([1,2,1] outer [1,2,1] / 16) with stride 2; the kernel is fixed
    (``requires_grad=False``, so optimizers skip it). A subclass of ``nn.Conv2d``: the
    conversion pass never swaps it, and MAC counters see it as the depthwise conv it is."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        with torch.no_grad():
            self.weight.copy_(k.expand(channels, 1, 3, 3))
        self.weight.requires_grad_(False)


class QuickNetBlock(nn.Module):
    """``x + BN(ReLU(conv3x3(x)))``; ``conv`` is the binary candidate. Shape (N, C, H, W) kept."""

    def __init__(self, channels: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = _bn(channels, bn_momentum, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(F.relu(self.conv(x)))


class QuickNetTransition(nn.Module):
    """ReLU -> fixed blur depthwise 3x3 stride 2 -> float 3x3 conv -> BN; halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        self.blur = FixedBlurConv2d(in_channels)
        self.conv = Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = _bn(out_channels, bn_momentum, bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.blur(F.relu(x))))


class QuickNetStem(nn.Module):
    """``st(z, f_s)``: (N, C_in, z, z) -> (N, f_s, z/4, z/4)."""

    def __init__(self, in_channels: int, channels: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        mid = max(channels // 4, 1)
        self.conv1 = Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False,
                            norm=_bn(mid, bn_momentum, bn_eps))
        self.dw = Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False,
                         norm=_bn(mid, bn_momentum, bn_eps))
        self.pw = Conv2d(mid, channels, 1, bias=False, norm=_bn(channels, bn_momentum, bn_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(F.relu(self.conv1(x))))


class QuickNet(Backbone):
    """Stem + N_e scales of residual blocks, each followed by a transition (see module doc).

    Returns ``{"enc": (N, f_eNe, H / (4 * 2**N_e), W / (4 * 2**N_e))}``.
    """

    def __init__(self, in_channels: int, depths: Sequence[int], widths: Sequence[int],
                 stem_channels: int = 0, bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"QuickNet depths {list(depths)} and widths {list(widths)} must "
                             "be non-empty and of equal length")
        stem_channels = stem_channels or widths[0]
        self.stem = QuickNetStem(in_channels, stem_channels, bn_momentum, bn_eps)
        prev = stem_channels
        if prev != widths[0]:
            # f_s != f_e1: a 1x1 float projection so the first residual sum is defined.
            self.stem_proj = Conv2d(prev, widths[0], 1, bias=False,
                                    norm=_bn(widths[0], bn_momentum, bn_eps))
        self.scale_names: List[str] = []
        for i, (n, f) in enumerate(zip(depths, widths), start=1):
            scale = nn.Module()
            for j in range(1, int(n) + 1):
                scale.add_module(f"block{j}", QuickNetBlock(int(f), bn_momentum, bn_eps))
            nxt = int(widths[i]) if i < len(widths) else int(f)
            scale.add_module("transition", QuickNetTransition(int(f), nxt, bn_momentum, bn_eps))
            self.add_module(f"scale{i}", scale)
            self.scale_names.append(f"scale{i}")
            prev = nxt
        self._out_channels = prev
        self._out_stride = 4 * 2 ** len(depths)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.stem(x)
        if hasattr(self, "stem_proj"):
            x = self.stem_proj(x)
        for name in self.scale_names:
            for block in getattr(self, name).children():
                x = block(x)
        return {"enc": x}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"enc": ShapeSpec(channels=self._out_channels, stride=self._out_stride)}

    @property
    def size_divisibility(self) -> int:
        return self._out_stride


@BACKBONE_REGISTRY.register()
def build_quicknet_backbone(cfg, input_shape: ShapeSpec) -> QuickNet:
    """QuickNet encoder from ``MODEL.QUICKNET.*`` (paper 003 sec. 4)."""
    q = cfg.MODEL.QUICKNET
    return QuickNet(
        input_shape.channels, list(q.DEPTHS), list(q.WIDTHS), stem_channels=q.STEM_CHANNELS,
        bn_momentum=q.BN_MOMENTUM, bn_eps=q.BN_EPS,
    )
