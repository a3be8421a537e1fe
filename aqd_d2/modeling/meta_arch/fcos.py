"""FCOS (Tian et al., ICCV 2019) registered as ``"FCOS"``, configurable from ``MODEL.FCOS.*``.

detectron2 0.6 ships ``FCOS`` / ``FCOSHead`` only as keyword-only classes for LazyConfig, with
fixed choices. This subclass adds ``@configurable`` + ``from_config`` and the FCOS paper's
options as config keys (see :func:`aqd_d2.config.detectors`):

* per-level size ranges ``MODEL.FCOS.SIZES_OF_INTEREST`` (paper sec. 3.2: level i regresses
  locations with ``m_{i-1} <= max(l*, t*, r*, b*) <= m_i``; detectron2 hard-codes 4x..8x the
  stride, which equals the default [64, 128, 256, 512] for strides 8..128);
* ``CENTER_SAMPLING_RADIUS``: a location is positive only within ``radius * stride`` of the
  box center (FCOS improvements / AdelaiDet; 1.5 by default), 0 turns center sampling off
  (detectron2 always applies it: radius 0 there makes every location negative);
* ``BOX_LOSS_TYPE``: "iou" (the paper's UnitBox loss ``-ln IoU``), "giou" (detectron2 and
  AdelaiDet default), "diou", "ciou", "smooth_l1" (on stride-normalized l, t, r, b);
* ``PER_LEVEL_SCALE``: the paper's learnable scalar ``exp(s_i x)`` per level, as in AdelaiDet
  a plain ``s_i * x`` (regression targets are normalized by the stride and decoded through a
  ReLU by detectron2's ``Box2BoxTransformLinear``). detectron2 omits it ("no benefit after
  normalizing by stride"); AQD's FCOS (AdelaiDet based) has it, hence the default True;
* ``CENTERNESS_ON_REG``: centerness branch on the regression tower (improved FCOS,
  detectron2, AdelaiDet) or on the classification tower (the original paper);
* focal loss (``FOCAL_LOSS_ALPHA/GAMMA``), ``PRIOR_PROB``, ``NUM_CONVS``, ``HEAD_NORM``
  (:mod:`.head_norm`, multi-level BN for AQD), test-time ``SCORE_THRESH_TEST``,
  ``TOPK_CANDIDATES_TEST``, ``NMS_THRESH_TEST``.

Loss normalization is detectron2's (an EMA of the number of positive locations; the paper
divides by the positives of the batch). Inference is detectron2's (score =
``sqrt(sigmoid(cls) * sigmoid(ctr))``, per-class NMS).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.fcos import FCOS as D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead as D2FCOSHead
from detectron2.structures import Boxes, Instances, pairwise_point_box_distance
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn

from .head_norm import HeadNorm, LevelNormHeadMixin

__all__ = ["FCOS", "AQDFCOSHead", "Scale", "BOX_LOSS_TYPES", "aligned_iou"]

BOX_LOSS_TYPES = ("iou", "giou", "diou", "ciou", "smooth_l1")


class Scale(nn.Module):
    """Learnable scalar multiplier (FCOS per-level scale). Parameter ``scale``, shape ()."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class AQDFCOSHead(LevelNormHeadMixin, D2FCOSHead):
    """detectron2's FCOSHead + head norm choice, per-level scale, centerness placement.

    Args:
        input_shape: one ShapeSpec per level.
        conv_dims: channels of the tower convs (their number = ``MODEL.FCOS.NUM_CONVS``).
        num_classes, prior_prob: as for detectron2's head.
        norm: a :data:`~.head_norm.HEAD_NORMS` name.
        per_level_scale: multiply each level's box regression by a learnable scalar.
        centerness_on_reg: centerness from the regression tower (else classification tower).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        conv_dims: List[int],
        num_classes: int,
        norm: str = "GN",
        prior_prob: float = 0.01,
        per_level_scale: bool = True,
        centerness_on_reg: bool = True,
    ):
        num_levels = len(input_shape)
        super().__init__(
            input_shape=input_shape,
            conv_dims=conv_dims,
            num_classes=num_classes,
            norm=HeadNorm(norm, num_levels),
            prior_prob=prior_prob,
        )
        self.norm_name = norm
        self.centerness_on_reg = centerness_on_reg
        self.scales = nn.ModuleList([Scale() for _ in range(num_levels)]) if per_level_scale else None

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        c = cfg.MODEL.FCOS
        return {
            "input_shape": input_shape,
            "conv_dims": [input_shape[0].channels] * c.NUM_CONVS,
            "num_classes": c.NUM_CLASSES,
            "norm": c.HEAD_NORM,
            "prior_prob": c.PRIOR_PROB,
            "per_level_scale": c.PER_LEVEL_SCALE,
            "centerness_on_reg": c.CENTERNESS_ON_REG,
        }

    def forward(self, features: List[Tensor]):
        """
        Args:
            features: L tensors (N, C, Hi, Wi), P3 first.
        Returns:
            logits (L x (N, K, Hi, Wi)), bbox_reg (L x (N, 4, Hi, Wi)), ctrness (L x (N, 1, Hi, Wi)).
        """
        if len(features) != self._num_features:
            raise ValueError(f"head built for {self._num_features} levels, got {len(features)}")
        logits, bbox_reg, ctrness = [], [], []
        with self.level_pass():
            for level, feature in enumerate(features):
                cls_feature = self.tower(self.cls_subnet, feature, level)
                box_feature = self.tower(self.bbox_subnet, feature, level)
                logits.append(self.cls_score(cls_feature))
                reg = self.bbox_pred(box_feature)
                bbox_reg.append(self.scales[level](reg) if self.scales is not None else reg)
                ctrness.append(self.ctrness(box_feature if self.centerness_on_reg else cls_feature))
        return logits, bbox_reg, ctrness


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of box pairs ``a[i]``, ``b[i]`` (XYXY). Args: a, b: (P, 4). Returns: (P,)."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


@META_ARCH_REGISTRY.register()
class FCOS(D2FCOS):
    """detectron2's FCOS with ``from_config`` (``MODEL.FCOS.*``) and the options listed in the
    module docstring.

    Args (besides detectron2 FCOS's keyword arguments):
        sizes_of_interest: L-1 increasing boundaries m_1..m_{L-1} in pixels; level i takes
            locations whose largest regression target is in [m_{i-1}, m_i] (m_0 = 0,
            m_L = inf).
        box_reg_loss_type: one of :data:`BOX_LOSS_TYPES`.
        smooth_l1_beta: beta of the smooth L1 box loss.
    """

    @configurable
    def __init__(
        self,
        *,
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        box_reg_loss_type: str = "giou",
        smooth_l1_beta: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(sizes_of_interest) != len(self.head_in_features) - 1:
            raise ValueError(
                f"sizes_of_interest needs {len(self.head_in_features) - 1} boundaries for levels "
                f"{list(self.head_in_features)}, got {list(sizes_of_interest)}"
            )
        if box_reg_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(f"box_reg_loss_type {box_reg_loss_type!r} not in {BOX_LOSS_TYPES}")
        self.sizes_of_interest = tuple(float(s) for s in sizes_of_interest)
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.FCOS.IN_FEATURES {missing} not produced by the backbone ({sorted(shapes)})")
        return {
            "backbone": backbone,
            "head": AQDFCOSHead(cfg, [shapes[f] for f in c.IN_FEATURES]),
            "head_in_features": list(c.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "sizes_of_interest": list(c.SIZES_OF_INTEREST),
            "box_reg_loss_type": c.BOX_LOSS_TYPE,
            "smooth_l1_beta": c.SMOOTH_L1_BETA,
        }

    # ---- training targets ------------------------------------------------------------------
    def _level_ranges(self, anchors: List[Boxes]) -> Tensor:
        """(R, 2) [lower, upper] size range of every location's level."""
        bounds = (0.0,) + self.sizes_of_interest + (float("inf"),)
        ref = anchors[0].tensor
        return torch.cat([
            ref.new_tensor([bounds[i], bounds[i + 1]]).expand(len(a), 2) for i, a in enumerate(anchors)
        ])

    @torch.no_grad()
    def match_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]) -> List[Tensor]:
        """Assign each location to a gt box (FCOS sec. 3.1-3.2).

        A location is a candidate for a box when it lies inside the box, its level's size range
        contains the box's largest regression target, and (if CENTER_SAMPLING_RADIUS > 0) it is
        within ``radius * stride`` of the box center (Chebyshev distance). Among candidates the
        box of smallest area wins.

        Args:
            anchors: per level, one box per location whose side equals the level's stride.
            gt_instances: per image, with ``gt_boxes``.
        Returns:
            per image, (R,) long tensor of matched gt indices, -1 for background.
        """
        points = Boxes.cat(anchors).get_centers()  # (R, 2)
        strides = torch.cat([a.tensor[:, 2] - a.tensor[:, 0] for a in anchors])  # (R,)
        ranges = self._level_ranges(anchors)
        matched = []
        for gt in gt_instances:
            boxes = gt.gt_boxes
            if len(boxes) == 0:
                matched.append(torch.full((len(points),), -1, dtype=torch.long, device=points.device))
                continue
            ltrb = pairwise_point_box_distance(points, boxes)  # (R, M, 4)
            ok = ltrb.min(dim=2).values > 0
            if self.center_sampling_radius > 0:
                offset = (points[:, None, :] - boxes.get_centers()[None]).abs().max(dim=2).values
                ok &= offset < self.center_sampling_radius * strides[:, None]
            extent = ltrb.max(dim=2).values
            ok &= (extent >= ranges[:, :1]) & (extent <= ranges[:, 1:])
            area = torch.where(ok, boxes.area()[None].expand_as(ok), torch.full_like(extent, float("inf")))
            min_area, idx = area.min(dim=1)
            idx[torch.isinf(min_area)] = -1
            matched.append(idx)
        return matched

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """Per image: (R,) class labels (``num_classes`` = background) and the matched gt boxes
        as an (R, 4) tensor (background locations get an arbitrary box, or zeros for an image
        without boxes). Tensors, not ``Boxes``: the losses below take plain tensors, so this
        class runs unchanged on detectron2 v0.6 (whose FCOS passed ``Boxes``) and main (which
        passes tensors); nothing here calls the parent's target code."""
        labels, boxes = [], []
        for idx, gt in zip(self.match_anchors(anchors, gt_instances), gt_instances):
            if len(gt) == 0:
                labels.append(torch.full_like(idx, self.num_classes))
                boxes.append(idx.new_zeros((len(idx), 4), dtype=torch.float32))
                continue
            lab = gt.gt_classes[idx.clamp(min=0)].clone()
            lab[idx < 0] = self.num_classes
            labels.append(lab)
            boxes.append(gt.gt_boxes.tensor[idx.clamp(min=0)])
        return labels, boxes

    def compute_ctrness_targets(self, anchors: List[Boxes], gt_boxes: List[Tensor]) -> Tensor:
        """Centerness targets, FCOS paper eq. 3:
        ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of each location's distances
        to its matched box (only meaningful at foreground locations).

        Args:
            anchors: per level (Ri, 4) location boxes (their centers are the locations);
            gt_boxes: per image (R, 4) matched boxes.
        Returns:
            (N, R) tensor.
        """
        points = Boxes.cat(anchors).get_centers()  # (R, 2)
        if not gt_boxes:
            return points.new_zeros((0, len(points)))
        boxes = torch.stack(gt_boxes)  # (N, R, 4)
        left_right = torch.stack([points[:, 0] - boxes[..., 0], boxes[..., 2] - points[:, 0]], -1)
        top_bottom = torch.stack([points[:, 1] - boxes[..., 1], boxes[..., 3] - points[:, 1]], -1)
        ratio = (left_right.min(-1).values / left_right.max(-1).values) * (
            top_bottom.min(-1).values / top_bottom.max(-1).values)
        return torch.sqrt(ratio)

    # ---- losses ----------------------------------------------------------------------------
    def box_reg_loss(self, anchors: List[Boxes], pred_deltas: List[Tensor], gt_boxes: List[Tensor],
                     fg: Tensor) -> Tensor:
        """Summed box loss over foreground locations.

        Args:
            anchors: per level (Ri, 4) boxes; pred_deltas: per level (N, Ri, 4);
            gt_boxes: per image matched boxes (R, 4); fg: (N, R) bool.
        Returns:
            scalar tensor.
        """
        targets = list(gt_boxes)
        if self.box_reg_loss_type != "iou":
            return _dense_box_regression_loss(
                anchors, self.box2box_transform, pred_deltas, targets, fg,
                box_reg_loss_type=self.box_reg_loss_type, smooth_l1_beta=self.smooth_l1_beta,
            )
        points = Boxes.cat(anchors).tensor  # (R, 4)
        deltas = torch.cat(pred_deltas, dim=1)[fg]  # (P, 4)
        refs = points[None].expand(fg.shape[0], -1, -1)[fg]
        pred = self.box2box_transform.apply_deltas(deltas, refs)
        iou = aligned_iou(pred, torch.stack(targets)[fg])
        return -torch.log(iou.clamp(min=1e-6)).sum()  # UnitBox IoU loss (FCOS paper eq. 2)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        """Focal loss, box loss and centerness BCE, each summed and divided by the (EMA of the)
        number of positive locations. Shapes: pred_logits per level (N, Ri, K),
        pred_anchor_deltas (N, Ri, 4), pred_centerness (N, Ri, 1); gt_labels per image (R,).

        Returns:
            {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"} (detectron2's names).
        """
        labels = torch.stack(gt_labels)  # (N, R)
        fg = labels != self.num_classes
        num_fg = int(fg.sum().item())
        get_event_storage().put_scalar("num_pos_anchors", num_fg / len(gt_labels))
        normalizer = self._ema_update("loss_normalizer", max(num_fg, 1), 300)

        logits = torch.cat(pred_logits, dim=1)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(logits.dtype)
        loss_cls = sigmoid_focal_loss_jit(
            logits, onehot, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="sum"
        )
        loss_loc = self.box_reg_loss(anchors, pred_anchor_deltas, gt_boxes, fg)
        ctr_target = self.compute_ctrness_targets(anchors, gt_boxes)  # (N, R)
        ctr_pred = torch.cat(pred_centerness, dim=1).squeeze(2)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred[fg], ctr_target[fg], reduction="sum")
        return {
            "loss_fcos_cls": loss_cls / normalizer,
            "loss_fcos_loc": loss_loc / normalizer,
            "loss_fcos_ctr": loss_ctr / normalizer,
        }
