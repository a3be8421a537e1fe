"""Binary Faster R-CNN R18 parts, pruning (SFP / PFEC) and Light-Head R-CNN (papers 000, 001).

``MODEL.BIREAL.*``: the Bi-Real-Net style ResNet blocks
(:mod:`aqd_d2.modeling.backbone.bireal_resnet`) of the binary Faster R-CNN ResNet-18 of
paper 000 (Tables 2-3). Depth, widths, norm and output features come from detectron2's own
``MODEL.RESNETS.*`` keys.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import check_choice

#: MODEL.BIREAL.SHORTCUT choices
BIREAL_SHORTCUTS = ("every_conv", "every_block")
#: MODEL.BIREAL.ACTIVATION choices
BIREAL_ACTIVATIONS = ("none", "hardtanh", "prelu")
#: MODEL.BIREAL.DOWNSAMPLE choices
BIREAL_DOWNSAMPLES = ("avgpool", "conv")


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""
    _C = cfg
    _C.MODEL.BIREAL = CN()
    # Real-valued shortcuts of build_bireal_resnet[_fpn]_backbone: "every_conv" (Bi-Real-Net,
    # Liu et al. 2018: an identity around EVERY 3x3 conv, the "(SC)" rows of paper 000 Tables
    # 2-3) or "every_block" (ResNet's one shortcut per two convs: the BNN / Xnor-Net rows).
    # Both keep BN after each conv and no ReLU in front of any conv.
    _C.MODEL.BIREAL.SHORTCUT = "every_conv"
    # Activation on each conv branch, after its BN and before the shortcut add: "none"
    # (Bi-Real-Net and BiDet's official code), "hardtanh", "prelu" (one slope per channel).
    # The residual stream itself never passes through it, so binary convs see both signs.
    _C.MODEL.BIREAL.ACTIVATION = "none"
    # Shortcut of a block that changes resolution or width: "avgpool" (Bi-Real-Net: 2x2
    # average pool, then 1x1 conv + BN at stride 1) or "conv" (ResNet: 1x1 stride-2 conv + BN).
    # The parameters are named "shortcut.*" either way (so ResNet checkpoints load).
    _C.MODEL.BIREAL.DOWNSAMPLE = "avgpool"
    # ReLU after the stem's conv + BN. Bi-Real-Net and BiDet's ResNet-18 have none: with it the
    # first binary conv of res2 would only see non-negative inputs (all +1 after sign).
    _C.MODEL.BIREAL.STEM_RELU = False
    # BiRealFCHead (MODEL.ROI_BOX_HEAD.NAME "BiRealFCHead", aqd_d2.modeling.box_head): the FC
    # box head for binary FC layers (detectron2's head feeds fc2 a ReLU output, all +1 after
    # sign). After each FC: FC_NORM ("BN" or ""), a real-valued identity shortcut where the
    # width is kept (FC_SHORTCUT), then FC_ACTIVATION ("none", "relu", "hardtanh", "prelu").
    _C.MODEL.ROI_BOX_HEAD.FC_NORM = "BN"
    _C.MODEL.ROI_BOX_HEAD.FC_ACTIVATION = "none"
    _C.MODEL.ROI_BOX_HEAD.FC_SHORTCUT = True


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
    if "FC_NORM" in cfg.MODEL.ROI_BOX_HEAD:
        from ..modeling.box_head import FC_ACTIVATIONS, FC_NORMS

        check_choice(cfg, "MODEL.ROI_BOX_HEAD.FC_NORM", FC_NORMS)
        check_choice(cfg, "MODEL.ROI_BOX_HEAD.FC_ACTIVATION", FC_ACTIVATIONS)
    if "BIREAL" not in cfg.MODEL:
        return
    check_choice(cfg, "MODEL.BIREAL.SHORTCUT", BIREAL_SHORTCUTS)
    check_choice(cfg, "MODEL.BIREAL.ACTIVATION", BIREAL_ACTIVATIONS)
    check_choice(cfg, "MODEL.BIREAL.DOWNSAMPLE", BIREAL_DOWNSAMPLES)
    check_choice(cfg, "MODEL.BIREAL.STEM_RELU", (True, False))
