"""Light-Head R-CNN (Li et al. 2017, arXiv:1711.07264) on detectron2's GeneralizedRCNN:
BiDet's efficient-model extension (paper 000 Table 4, appendix 001 B.2: ShuffleNetV2 x0.5).

Light-Head R-CNN keeps Faster R-CNN's RPN (detectron2's, on ``MODEL.RPN.IN_FEATURES``) and
replaces the heavy R-CNN head by

1. a **thin feature map** from a *large separable convolution* (sec. 3.3, Fig. 3): two
   branches on the backbone feature, ``k x 1`` conv (C_in -> C_mid) then ``1 x k`` conv
   (C_mid -> C_out), and ``1 x k`` then ``k x 1``, summed; k = 15, C_mid = 64 (setting "S",
   small backbones) or 256 ("L"), C_out = alpha * p * p with alpha = 10 (490 channels for
   p = 7);
2. **PS-RoIAlign** (position-sensitive RoIAlign, R-FCN's pooling with RoIAlign sampling):
   bin (i, j) of a RoI is read from its own group of alpha channels, giving an
   ``alpha x p x p`` RoI feature (torchvision's ``ps_roi_align``);
3. an R-CNN subnet of a **single fully-connected layer** with 2048 channels followed by the
   two sibling classification / regression layers: detectron2's ``FastRCNNConvFCHead`` with
   ``NUM_FC: 1, FC_DIM: 2048`` and ``FastRCNNOutputLayers`` (set in the configs).

Registered as the ROI head ``"LightHeadROIHeads"``: detectron2's ``StandardROIHeads`` (proposal
sampling, losses, inference) whose box pooler is :class:`LightHeadRoIWarp` (thin feature map +
PS-RoIAlign). The large separable conv lives in the pooler so that anything that runs
``roi_heads.box_pooler`` (training, inference, ``aqd_d2.analysis.analyze_model``) runs it too;
it is computed once per image batch, before the RoIs are pooled.

``"LightHeadBiDetROIHeads"`` is the same head with BiDet's predictor and sparse object priors
(``BiDetROIHeads``), for "Light-Head R-CNN + Tech. in BiDet / AutoBiDet" (paper 000 sec. 4.4,
Table 4) with the ``BiDetRCNN`` meta-architecture and the Gaussian feature prior.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import StandardROIHeads, build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes
from torch import nn
from torchvision.ops import ps_roi_align

from aqd_d2.modeling.bidet.roi_heads import BiDetFastRCNNOutputLayers, BiDetROIHeads

__all__ = ["LargeSeparableConv", "PSRoIAlign", "LightHeadRoIWarp", "LightHeadROIHeads",
           "LightHeadBiDetROIHeads", "light_head_box_parts"]


class LargeSeparableConv(nn.Module):
    """Light-Head R-CNN's large separable convolution (sec. 3.3, Fig. 3).

    ``y = conv_{1xk}(conv_{kx1}(x)) + conv_{kx1}(conv_{1xk}(x))``, then ReLU if ``relu``.

    Args:
        in_channels: C_in.
        mid_channels: C_mid (64 setting S, 256 setting L).
        out_channels: C_out (alpha * p * p).
        kernel_size: k (odd; 15 in the paper).
        relu: apply ReLU to the sum.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 kernel_size: int = 15, relu: bool = True):
        super().__init__()
        k, pad = int(kernel_size), int(kernel_size) // 2
        self.col_conv = Conv2d(in_channels, mid_channels, (k, 1), padding=(pad, 0))
        self.col_row_conv = Conv2d(mid_channels, out_channels, (1, k), padding=(0, pad))
        self.row_conv = Conv2d(in_channels, mid_channels, (1, k), padding=(0, pad))
        self.row_col_conv = Conv2d(mid_channels, out_channels, (k, 1), padding=(pad, 0))
        self.relu = bool(relu)
        for m in (self.col_conv, self.col_row_conv, self.row_conv, self.row_col_conv):
            weight_init.c2_msra_fill(m)  # detectron2's conv-head init (zero bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        y = self.col_row_conv(self.col_conv(x)) + self.row_col_conv(self.row_conv(x))
        return F.relu(y) if self.relu else y


class PSRoIAlign(nn.Module):
    """Position-sensitive RoIAlign over one feature map (torchvision ``ps_roi_align``).

    Args:
        output_size: p (bins per side).
        spatial_scale: 1 / stride of the feature map.
        sampling_ratio: samples per bin side; 0 = adaptive (detectron2's convention, passed to
            torchvision as -1).
    """

    def __init__(self, output_size: int, spatial_scale: float, sampling_ratio: int = 0):
        super().__init__()
        self.output_size = int(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio) if sampling_ratio > 0 else -1

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Pool ``rois`` (R, 5) = (batch index, x0, y0, x1, y1) in image pixels from ``x``
        (N, alpha * p * p, H, W); returns (R, alpha, p, p)."""
        p = self.output_size
        if x.shape[1] % (p * p):
            raise ValueError(f"PS-RoIAlign needs channels divisible by p*p = {p * p}, got {x.shape[1]}")
        return ps_roi_align(x, rois.to(x.dtype), p, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}")


class LightHeadRoIWarp(nn.Module):
    """The box pooler of :class:`LightHeadROIHeads`: thin feature map + PS-RoIAlign.

    Called like detectron2's ``ROIPooler``: ``warp(features, box_lists)``.

    Args:
        thin_feature: module making the thin (alpha * p * p channel) feature map.
        ps_roi_align: the :class:`PSRoIAlign`.
    """

    def __init__(self, thin_feature: nn.Module, ps_roi_align: PSRoIAlign):
        super().__init__()
        self.thin_feature = thin_feature
        self.ps_roi_align = ps_roi_align

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """``x``: one (N, C_in, H, W) feature map in a list; ``box_lists``: N Boxes in image
        pixels. Returns (R, alpha, p, p) with R the total number of boxes."""
        if len(x) != 1:
            raise ValueError(f"Light-Head R-CNN pools from one feature map "
                             f"(MODEL.ROI_HEADS.IN_FEATURES), got {len(x)}")
        return self.ps_roi_align(self.thin_feature(x[0]), convert_boxes_to_pooler_format(box_lists))


def light_head_box_parts(cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
    """The Light-Head R-CNN box parts (``box_in_features``, ``box_pooler``, ``box_head``) of
    ``StandardROIHeads._init_box_head``'s dict, without the predictor.

    Raises:
        ValueError: naming MODEL.ROI_HEADS.IN_FEATURES unless it holds exactly one feature, or
            MODEL.MASK_ON / KEYPOINT_ON when set.
    """
    in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    if len(in_features) != 1:
        raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES = {in_features}: Light-Head R-CNN "
                         "takes exactly one feature map")
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ValueError("Light-Head R-CNN ROI heads have a box head only: set MODEL.MASK_ON "
                         "and MODEL.KEYPOINT_ON to False")
    shape = input_shape[in_features[0]]
    lh = cfg.MODEL.LIGHT_HEAD
    p = int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION)
    alpha = int(lh.ALPHA)
    warp = LightHeadRoIWarp(
        LargeSeparableConv(shape.channels, int(lh.MID_CHANNELS), alpha * p * p,
                           int(lh.KERNEL_SIZE), bool(lh.RELU)),
        PSRoIAlign(p, 1.0 / shape.stride, int(cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO)),
    )
    box_head = build_box_head(cfg, ShapeSpec(channels=alpha, height=p, width=p))
    return {"box_in_features": in_features, "box_pooler": warp, "box_head": box_head}


@ROI_HEADS_REGISTRY.register()
class LightHeadROIHeads(StandardROIHeads):
    """Light-Head R-CNN's R-CNN part (see module docstring); box head only.

    Config: ``MODEL.ROI_HEADS.IN_FEATURES`` (one feature), ``MODEL.LIGHT_HEAD.{KERNEL_SIZE,
    MID_CHANNELS, ALPHA, RELU}``, ``MODEL.ROI_BOX_HEAD.{POOLER_RESOLUTION (p),
    POOLER_SAMPLING_RATIO, NAME, NUM_FC, FC_DIM}``.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = light_head_box_parts(cfg, input_shape)
        ret["box_predictor"] = FastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class LightHeadBiDetROIHeads(BiDetROIHeads):
    """Light-Head R-CNN's R-CNN part with BiDet's objective (paper 000 Table 4, "Light-Head
    R-CNN + Tech. in BiDet / AutoBiDet"): :class:`LightHeadROIHeads`' thin feature map,
    PS-RoIAlign and FC, with ``BiDetROIHeads``' predictor (mean + log-variance box branches,
    beta-weighted class / location information terms) and sparse object priors. Used with the
    ``BiDetRCNN`` meta-architecture and ``MODEL.BIDET.FEATURE_PRIOR: "gaussian"`` (the prior
    of efficient models, appendix 001 B.2).
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = light_head_box_parts(cfg, input_shape)
        ret["box_predictor"] = BiDetFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
