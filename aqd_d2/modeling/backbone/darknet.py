"""Backbones of the binary-weight YOLOv2 (paper 004, Tables I-II), registered as
``"build_darknet19_backbone"`` and ``"build_mobilenet_yolo_backbone"``.

Every conv is ``Conv2d(bias=False) + BN + leaky ReLU`` (``MODEL.DARKNET.NEGATIVE_SLOPE``) and
is named as in the paper's tables, so stage groups and knowledge-transfer layers are regexes
of those names (e.g. ``backbone\\.conv5_.*``). Channel counts are multiplied by
``MODEL.DARKNET.WIDTH_MULT`` (1.0 = the tables). Both return ``{"conv5": stride 16 (the
passthrough source), "conv6": stride 32}``; the detection layers Conv7_1, Conv7_2, the
passthrough/reorg, Conv8_1 and Pred belong to the ``YOLOv2`` meta-architecture.

DarkNet-19 (Table I; the standard DarkNet-19 of YOLOv2, whose Conv6 widths 512/1024 our copy
of the table prints garbled): conv1 3x3x32, pool, conv2 3x3x64, pool, conv3_1..3 (128, 64,
128; 3x3 / 1x1 / 3x3), pool, conv4_1..3 (256, 128, 256), pool, conv5_1..5 (512, 256, 512, 256,
512), [conv5], pool, conv6_1..5 (1024, 512, 1024, 512, 1024) [conv6].

MobileNet (Table II; MobileNet v1, Howard et al. 2017): conv1 3x3x32 stride 2, then depthwise
3x3 ``*_dw`` + pointwise 1x1 ``*_sep`` pairs conv2_1 (64), conv2_2 (128, s2), conv3_1 (128),
conv3_2 (256, s2), conv4_1 (256), conv4_2 (512, s2), conv5_1..conv5_5 (512) [conv5],
conv5_6 (1024, s2), conv6 (1024) [conv6]. Table II prints Conv6_sep as 3x3; MobileNet's
pointwise convs are 1x1, which we keep.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["DarkNet19", "MobileNetYOLO", "conv_bn_leaky", "build_darknet19_backbone",
           "build_mobilenet_yolo_backbone"]


def conv_bn_leaky(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                  negative_slope: float = 0.1) -> Conv2d:
    """k x k conv (same padding, no bias) -> BN -> leaky ReLU, as one detectron2 Conv2d."""
    return Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False,
                  norm=nn.BatchNorm2d(cout),
                  activation=functools.partial(F.leaky_relu, negative_slope=negative_slope))


def _w(c: int, mult: float) -> int:
    return max(8, int(round(c * mult)))


class _SequentialBackbone(Backbone):
    """Runs its layers in order; ``pool_after`` names layers followed by 2x2 max-pool and
    ``outputs`` maps feature names to the layer producing them."""

    def __init__(self):
        super().__init__()
        self._order: List[str] = []
        self._pool_after: set = set()
        self._outputs: Dict[str, str] = {}
        self._specs: Dict[str, ShapeSpec] = {}

    def _add(self, name: str, layer: nn.Module, pool: bool = False) -> None:
        self.add_module(name, layer)
        self._order.append(name)
        if pool:
            self._pool_after.add(name)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        by_layer = {v: k for k, v in self._outputs.items()}
        for name in self._order:
            x = getattr(self, name)(x)
            if name in by_layer:
                out[by_layer[name]] = x
            if name in self._pool_after:
                x = F.max_pool2d(x, 2, 2)
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._specs)

    @property
    def size_divisibility(self) -> int:
        return 32


class DarkNet19(_SequentialBackbone):
    """DarkNet-19 feature extractor (see module doc)."""

    # (name, out channels, kernel, max-pool after)
    LAYERS: Tuple[Tuple[str, int, int, bool], ...] = (
        ("conv1", 32, 3, True), ("conv2", 64, 3, True),
        ("conv3_1", 128, 3, False), ("conv3_2", 64, 1, False), ("conv3_3", 128, 3, True),
        ("conv4_1", 256, 3, False), ("conv4_2", 128, 1, False), ("conv4_3", 256, 3, True),
        ("conv5_1", 512, 3, False), ("conv5_2", 256, 1, False), ("conv5_3", 512, 3, False),
        ("conv5_4", 256, 1, False), ("conv5_5", 512, 3, True),
        ("conv6_1", 1024, 3, False), ("conv6_2", 512, 1, False), ("conv6_3", 1024, 3, False),
        ("conv6_4", 512, 1, False), ("conv6_5", 1024, 3, False),
    )

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, negative_slope: float = 0.1):
        super().__init__()
        c = in_channels
        for name, out, k, pool in self.LAYERS:
            out = _w(out, width_mult)
            self._add(name, conv_bn_leaky(c, out, k, negative_slope=negative_slope), pool)
            c = out
        self._outputs = {"conv5": "conv5_5", "conv6": "conv6_5"}
        self._specs = {"conv5": ShapeSpec(channels=_w(512, width_mult), stride=16),
                       "conv6": ShapeSpec(channels=c, stride=32)}


class MobileNetYOLO(_SequentialBackbone):
    """MobileNet v1 feature extractor (see module doc)."""

    # (name, out channels of the pointwise conv, stride of the depthwise conv)
    LAYERS: Tuple[Tuple[str, int, int], ...] = (
        ("conv2_1", 64, 1), ("conv2_2", 128, 2), ("conv3_1", 128, 1), ("conv3_2", 256, 2),
        ("conv4_1", 256, 1), ("conv4_2", 512, 2), ("conv5_1", 512, 1), ("conv5_2", 512, 1),
        ("conv5_3", 512, 1), ("conv5_4", 512, 1), ("conv5_5", 512, 1), ("conv5_6", 1024, 2),
        ("conv6", 1024, 1),
    )

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, negative_slope: float = 0.1):
        super().__init__()
        c = _w(32, width_mult)
        self._add("conv1", conv_bn_leaky(in_channels, c, 3, stride=2, negative_slope=negative_slope))
        for name, out, stride in self.LAYERS:
            out = _w(out, width_mult)
            self._add(f"{name}_dw", conv_bn_leaky(c, c, 3, stride, groups=c,
                                                  negative_slope=negative_slope))
            self._add(f"{name}_sep", conv_bn_leaky(c, out, 1, negative_slope=negative_slope))
            c = out
        self._outputs = {"conv5": "conv5_5_sep", "conv6": "conv6_sep"}
        self._specs = {"conv5": ShapeSpec(channels=_w(512, width_mult), stride=16),
                       "conv6": ShapeSpec(channels=c, stride=32)}


@BACKBONE_REGISTRY.register()
def build_darknet19_backbone(cfg, input_shape: ShapeSpec) -> DarkNet19:
    """DarkNet-19 from ``MODEL.DARKNET.*``."""
    d = cfg.MODEL.DARKNET
    return DarkNet19(input_shape.channels, d.WIDTH_MULT, d.NEGATIVE_SLOPE)


@BACKBONE_REGISTRY.register()
def build_mobilenet_yolo_backbone(cfg, input_shape: ShapeSpec) -> MobileNetYOLO:
    """MobileNet v1 (YOLO variant of paper 004) from ``MODEL.DARKNET.*``."""
    d = cfg.MODEL.DARKNET
    return MobileNetYOLO(input_shape.channels, d.WIDTH_MULT, d.NEGATIVE_SLOPE)
