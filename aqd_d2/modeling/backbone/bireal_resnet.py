"""Bi-Real-Net style ResNet-18/34 for binary detectors (Liu et al., ECCV 2018; papers 000/001).

Why not detectron2's ``BasicBlock`` for a binary ResNet: it ends every block (and the stem)
with ReLU, so the input of every conv is >= 0 and sign() (sign(0) = +1 here) turns it into
all +1: the binary convs see a constant. Bi-Real-Net (used by BiDet for its "(SC)" Faster
R-CNN ResNet-18, paper 000 Tables 2-3) instead keeps a real-valued residual stream:

* :class:`BiRealBasicBlock`: conv -> BN -> (optional activation) -> + shortcut, with an
  identity shortcut around EVERY 3x3 conv (``shortcut_mode="every_conv"``); the binary conv's
  input is the raw real-valued stream, never a ReLU output. ``"every_block"`` keeps ResNet's
  one shortcut per two convs with the same ReLU-free layout (paper 000's BNN / Xnor-Net rows,
  "without extra shortcut").
* downsampling shortcut: 2x2 average pool, then a 1x1 conv + BN at stride 1
  (``downsample="avgpool"``; Bi-Real-Net sec. 3.1 / BiDet's official ResNet), or ResNet's
  strided 1x1 conv (``"conv"``). The configs keep this 1x1 conv real-valued through
  ``MODEL.QUANT.OVERRIDES``: it is the only path that carries the real-valued stream across
  a stage boundary, it costs < 2% of the block's MACs, and Bi-Real-Net / BiDet keep it float.
* :class:`BiRealStem`: detectron2's ``BasicStem`` (7x7 conv + BN, 3x3 max-pool) without the
  ReLU (``STEM_RELU False``, as Bi-Real-Net and BiDet), so res2's first conv sees both signs.

Parameters are named as detectron2's BasicBlock / BasicStem (``conv1``, ``conv2``, ``shortcut``,
each ``detectron2.layers.Conv2d`` with ``.norm``), so a float ResNet-18 detectron2 checkpoint
(e.g. the float config's ``model_final.pth``) loads into this backbone unchanged. Stages are
built by detectron2's ``ResNet.make_stage(block_class=BiRealBasicBlock)`` and wrapped in
detectron2's ``ResNet`` / ``FPN``; the blocks are float, precision comes from MODEL.QUANT.
"""
from __future__ import annotations

from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem
from torch import nn

from aqd_d2.config import ConfigError
from aqd_d2.config.rcnn import BIREAL_ACTIVATIONS, BIREAL_DOWNSAMPLES, BIREAL_SHORTCUTS
from aqd_d2.config.rcnn import validate as validate_bireal_config

__all__ = ["BiRealBasicBlock", "BiRealStem", "build_bireal_resnet_backbone",
           "build_bireal_resnet_fpn_backbone", "BLOCKS_PER_STAGE"]

#: blocks per stage (res2..res5) of the supported depths
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _activation(name: str, channels: int) -> Optional[nn.Module]:
    """The branch activation module for MODEL.BIREAL.ACTIVATION ``name`` (None for "none")."""
    if name == "none":
        return None
    if name == "hardtanh":
        return nn.Hardtanh()
    if name == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"activation {name!r} is not one of {list(BIREAL_ACTIVATIONS)}")


class BiRealBasicBlock(CNNBlockBase):
    """Two 3x3 conv + BN units with a real-valued shortcut around each (Bi-Real-Net) or around
    both (ResNet layout); no ReLU anywhere, so binarized convs get inputs of both signs.

    ``shortcut_mode="every_conv"``: ``y1 = a(BN(conv1(x))) + s(x)``, ``y2 = a(BN(conv2(y1))) + y1``.
    ``shortcut_mode="every_block"``: ``y1 = a(BN(conv1(x)))``, ``y2 = a(BN(conv2(y1))) + s(x)``.
    ``a`` is the optional branch activation, ``s`` the identity or the downsampling shortcut.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        stride: stride of conv1 (and of the shortcut).
        norm: a ``detectron2.layers.get_norm`` name ("BN", "SyncBN", "FrozenBN", ...).
        shortcut_mode: "every_conv" or "every_block".
        activation: "none", "hardtanh" or "prelu" (per-channel slope), on each conv branch.
        downsample: "avgpool" (avg-pool, then 1x1 conv + BN at stride 1) or "conv" (1x1
            conv + BN at ``stride``); used when ``stride > 1`` or ``C_in != C_out``.
    Shapes:
        (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "BN",
                 shortcut_mode: str = "every_conv", activation: str = "none",
                 downsample: str = "avgpool"):
        super().__init__(in_channels, out_channels, stride)
        if shortcut_mode not in BIREAL_SHORTCUTS:
            raise ValueError(f"shortcut_mode {shortcut_mode!r} is not one of {list(BIREAL_SHORTCUTS)}")
        if downsample not in BIREAL_DOWNSAMPLES:
            raise ValueError(f"downsample {downsample!r} is not one of {list(BIREAL_DOWNSAMPLES)}")
        self.shortcut_mode = shortcut_mode
        self.avgpool_shortcut = downsample == "avgpool"
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1,
                stride=1 if self.avgpool_shortcut else stride, bias=False,
                norm=get_norm(norm, out_channels),
            )
            weight_init.c2_msra_fill(self.shortcut)
        else:
            self.shortcut = None
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                            bias=False, norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1,
                            bias=False, norm=get_norm(norm, out_channels))
        for conv in (self.conv1, self.conv2):
            weight_init.c2_msra_fill(conv)
        self.act1 = _activation(activation, out_channels)
        self.act2 = _activation(activation, out_channels)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, or (avg-pool +) 1x1 conv + BN; (N, C_in, H, W) -> (N, C_out, H', W')."""
        if self.shortcut is None:
            return x
        if self.avgpool_shortcut and self.stride > 1:
            # ceil_mode: same output size as the stride-s 3x3 conv (pad 1) on odd sizes
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C_in, H, W). Returns: (N, C_out, H', W')."""
        y = self.conv1(x)  # conv -> BN (detectron2 Conv2d applies its norm)
        if self.act1 is not None:
            y = self.act1(y)
        if self.shortcut_mode == "every_conv":
            y = y + self._shortcut(x)
        z = self.conv2(y)
        if self.act2 is not None:
            z = self.act2(z)
        return z + (y if self.shortcut_mode == "every_conv" else self._shortcut(x))


class BiRealStem(BasicStem):
    """detectron2's ``BasicStem`` (7x7/2 conv + norm, 3x3/2 max-pool) with the ReLU optional.

    Args:
        in_channels: image channels.
        out_channels: stem channels.
        norm: norm after the conv.
        relu: apply ReLU after the norm (detectron2's stem); False for binary backbones.
    Shapes:
        (N, C_in, H, W) -> (N, C_out, H / 4, W / 4) (rounded up).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN", relu: bool = False):
        super().__init__(in_channels, out_channels, norm)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.relu:
            x = F.relu(x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


@BACKBONE_REGISTRY.register()
def build_bireal_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2 ``ResNet`` of :class:`BiRealStem` and :class:`BiRealBasicBlock` stages.

    Reads ``MODEL.RESNETS.{DEPTH (18 or 34), NORM, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
    OUT_FEATURES}``, ``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.BIREAL.*``. Stage ``i`` (res2..res5)
    has ``RES2_OUT_CHANNELS * 2**i`` channels and stride 4, 8, 16, 32 as ResNet-18's; only the
    stages up to the last one in OUT_FEATURES are built.

    Args:
        cfg: a config with aqd_d2's keys.
        input_shape: the image ShapeSpec (its channels).
    Returns:
        the ResNet backbone (features ``OUT_FEATURES``).
    Raises:
        ConfigError: unsupported depth, dilation or deformable conv.
    """
    validate_bireal_config(cfg)
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ConfigError(f"MODEL.RESNETS.DEPTH = {r.DEPTH} with build_bireal_resnet_backbone: "
                          f"choose one of {sorted(BLOCKS_PER_STAGE)} (basic-block ResNets)")
    if r.RES5_DILATION != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ConfigError("build_bireal_resnet_backbone supports neither MODEL.RESNETS.RES5_DILATION "
                          "!= 1 nor MODEL.RESNETS.DEFORM_ON_PER_STAGE: set them to 1 / all False")
    b = cfg.MODEL.BIREAL
    stem = BiRealStem(input_shape.channels, r.STEM_OUT_CHANNELS, r.NORM, relu=b.STEM_RELU)
    names = ["res2", "res3", "res4", "res5"]
    bad = [f for f in r.OUT_FEATURES if f not in names + ["stem"]]
    if bad:
        raise ConfigError(f"MODEL.RESNETS.OUT_FEATURES = {list(r.OUT_FEATURES)}: {bad} unknown; "
                          f"choose from {['stem'] + names}")
    last = max([names.index(f) for f in r.OUT_FEATURES if f in names], default=0)
    stages, in_ch = [], r.STEM_OUT_CHANNELS
    for i, n in enumerate(BLOCKS_PER_STAGE[r.DEPTH][: last + 1]):
        out_ch = r.RES2_OUT_CHANNELS * 2 ** i
        stages.append(ResNet.make_stage(
            BiRealBasicBlock, n, in_channels=in_ch, out_channels=out_ch,
            stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1), norm=r.NORM,
            shortcut_mode=b.SHORTCUT, activation=b.ACTIVATION, downsample=b.DOWNSAMPLE,
        ))
        in_ch = out_ch
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_bireal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``FPN`` (with a max-pooled P6, as ``build_resnet_fpn_backbone``) on
    :func:`build_bireal_resnet_backbone`.

    Reads ``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE}``.

    Args:
        cfg: a config with aqd_d2's keys.
        input_shape: the image ShapeSpec.
    Returns:
        the FPN backbone (p2..p6 for res2..res5 inputs); its ``bottom_up`` is the Bi-Real ResNet.
    """
    bottom_up = build_bireal_resnet_backbone(cfg, input_shape)
    f = cfg.MODEL.FPN
    return FPN(bottom_up=bottom_up, in_features=f.IN_FEATURES, out_channels=f.OUT_CHANNELS,
               norm=f.NORM, top_block=LastLevelMaxPool(), fuse_type=f.FUSE_TYPE)
