"""ResNet + FPN (P3-P7) with BN and ReLU after every FPN conv, for AQD's detectors.

AQD sec. 4.3: "To stabilize the optimization, each convolution layer is followed by BN and
ReLU" (their FPN norm "SyncBN-ReLU"). With ReLU, every FPN output is non-negative, which is
what the unsigned activation quantizers of the next layers (FPN output convs, P7, heads)
expect. detectron2's FPN has ``norm`` but no activation, and its ``LastLevelP6P7`` (P6/P7)
has neither, so :func:`build_aqd_resnet_fpn_backbone` reuses detectron2's ``FPN`` and ResNet
builder unchanged and only

* sets the ``activation`` of each lateral and output ``detectron2.layers.Conv2d`` to ReLU when
  ``MODEL.FPN.RELU`` (that class applies conv -> norm -> activation);
* uses :class:`LastLevelP6P7WithNorm`, a LastLevelP6P7 whose P6/P7 convs carry
  ``MODEL.FPN.NORM`` and the optional ReLU, fed by ``MODEL.FPN.TOP_BLOCK_IN_FEATURE``
  ("res5" as detectron2's RetinaNet, "p5" as the FCOS paper).

Parameter names are detectron2's (``fpn_lateral3``, ``fpn_output3``, ``top_block.p6`` ...), so
with ``NORM ""``, ``RELU False`` and ``TOP_BLOCK_IN_FEATURE "res5"`` the module is
``build_retinanet_resnet_fpn_backbone``'s. ResNet-18/34 use BasicBlock via
``MODEL.RESNETS.DEPTH`` (with ``RES2_OUT_CHANNELS: 64``), as detectron2's builder does.
"""
from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["LastLevelP6P7WithNorm", "build_aqd_resnet_fpn_backbone"]


class LastLevelP6P7WithNorm(LastLevelP6P7):
    """detectron2's P6/P7 block with a norm (and optional ReLU) after each of its two convs.

    ``forward`` is detectron2's: ``p6 = conv6(x)``, ``p7 = conv7(relu(p6))``.

    Args:
        in_channels: channels of the input feature (res5 or p5).
        out_channels: FPN channels.
        in_feature: "res5" or "p5".
        norm: a ``detectron2.layers.get_norm`` name ("" for none).
        relu: apply ReLU after the norm of P6 and P7 (AQD).
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5",
                 norm: str = "", relu: bool = False):
        super().__init__(in_channels, out_channels, in_feature)
        for name, cin in (("p6", in_channels), ("p7", out_channels)):
            conv = Conv2d(
                cin, out_channels, kernel_size=3, stride=2, padding=1, bias=norm == "",
                norm=get_norm(norm, out_channels), activation=F.relu if relu else None,
            )
            weight_init.c2_xavier_fill(conv)
            setattr(self, name, conv)


@BACKBONE_REGISTRY.register()
def build_aqd_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet (``MODEL.RESNETS.*``) + FPN over ``MODEL.FPN.IN_FEATURES`` + P6/P7.

    Reads ``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE, RELU, TOP_BLOCK_IN_FEATURE}``.

    Args:
        cfg: a config with aqd_d2's keys.
        input_shape: the image ShapeSpec.
    Returns:
        detectron2 ``FPN`` backbone producing p3..p7 (for res3..res5 inputs).
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    fpn_cfg = cfg.MODEL.FPN
    out_channels = fpn_cfg.OUT_CHANNELS
    top_in = fpn_cfg.TOP_BLOCK_IN_FEATURE
    if top_in == "p5":
        top_channels = out_channels
    else:
        top_channels = bottom_up.output_shape()[top_in].channels
    backbone = FPN(
        bottom_up=bottom_up,
        in_features=fpn_cfg.IN_FEATURES,
        out_channels=out_channels,
        norm=fpn_cfg.NORM,
        top_block=LastLevelP6P7WithNorm(top_channels, out_channels, top_in, fpn_cfg.NORM, fpn_cfg.RELU),
        fuse_type=fpn_cfg.FUSE_TYPE,
    )
    if fpn_cfg.RELU:
        for conv in list(backbone.lateral_convs) + list(backbone.output_convs):
            conv.activation = F.relu
    return backbone
