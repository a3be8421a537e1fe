"""The "C4" ROI head of ResNet-18/34 Faster R-CNN: res5 of basic blocks on each pooled region.

detectron2's ``Res5ROIHeads`` builds the C4 head (Ren et al.; He et al., ResNet paper appendix A)
for bottleneck ResNets only: its ``_build_res5_block`` makes ``BottleneckBlock`` stages. The
BiDet / AutoBiDet Faster R-CNN (paper 000 Table 2-3, ResNet-18 at 600x1000) is a C4 model of
*basic* blocks: res2-res4 as the backbone (stride 16, 256 channels), RoIAlign 7x7 on res4,
ResNet-18's res5 (two basic blocks, 512 channels, stride 2) on every region, global average
pooling, then the class / box predictor (BiDet's official ``bidet_resnet.py``: ``RCNN_base`` =
conv1..layer3, ``RCNN_top`` = layer4, ``.mean(3).mean(2)``).

:class:`Res5BasicBoxHead` is that per-region computation as a detectron2 ROI *box head*
(``MODEL.ROI_BOX_HEAD.NAME "Res5BasicBoxHead"``), so detectron2's ``StandardROIHeads`` with
one pooled feature (``MODEL.ROI_HEADS.IN_FEATURES ["res4"]``) is exactly the C4 pipeline of
``Res5ROIHeads`` (pooler -> res5 -> mean -> predictor; boxes only), and aqd_d2's
``BiDetROIHeads`` (a ``StandardROIHeads``: beta-weighted information terms, SOP) runs on it
unchanged. The stage is built by detectron2's ``ResNet.make_stage``:

* with detectron2's ``BasicBlock`` (float / TWN / DoReFa rows, whose backbone is detectron2's
  ``build_resnet_backbone``);
* with :class:`~aqd_d2.modeling.backbone.bireal_resnet.BiRealBasicBlock` and the
  ``MODEL.BIREAL.*`` layout (no ReLU in front of a binary conv, shortcut every block or every
  conv, avg-pool downsampling) when the backbone is ``build_bireal_resnet_backbone`` (binary
  rows), so res5 has the same block as res2-res4.

Parameter names are ``res5.<block>.conv1`` ..., so a detectron2 ResNet-18 checkpoint's
``res5.*`` weights (ImageNet, converted) load into it by detectron2's suffix matching, as they
do into ``Res5ROIHeads.res5``.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY
from torch import nn

from aqd_d2.config import ConfigError
from aqd_d2.modeling.backbone.bireal_resnet import BLOCKS_PER_STAGE, BiRealBasicBlock

__all__ = ["Res5BasicBoxHead", "RES5_BACKBONES", "build_res5_basic_stage"]

#: MODEL.BACKBONE.NAME -> the block of res5: the backbone's own block type
RES5_BACKBONES = {
    "build_resnet_backbone": "basic",
    "build_bireal_resnet_backbone": "bireal",
}


def build_res5_basic_stage(cfg, in_channels: int) -> nn.Sequential:
    """ResNet-18/34's res5 (``BLOCKS_PER_STAGE[depth][3]`` basic blocks, the first with
    stride 2, ``2 * in_channels`` outputs) by ``ResNet.make_stage``.

    Args:
        cfg: a config with aqd_d2's keys (MODEL.RESNETS.{DEPTH, NORM, RES2_OUT_CHANNELS},
            MODEL.BACKBONE.NAME, MODEL.BIREAL.*).
        in_channels: channels of the pooled feature (res4: ``RES2_OUT_CHANNELS * 4``).
    Returns:
        the stage as ``nn.Sequential`` (modules ``0``, ``1``, ...).
    Raises:
        ConfigError: depth not 18/34, a backbone whose block is unknown here, or channels that
            do not match res4.
    """
    r = cfg.MODEL.RESNETS
    name = cfg.MODEL.BACKBONE.NAME
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.NAME 'Res5BasicBoxHead' is the basic-block res5 of "
                          f"ResNet-18/34: MODEL.RESNETS.DEPTH = {r.DEPTH}; choose one of "
                          f"{sorted(BLOCKS_PER_STAGE)} (for ResNet-50+ use detectron2's "
                          "MODEL.ROI_HEADS.NAME 'Res5ROIHeads')")
    if name not in RES5_BACKBONES:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.NAME 'Res5BasicBoxHead' builds res5 with the "
                          f"backbone's block: MODEL.BACKBONE.NAME = {name!r} is not one of "
                          f"{sorted(RES5_BACKBONES)} (a C4 model: the backbone ends at res4)")
    if in_channels != r.RES2_OUT_CHANNELS * 4:
        raise ConfigError(f"Res5BasicBoxHead pools a {in_channels}-channel feature; res5 follows "
                          f"res4 ({r.RES2_OUT_CHANNELS * 4} channels = 4 x "
                          "MODEL.RESNETS.RES2_OUT_CHANNELS): set MODEL.ROI_HEADS.IN_FEATURES "
                          "['res4'] and MODEL.RESNETS.OUT_FEATURES ['res4']")
    n = BLOCKS_PER_STAGE[r.DEPTH][3]
    kwargs = dict(in_channels=in_channels, out_channels=2 * in_channels,
                  stride_per_block=[2] + [1] * (n - 1), norm=r.NORM)
    if RES5_BACKBONES[name] == "bireal":
        b = cfg.MODEL.BIREAL
        blocks = ResNet.make_stage(BiRealBasicBlock, n, shortcut_mode=b.SHORTCUT,
                                   activation=b.ACTIVATION, downsample=b.DOWNSAMPLE, **kwargs)
    else:
        blocks = ResNet.make_stage(BasicBlock, n, **kwargs)
    return nn.Sequential(*blocks)


@ROI_BOX_HEAD_REGISTRY.register()
class Res5BasicBoxHead(nn.Module):
    """Per-region res5 of basic blocks, then global average pooling (module docstring).

    Args:
        input_shape: the pooled region feature (channels = res4's; height = width =
            MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION).
        res5: the stage (:func:`build_res5_basic_stage`).
        out_channels: its output channels.
    Shapes:
        (R, C, P, P) -> (R, 2C).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, res5: nn.Module, out_channels: int):
        super().__init__()
        self.res5 = res5
        self._out_channels = int(out_channels)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        res5 = build_res5_basic_stage(cfg, input_shape.channels)
        return {"input_shape": input_shape, "res5": res5, "out_channels": 2 * input_shape.channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) pooled features -> (R, 2C) box features (res5, then the spatial mean,
        as ``Res5ROIHeads`` and BiDet's ``_head_to_tail``)."""
        return self.res5(x).mean(dim=(2, 3))

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._out_channels)
