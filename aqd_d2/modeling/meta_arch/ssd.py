"""SSD (Liu et al. 2016, "SSD: Single Shot MultiBox Detector") on detectron2's DenseDetector,
registered as ``"SSD"`` (build it through "QuantizedDetector" with
``MODEL.QUANT.META_ARCHITECTURE "SSD"``).

* Input: every image is resized to ``INPUT_SIZE`` x ``INPUT_SIZE`` inside the model (SSD300
  works on a fixed square input); gt boxes are scaled alike and detections are mapped back to
  each input's ``height`` / ``width`` by detectron2's ``detector_postprocess``.
* Matching (sec. 2.2 "Matching strategy"): each gt box gets its best default box, and every
  default box with IoU >= ``IOU_THRESHOLD`` (0.5) with some gt box is positive (detectron2's
  ``Matcher`` thresholds the IoU; the forced best box is assigned to *its* gt box, as SSD does).
* Box encoding: detectron2's ``Box2BoxTransform`` with weights (10, 10, 5, 5) = 1 / the SSD
  variances (0.1, 0.1, 0.2, 0.2).
* Loss (eq. 1-3): ``L = (L_conf + alpha L_loc) / N`` with N the number of positives in the
  batch; ``L_conf`` softmax cross-entropy over the positives and the hard negatives (sec. 2.2
  "Hard negative mining": per image, the negatives with the highest background loss, at most
  ``NEG_POS_RATIO`` per positive); ``L_loc`` smooth L1 over the positives. No positives in
  the batch -> N is taken as 1 (the loss is then 0: no negatives are mined either).
* Inference: softmax, score threshold, top-k candidates, per-class NMS, detections per image.

Subclasses (e.g. BiDet) override the pieces: :meth:`forward_training`, :meth:`label_default_boxes`
(per-image matched labels and boxes), :meth:`hard_negative_mining`, :meth:`losses`,
:meth:`box_deltas` (which of the head's ``box_dim`` outputs are the box deltas),
:meth:`inference_single_image`; the head is ``self.head`` (:class:`SSDHead`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from fvcore.nn import smooth_l1_loss
from torch import Tensor, nn

from .ssd_head import SSDDefaultBoxes, SSDHead

__all__ = ["SSD"]


@META_ARCH_REGISTRY.register()
class SSD(DenseDetector):
    """SSD meta-architecture (see the module docstring).

    Args:
        backbone: returns the features named by ``head_in_features``.
        head: per-level predictor (:class:`SSDHead` or a subclass).
        head_in_features: backbone features, fine to coarse.
        default_boxes: :class:`SSDDefaultBoxes`.
        box2box_transform: SSD box encoding.
        matcher: IoU matcher (thresholds [IOU_THRESHOLD], labels [0, 1]).
        num_classes: K (background is index K).
        input_size: side of the square network input.
        neg_pos_ratio, smooth_l1_beta, loc_weight: loss settings.
        test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
            inference settings.
        pixel_mean, pixel_std: image normalisation.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, head: nn.Module, head_in_features: List[str],
                 default_boxes: SSDDefaultBoxes, box2box_transform: Box2BoxTransform,
                 matcher: Matcher, num_classes: int, input_size: int = 300,
                 neg_pos_ratio: float = 3.0, smooth_l1_beta: float = 1.0, loc_weight: float = 1.0,
                 test_score_thresh: float = 0.01, test_topk_candidates: int = 1000,
                 test_nms_thresh: float = 0.45, max_detections_per_image: int = 200,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float]):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.default_boxes = default_boxes
        self.box2box_transform = box2box_transform
        self.matcher = matcher
        self.num_classes = num_classes
        self.input_size = int(input_size)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loc_weight = float(loc_weight)
        self.test_score_thresh = float(test_score_thresh)
        self.test_topk_candidates = int(test_topk_candidates)
        self.test_nms_thresh = float(test_nms_thresh)
        self.max_detections_per_image = int(max_detections_per_image)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        from aqd_d2.config import validate_aqd_config

        validate_aqd_config(cfg)
        s = cfg.MODEL.SSD
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in s.IN_FEATURES if f not in shapes]
        if missing:
            from aqd_d2.config import ConfigError

            raise ConfigError(f"MODEL.SSD.IN_FEATURES {missing} are not outputs of "
                              f"{cfg.MODEL.BACKBONE.NAME}; it gives {sorted(shapes)}")
        default_boxes = SSDDefaultBoxes(cfg)
        head = SSDHead(cfg, [shapes[f] for f in s.IN_FEATURES], default_boxes.num_cell_anchors)
        return {
            "backbone": backbone, "head": head, "head_in_features": list(s.IN_FEATURES),
            "default_boxes": default_boxes,
            "box2box_transform": Box2BoxTransform(weights=tuple(s.BBOX_REG_WEIGHTS)),
            "matcher": Matcher([s.IOU_THRESHOLD], [0, 1], allow_low_quality_matches=True),
            "num_classes": s.NUM_CLASSES, "input_size": s.INPUT_SIZE,
            "neg_pos_ratio": s.NEG_POS_RATIO, "smooth_l1_beta": s.SMOOTH_L1_BETA,
            "loc_weight": s.LOC_WEIGHT, "test_score_thresh": s.SCORE_THRESH_TEST,
            "test_topk_candidates": s.TOPK_CANDIDATES_TEST, "test_nms_thresh": s.NMS_THRESH_TEST,
            "max_detections_per_image": s.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    # ---- input ------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """Normalise each image and resize it to ``input_size`` x ``input_size``.

        Returns:
            ImageList with ``tensor`` (N, C, S, S); ``image_sizes`` are the sizes of the
            *input* images (h, w), which detectron2's postprocessing uses as output size.
        """
        s = self.input_size
        tensors, sizes = [], []
        for x in batched_inputs:
            img = (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            sizes.append((int(img.shape[-2]), int(img.shape[-1])))
            if img.shape[-2:] != (s, s):
                img = F.interpolate(img[None], size=(s, s), mode="bilinear", align_corners=False)[0]
            tensors.append(img)
        return ImageList(torch.stack(tensors), sizes)

    def resize_gt(self, gt_instances: List[Instances]) -> List[Instances]:
        """gt boxes scaled from each image's size to the ``input_size`` square (new Instances)."""
        out = []
        for inst in gt_instances:
            h, w = inst.image_size
            boxes = inst.gt_boxes.tensor * inst.gt_boxes.tensor.new_tensor(
                [self.input_size / w, self.input_size / h] * 2)
            new = Instances((self.input_size, self.input_size), **inst.get_fields())
            new.gt_boxes = Boxes(boxes)
            out.append(new)
        return out

    # ---- training -----------------------------------------------------------------------
    def forward_training(self, images: ImageList, features: List[Tensor],
                         predictions: Tuple[List[Tensor], List[Tensor]],
                         gt_instances: List[Instances]) -> Dict[str, Tensor]:
        """Multibox loss of one batch.

        Args:
            images: from :meth:`preprocess_image`.
            features: per-level backbone features.
            predictions: the head's (logits, box outputs), per level (N, A_k * D, H_k, W_k).
            gt_instances: per-image gt (input-image coordinates).
        Returns:
            {"loss_cls", "loss_box_reg"}.
        """
        logits, deltas = self._transpose_dense_predictions(
            list(predictions), [self.num_classes + 1, self.head.box_dim])
        anchors = self.default_boxes(features)
        gt_labels, gt_boxes = self.label_default_boxes(anchors, self.resize_gt(gt_instances))
        return self.losses(anchors, logits, gt_labels, deltas, gt_boxes)

    @torch.no_grad()
    def label_default_boxes(self, anchors: List[Boxes], gt_instances: List[Instances]
                            ) -> Tuple[List[Tensor], List[Tensor]]:
        """SSD matching per image.

        Args:
            anchors: per-level default boxes.
            gt_instances: per-image gt in network-input coordinates.
        Returns:
            (labels, boxes): per image (R,) int64 class of each default box (K = background)
            and (R, 4) its matched gt box (zeros where there is no gt).
        """
        anchors = Boxes.cat(anchors)
        labels_out, boxes_out = [], []
        for inst in gt_instances:
            r = len(anchors)
            inst = inst[inst.gt_boxes.nonempty()]  # a zero-area box would match nothing
            if len(inst) == 0:
                labels_out.append(torch.full((r,), self.num_classes, dtype=torch.long, device=anchors.device))
                boxes_out.append(torch.zeros_like(anchors.tensor))
                continue
            iou = pairwise_iou(inst.gt_boxes, anchors)  # (G, R)
            idx, match = self.matcher(iou)
            # SSD: the best default box of gt j is matched to gt j (Matcher's low-quality
            # rule labels it positive but keeps its own argmax gt).
            best = iou.argmax(dim=1)
            idx[best] = torch.arange(len(inst), device=idx.device)
            labels = inst.gt_classes[idx].clone()
            labels[match == 0] = self.num_classes
            labels_out.append(labels)
            boxes_out.append(inst.gt_boxes.tensor[idx])
        return labels_out, boxes_out

    def box_deltas(self, box_outputs: Tensor) -> Tensor:
        """The 4 box deltas among the ``box_dim`` outputs per default box (SSD: all of them;
        a subclass predicting more, e.g. means and variances, picks the means here).

        Args:
            box_outputs: (..., box_dim).
        Returns:
            (..., 4).
        """
        return box_outputs[..., :4]

    def hard_negative_mining(self, cls_loss: Tensor, positive: Tensor) -> Tensor:
        """SSD hard negative mining (sec. 2.2): per image, the ``neg_pos_ratio * n_pos``
        negatives (at most all of them) with the highest classification loss.

        Args:
            cls_loss: (N, R) per-default-box cross-entropy.
            positive: (N, R) bool.
        Returns:
            (N, R) bool mask of the chosen negatives.
        """
        loss = cls_loss.detach().masked_fill(positive, float("-inf"))
        order = loss.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        n_pos = positive.sum(dim=1, keepdim=True)
        n_neg = torch.minimum((n_pos * self.neg_pos_ratio).floor().long(),
                              positive.shape[1] - n_pos)
        return (rank < n_neg) & ~positive

    def losses(self, anchors: List[Boxes], pred_logits: List[Tensor], gt_labels: List[Tensor],
               pred_deltas: List[Tensor], gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """SSD eq. 1-3 (see the module docstring).

        Args:
            anchors: per-level default boxes.
            pred_logits: per-level (N, R_k, K + 1).
            gt_labels: per-image (R,).
            pred_deltas: per-level (N, R_k, box_dim); :meth:`box_deltas` picks the 4 deltas.
            gt_boxes: per-image (R, 4).
        Returns:
            {"loss_cls": L_conf / N, "loss_box_reg": alpha L_loc / N}.
        """
        logits = cat(pred_logits, dim=1)  # (N, R, K+1)
        deltas = self.box_deltas(cat(pred_deltas, dim=1))
        labels = torch.stack(gt_labels)  # (N, R)
        positive = labels != self.num_classes
        n = max(float(positive.sum()), 1.0)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        negative = self.hard_negative_mining(ce, positive)
        loss_cls = ce[positive | negative].sum() / n
        anchors_t = Boxes.cat(anchors).tensor
        target = torch.stack([self.box2box_transform.get_deltas(anchors_t, b) for b in gt_boxes])
        loss_loc = smooth_l1_loss(deltas[positive], target[positive], self.smooth_l1_beta,
                                  reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": self.loc_weight * loss_loc / n}

    # ---- inference ----------------------------------------------------------------------
    def forward_inference(self, images: ImageList, features: List[Tensor],
                          predictions: Tuple[List[Tensor], List[Tensor]]) -> List[Instances]:
        """Args: as :meth:`forward_training`. Returns: per-image Instances in network-input
        coordinates (image_size (S, S)), with pred_boxes, scores, pred_classes."""
        logits, deltas = self._transpose_dense_predictions(
            list(predictions), [self.num_classes + 1, self.head.box_dim])
        anchors = Boxes.cat(self.default_boxes(features))
        return [self.inference_single_image(anchors, cat([x[i] for x in logits]),
                                            self.box_deltas(cat([x[i] for x in deltas])))
                for i in range(len(images))]

    def inference_single_image(self, anchors: Boxes, logits: Tensor, deltas: Tensor) -> Instances:
        """Softmax, score threshold, top-k, per-class NMS, at most max_detections_per_image.

        Args:
            anchors: (R, 4) default boxes.
            logits: (R, K + 1).
            deltas: (R, 4).
        Returns:
            Instances of image size (S, S).
        """
        scores = logits.softmax(dim=-1)[:, : self.num_classes].flatten()  # (R*K,)
        keep = scores > self.test_score_thresh
        scores, idx = scores[keep], keep.nonzero().squeeze(1)
        if len(scores) > self.test_topk_candidates:
            scores, top = scores.topk(self.test_topk_candidates)
            idx = idx[top]
        box_idx, classes = idx // self.num_classes, idx % self.num_classes
        boxes = Boxes(self.box2box_transform.apply_deltas(deltas[box_idx], anchors.tensor[box_idx]))
        boxes.clip((self.input_size, self.input_size))
        keep = batched_nms(boxes.tensor, scores, classes, self.test_nms_thresh)
        keep = keep[: self.max_detections_per_image]
        result = Instances((self.input_size, self.input_size))
        result.pred_boxes = boxes[keep]
        result.scores = scores[keep]
        result.pred_classes = classes[keep]
        return result
