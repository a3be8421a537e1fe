"""YOLOv2 (Redmon & Farhadi 2017) as used by the binary-weight detector of paper 004, registered
as ``"YOLOv2"`` and configured by ``MODEL.YOLO.*``.

Detection layers (``head.*``, names of the paper's Table I): ``conv7_1``, ``conv7_2`` (3x3,
HEAD_CHANNELS) on the stride-32 backbone map; passthrough: ``passthrough`` (1x1 to
PASSTHROUGH_CHANNELS, YOLOv2's 64; absent when 0) on the stride-16 map, then *reorg*
(:func:`reorg`: each 2x2 neighbourhood stacked along channels), concatenated with conv7_2's
output; ``conv8_1`` (3x3) and ``pred`` (1x1 to ``A * (5 + C)``). All convs but ``pred`` are
conv + BN + leaky ReLU.

Region loss (darknet's region layer, per image summed then averaged over the batch), with
predictions ``(t_x, t_y, t_w, t_h, t_o, class logits)`` per anchor and cell:
box ``b_x = c_x + sigmoid(t_x)``, ``b_y = c_y + sigmoid(t_y)``, ``b_w = p_w exp(t_w)``,
``b_h = p_h exp(t_h)`` in grid cells, objectness ``sigmoid(t_o)``, class probabilities
``softmax``. Each gt box is assigned to the cell holding its center and the anchor whose
shape best matches it (IoU of centered boxes). Terms:

* ``loss_coord``: ``COORD_SCALE * (2 - w h / (W H))`` times the squared error of
  ``sigmoid(t_x), sigmoid(t_y)`` against the in-cell center and of ``t_w, t_h`` against
  ``log(w / p_w), log(h / p_h)``;
* ``loss_obj``: ``OBJECT_SCALE * (1 - sigmoid(t_o))**2`` for assigned predictions;
* ``loss_noobj``: ``NOOBJECT_SCALE * sigmoid(t_o)**2`` for the others whose best IoU with any
  gt box is below ``IGNORE_THRESH``;
* ``loss_class``: ``CLASS_SCALE *`` squared error of the softmax probabilities against the
  one-hot class (darknet's region layer).

Darknet's early-iteration prior-matching term (12800 images) and rescoring are not used.
Inference: score = objectness x class probability per class, threshold, per-class NMS, top
``DETECTIONS_PER_IMAGE``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from torch import Tensor, nn

from ..backbone.darknet import conv_bn_leaky

__all__ = ["YOLOv2", "YOLOv2Head", "reorg", "decode_yolo_boxes"]


def reorg(x: Tensor, stride: int = 2) -> Tensor:
    """(N, C, H, W) -> (N, C * s * s, H / s, W / s): each s x s neighbourhood stacked along
    channels (YOLOv2's passthrough / reorg layer)."""
    return F.pixel_unshuffle(x, stride)


def decode_yolo_boxes(t: Tensor, anchors: Tensor) -> Tensor:
    """Raw box outputs (N, A, 4, H, W) to boxes (N, A, H, W, 4) XYXY in grid cells."""
    n, a, _, h, w = t.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=t.device, dtype=t.dtype),
                            torch.arange(w, device=t.device, dtype=t.dtype), indexing="ij")
    cx = xs + t[:, :, 0].sigmoid()
    cy = ys + t[:, :, 1].sigmoid()
    bw = anchors[:, 0].view(1, a, 1, 1) * t[:, :, 2].exp()
    bh = anchors[:, 1].view(1, a, 1, 1) * t[:, :, 3].exp()
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)


class YOLOv2Head(nn.Module):
    """Detection layers (see module doc): returns (N, A, 5 + C, H, W) raw outputs."""

    def __init__(self, in_channels: int, pass_channels: int, num_anchors: int, num_classes: int,
                 head_channels: int = 1024, passthrough_channels: int = 64,
                 negative_slope: float = 0.1):
        super().__init__()
        self.conv7_1 = conv_bn_leaky(in_channels, head_channels, 3, negative_slope=negative_slope)
        self.conv7_2 = conv_bn_leaky(head_channels, head_channels, 3, negative_slope=negative_slope)
        if passthrough_channels > 0:
            self.passthrough = conv_bn_leaky(pass_channels, passthrough_channels, 1,
                                             negative_slope=negative_slope)
            pass_channels = passthrough_channels
        self.conv8_1 = conv_bn_leaky(head_channels + 4 * pass_channels, head_channels, 3,
                                     negative_slope=negative_slope)
        self.pred = Conv2d(head_channels, num_anchors * (5 + num_classes), 1)
        self.num_anchors = num_anchors

    def forward(self, x: Tensor, fine: Tensor) -> Tensor:
        x = self.conv7_2(self.conv7_1(x))
        if hasattr(self, "passthrough"):
            fine = self.passthrough(fine)
        x = self.conv8_1(torch.cat([reorg(fine), x], dim=1))
        out = self.pred(x)
        n, _, h, w = out.shape
        return out.view(n, self.num_anchors, -1, h, w)


@META_ARCH_REGISTRY.register()
class YOLOv2(nn.Module):
    """YOLOv2 detector. Training returns ``loss_coord`` (localization), ``loss_obj``,
    ``loss_noobj``, ``loss_class`` (classification); inference ``[{"instances": ...}]``."""

    @configurable
    def __init__(self, *, backbone: Backbone, in_feature: str, passthrough_feature: str,
                 num_classes: int, anchors: Sequence[Sequence[float]], pixel_mean, pixel_std,
                 head_channels: int = 1024, passthrough_channels: int = 64,
                 negative_slope: float = 0.1, object_scale: float = 5.0,
                 noobject_scale: float = 1.0, class_scale: float = 1.0, coord_scale: float = 1.0,
                 ignore_thresh: float = 0.6, score_thresh_test: float = 0.05,
                 nms_thresh_test: float = 0.45, detections_per_image: int = 100):
        super().__init__()
        self.backbone = backbone
        self.in_feature, self.passthrough_feature = in_feature, passthrough_feature
        shapes = backbone.output_shape()
        self.stride = shapes[in_feature].stride
        if shapes[passthrough_feature].stride * 2 != self.stride:
            raise ValueError("the passthrough feature must have half the stride of the input feature")
        self.head = YOLOv2Head(shapes[in_feature].channels, shapes[passthrough_feature].channels,
                               len(anchors), num_classes, head_channels, passthrough_channels,
                               negative_slope)
        self.num_classes = num_classes
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), False)
        self.scales = dict(obj=object_scale, noobj=noobject_scale, cls=class_scale, coord=coord_scale)
        self.ignore_thresh = ignore_thresh
        self.score_thresh_test, self.nms_thresh_test = score_thresh_test, nms_thresh_test
        self.detections_per_image = detections_per_image
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        y = cfg.MODEL.YOLO
        return {
            "backbone": build_backbone(cfg), "in_feature": y.IN_FEATURE,
            "passthrough_feature": y.PASSTHROUGH_FEATURE, "num_classes": y.NUM_CLASSES,
            "anchors": [list(a) for a in y.ANCHORS], "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "head_channels": max(8, int(round(y.HEAD_CHANNELS * cfg.MODEL.DARKNET.WIDTH_MULT))),
            "passthrough_channels": (max(8, int(round(y.PASSTHROUGH_CHANNELS * cfg.MODEL.DARKNET.WIDTH_MULT)))
                                     if y.PASSTHROUGH_CHANNELS > 0 else 0),
            "negative_slope": cfg.MODEL.DARKNET.NEGATIVE_SLOPE,
            "object_scale": y.OBJECT_SCALE, "noobject_scale": y.NOOBJECT_SCALE,
            "class_scale": y.CLASS_SCALE, "coord_scale": y.COORD_SCALE,
            "ignore_thresh": y.IGNORE_THRESH, "score_thresh_test": y.SCORE_THRESH_TEST,
            "nms_thresh_test": y.NMS_THRESH_TEST, "detections_per_image": y.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def dense_forward(self, x: Tensor) -> Tensor:
        """Network part on a normalized, padded (N, 3, H, W) batch: raw outputs
        (N, A, 5 + C, H / 32, W / 32). Tools that trace the dense part can call it."""
        feats = self.backbone(x)
        return self.head(feats[self.in_feature], feats[self.passthrough_feature])

    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        out = self.dense_forward(images.tensor)
        if self.training:
            return self.losses(out, [x["instances"].to(self.device) for x in batched_inputs])
        return self.inference(out, images, batched_inputs)

    def losses(self, out: Tensor, gt_instances: List[Instances]) -> Dict[str, Tensor]:
        n, a, _, h, w = out.shape
        boxes = decode_yolo_boxes(out[:, :, :4], self.anchors)  # (N, A, H, W, 4) cells
        obj = out[:, :, 4].sigmoid()  # (N, A, H, W)
        probs = out[:, :, 5:].softmax(dim=2)  # (N, A, C, H, W)
        noobj_mask = torch.ones_like(obj, dtype=torch.bool)
        loss_coord = out.new_zeros(())
        loss_obj = out.new_zeros(())
        loss_cls = out.new_zeros(())
        for i, inst in enumerate(gt_instances):
            gt = inst.gt_boxes.tensor / self.stride
            if len(gt) == 0:
                continue
            with torch.no_grad():
                ious = pairwise_iou(Boxes(boxes[i].detach().reshape(-1, 4)), Boxes(gt))
                best = ious.max(dim=1).values.view(a, h, w)
                noobj_mask[i] &= best <= self.ignore_thresh
            gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
            gx, gy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
            inter = torch.min(gw[:, None], self.anchors[None, :, 0]) * torch.min(gh[:, None], self.anchors[None, :, 1])
            shape_iou = inter / (gw[:, None] * gh[:, None] + self.anchors.prod(1)[None] - inter)
            best_anchor = shape_iou.argmax(dim=1)
            for j in range(len(gt)):
                if gw[j] <= 0 or gh[j] <= 0:
                    continue
                k = int(best_anchor[j])
                cx = min(max(int(gx[j]), 0), w - 1)
                cy = min(max(int(gy[j]), 0), h - 1)
                noobj_mask[i, k, cy, cx] = False
                t = out[i, k, :, cy, cx]
                scale = self.scales["coord"] * (2 - float(gw[j] * gh[j]) / (w * h))
                target = torch.stack([gx[j] - cx, gy[j] - cy, torch.log(gw[j] / self.anchors[k, 0]),
                                      torch.log(gh[j] / self.anchors[k, 1])])
                pred = torch.cat([t[:2].sigmoid(), t[2:4]])
                loss_coord = loss_coord + scale * ((pred - target) ** 2).sum()
                loss_obj = loss_obj + self.scales["obj"] * (1 - obj[i, k, cy, cx]) ** 2
                onehot = F.one_hot(inst.gt_classes[j], self.num_classes).to(probs.dtype)
                loss_cls = loss_cls + self.scales["cls"] * ((probs[i, k, :, cy, cx] - onehot) ** 2).sum()
        loss_noobj = self.scales["noobj"] * (obj ** 2 * noobj_mask).sum()
        return {"loss_coord": loss_coord / n, "loss_obj": loss_obj / n,
                "loss_noobj": loss_noobj / n, "loss_class": loss_cls / n}

    def inference(self, out: Tensor, images: ImageList, batched_inputs: List[dict]):
        n, a, _, h, w = out.shape
        boxes = decode_yolo_boxes(out[:, :, :4], self.anchors) * self.stride
        scores = out[:, :, 4:5].sigmoid() * out[:, :, 5:].softmax(dim=2)  # (N, A, C, H, W)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            s = scores[i].permute(0, 2, 3, 1).reshape(-1, self.num_classes)  # (A*H*W, C)
            b = boxes[i].reshape(-1, 4)
            idx, cls = (s > self.score_thresh_test).nonzero(as_tuple=True)
            bb, ss = Boxes(b[idx]), s[idx, cls]
            bb.clip(image_size)
            keep = batched_nms(bb.tensor, ss, cls, self.nms_thresh_test)[: self.detections_per_image]
            inst = Instances(image_size)
            inst.pred_boxes, inst.scores, inst.pred_classes = bb[keep], ss[keep], cls[keep]
            inp = batched_inputs[i]
            results.append({"instances": detector_postprocess(
                inst, inp.get("height", image_size[0]), inp.get("width", image_size[1]))})
        return results
