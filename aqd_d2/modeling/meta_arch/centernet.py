"""CenterNet ("Objects as Points", Zhou et al. 2019) as in the binary CenterNet of paper 003,
registered as ``"CenterNet"`` and configured by ``MODEL.CENTERNET.*``.

* backbone: any detectron2 backbone; its ``MODEL.CENTERNET.IN_FEATURE`` map feeds the decoder
  (QuickNet ``"enc"``, ResNet ``"res5"``);
* decoder ``tp_k([f_d1, ..., f_dNd])``: full-precision k x k transposed convs with stride 2,
  each followed by BN and ReLU (``DECODER_KERNEL``, ``DECODER_CHANNELS``); ConvTranspose2d is
  never swapped by the conversion pass, so it stays float as the paper's best models;
* head ``h(f_h)``: three branches (``heatmap``: one channel per class, ``size``: w, h,
  ``offset``: sub-pixel center offset), each 3x3 conv to f_h + BN + ReLU + 1x1 conv;
* loss (the original CenterNet): penalty-reduced pixel-wise focal loss on the heatmap with
  Gaussian targets (radius from ``MIN_OVERLAP``, alpha / beta ``FOCAL_ALPHA`` / ``FOCAL_BETA``),
  L1 size loss (weight 0.1) and L1 offset loss (weight 1) at object centers, all divided by the
  number of objects;
* inference (:func:`decode_centernet`): sigmoid heatmap, peaks = points equal to the 3x3
  max-pool of their neighbourhood, top-K peaks over all classes, boxes from size and offset;
  detectron2 ``Instances`` rescaled to each image's requested size.

Output stride: ``backbone stride / 2**N_d`` (QuickNet: ``2**(2 + N_e - N_d)``, paper's s).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

__all__ = ["CenterNet", "CenterNetDecoder", "CenterNetHead", "decode_centernet",
           "gaussian_radius", "draw_gaussian", "penalty_reduced_focal_loss"]


# ---- targets and loss ---------------------------------------------------------------------
def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """Largest corner displacement r such that a box shifted by r still has IoU >= min_overlap
    with the (height x width) box (CornerNet's three cases; the minimum is returned)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: Tensor, cx: int, cy: int, radius: int) -> None:
    """Element-wise max of ``heatmap`` (H, W) with a Gaussian of sigma ``(2r+1)/6`` peaking at
    1.0 on (cx, cy); in place."""
    d = 2 * radius + 1
    sigma = d / 6.0
    ys = torch.arange(-radius, radius + 1, dtype=heatmap.dtype, device=heatmap.device)
    g = torch.exp(-(ys[:, None] ** 2 + ys[None, :] ** 2) / (2 * sigma * sigma))
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    region = heatmap[cy - top: cy + bottom, cx - left: cx + right]
    patch = g[radius - top: radius + bottom, radius - left: radius + right]
    region.copy_(torch.maximum(region, patch))


def penalty_reduced_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0,
                               beta: float = 4.0) -> Tensor:
    """CenterNet eq. 1, summed (not normalized). ``logits``, ``target``: (N, C, H, W); target 1
    marks centers, values in (0, 1) reduce the penalty of negatives near them."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).to(p.dtype)
    pos_loss = torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = torch.log(1 - p) * p ** alpha * (1 - target) ** beta * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


# ---- inference ------------------------------------------------------------------------------
def decode_centernet(heatmap: Tensor, size: Tensor, offset: Tensor, stride: float,
                     topk: int = 100, score_thresh: float = 0.0, pool_kernel: int = 3,
                     ) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Peaks of a heatmap to boxes.

    Args:
        heatmap: (N, C, H, W) probabilities (already sigmoid).
        size: (N, 2, H, W) box width, height in output cells.
        offset: (N, 2, H, W) center offset (x, y) in output cells.
        stride: input pixels per output cell.
        topk: peaks kept per image (over all classes).
        score_thresh: minimum peak score.
        pool_kernel: max-pooling window of the peak extraction.
    Returns:
        per image ``(boxes (K, 4) XYXY input pixels, scores (K,), classes (K,))``.
    """
    n, c, h, w = heatmap.shape
    hmax = F.max_pool2d(heatmap, pool_kernel, stride=1, padding=pool_kernel // 2)
    peaks = heatmap * (hmax == heatmap).to(heatmap.dtype)
    k = min(topk, c * h * w)
    scores, idx = peaks.flatten(1).topk(k, dim=1)
    out = []
    for i in range(n):
        keep = scores[i] > score_thresh
        s, ind = scores[i][keep], idx[i][keep]
        cls = ind // (h * w)
        pix = ind % (h * w)
        ys, xs = (pix // w).to(heatmap.dtype), (pix % w).to(heatmap.dtype)
        wh = size[i].flatten(1)[:, pix]
        off = offset[i].flatten(1)[:, pix]
        cx, cy = xs + off[0], ys + off[1]
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], 1)
        out.append((boxes * stride, s, cls))
    return out


# ---- modules --------------------------------------------------------------------------------
class CenterNetDecoder(nn.Sequential):
    """``tp_k([f_d1, ...])``: (N, C_in, H, W) -> (N, f_dNd, H * 2**N_d, W * 2**N_d).
    Layers ``up{i}`` (ConvTranspose2d), ``norm{i}`` (BN), ``relu{i}``, i from 1."""

    def __init__(self, in_channels: int, channels: Sequence[int], kernel: int = 4):
        super().__init__()
        pad = (kernel - 1) // 2
        out_pad = 2 + 2 * pad - kernel
        for i, ch in enumerate(channels, start=1):
            self.add_module(f"up{i}", nn.ConvTranspose2d(in_channels, int(ch), kernel, stride=2,
                                                         padding=pad, output_padding=out_pad,
                                                         bias=False))
            self.add_module(f"norm{i}", nn.BatchNorm2d(int(ch)))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            in_channels = int(ch)
        self.out_channels = in_channels


class CenterNetHead(nn.Module):
    """``h(f_h)``: branches ``heatmap`` (C maps), ``size`` (2), ``offset`` (2); each
    ``{name}.conv`` (3x3 + BN + ReLU) then ``{name}.out`` (1x1)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, prior_prob: float = 0.1):
        super().__init__()
        for name, out in (("heatmap", num_classes), ("size", 2), ("offset", 2)):
            branch = nn.Module()
            branch.conv = Conv2d(in_channels, channels, 3, padding=1, bias=False,
                                 norm=nn.BatchNorm2d(channels), activation=F.relu)
            branch.out = Conv2d(channels, out, 1)
            nn.init.normal_(branch.out.weight, std=0.01)
            nn.init.constant_(branch.out.bias, 0.0)
            self.add_module(name, branch)
        nn.init.constant_(self.heatmap.out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {name: getattr(self, name).out(getattr(self, name).conv(x))
                for name in ("heatmap", "size", "offset")}


@META_ARCH_REGISTRY.register()
class CenterNet(nn.Module):
    """CenterNet detector (see module doc). Training returns ``loss_heatmap`` (classification),
    ``loss_size`` and ``loss_offset`` (localization); inference ``[{"instances": ...}]``."""

    @configurable
    def __init__(self, *, backbone: Backbone, in_feature: str, num_classes: int,
                 decoder_channels: Sequence[int], decoder_kernel: int, head_channels: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 heatmap_weight: float = 1.0, size_weight: float = 0.1, offset_weight: float = 1.0,
                 focal_alpha: float = 2.0, focal_beta: float = 4.0, min_overlap: float = 0.7,
                 prior_prob: float = 0.1, topk_test: int = 100, score_thresh_test: float = 0.05,
                 pool_kernel_test: int = 3):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        spec = backbone.output_shape()[in_feature]
        self.decoder = CenterNetDecoder(spec.channels, decoder_channels, decoder_kernel)
        self.head = CenterNetHead(self.decoder.out_channels, num_classes, head_channels, prior_prob)
        self.num_classes = num_classes
        self.stride = spec.stride / 2 ** len(decoder_channels)
        if self.stride < 1 or self.stride != int(self.stride):
            raise ValueError(f"CenterNet output stride {self.stride} (backbone stride {spec.stride}"
                             f", {len(decoder_channels)} decoder layers) must be an integer >= 1")
        self.stride = int(self.stride)
        self.weights = (heatmap_weight, size_weight, offset_weight)
        self.focal = (focal_alpha, focal_beta)
        self.min_overlap = min_overlap
        self.topk_test, self.score_thresh_test = topk_test, score_thresh_test
        self.pool_kernel_test = pool_kernel_test
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CENTERNET
        return {
            "backbone": build_backbone(cfg), "in_feature": c.IN_FEATURE,
            "num_classes": c.NUM_CLASSES, "decoder_channels": list(c.DECODER_CHANNELS),
            "decoder_kernel": c.DECODER_KERNEL, "head_channels": c.HEAD_CHANNELS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "heatmap_weight": c.HEATMAP_LOSS_WEIGHT, "size_weight": c.SIZE_LOSS_WEIGHT,
            "offset_weight": c.OFFSET_LOSS_WEIGHT, "focal_alpha": c.FOCAL_ALPHA,
            "focal_beta": c.FOCAL_BETA, "min_overlap": c.MIN_OVERLAP, "prior_prob": c.PRIOR_PROB,
            "topk_test": c.TOPK_TEST, "score_thresh_test": c.SCORE_THRESH_TEST,
            "pool_kernel_test": c.POOL_KERNEL_TEST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def dense_forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Network part on a normalized, padded (N, 3, H, W) batch: ``{"heatmap": (N, C, h, w)
        logits, "size": (N, 2, h, w), "offset": (N, 2, h, w)}`` with h = H / stride. Tools that
        trace the dense part of a detector (MAC counting, export) can call it."""
        return self.head(self.decoder(self.backbone(x)[self.in_feature]))

    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        preds = self.dense_forward(images.tensor)
        if self.training:
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(preds, gt)
        return self.inference(preds, images, batched_inputs)

    @torch.no_grad()
    def build_targets(self, gt_instances: List[Instances], shape: Tuple[int, int, int, int]):
        """Heatmap (N, C, H, W), and per object: batch index, flat cell index, size (w, h) and
        offset targets in output cells."""
        n, c, h, w = shape
        heat = torch.zeros(shape, device=self.device)
        bidx, cells, sizes, offs = [], [], [], []
        for i, inst in enumerate(gt_instances):
            boxes = inst.gt_boxes.tensor / self.stride
            for box, cls in zip(boxes.tolist(), inst.gt_classes.tolist()):
                bw, bh = box[2] - box[0], box[3] - box[1]
                if bw <= 0 or bh <= 0:
                    continue
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                ix, iy = min(max(int(cx), 0), w - 1), min(max(int(cy), 0), h - 1)
                r = max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw), self.min_overlap)))
                draw_gaussian(heat[i, cls], ix, iy, r)
                bidx.append(i)
                cells.append(iy * w + ix)
                sizes.append([bw, bh])
                offs.append([cx - ix, cy - iy])
        as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=self.device)  # noqa: E731
        return (heat, as_t(bidx, torch.long), as_t(cells, torch.long),
                as_t(sizes, torch.float32).view(-1, 2), as_t(offs, torch.float32).view(-1, 2))

    def losses(self, preds: Dict[str, Tensor], gt_instances: List[Instances]) -> Dict[str, Tensor]:
        heat_t, bidx, cells, size_t, off_t = self.build_targets(gt_instances, preds["heatmap"].shape)
        num = max(len(bidx), 1)
        loss_heat = penalty_reduced_focal_loss(preds["heatmap"], heat_t, *self.focal) / num

        def at_centers(x: Tensor) -> Tensor:  # (N, 2, H, W) -> (M, 2)
            return x.flatten(2)[bidx, :, cells]

        loss_size = F.l1_loss(at_centers(preds["size"]), size_t, reduction="sum") / num
        loss_off = F.l1_loss(at_centers(preds["offset"]), off_t, reduction="sum") / num
        wh, ws, wo = self.weights
        return {"loss_heatmap": wh * loss_heat, "loss_size": ws * loss_size,
                "loss_offset": wo * loss_off}

    def inference(self, preds: Dict[str, Tensor], images: ImageList, batched_inputs: List[dict]):
        dets = decode_centernet(preds["heatmap"].sigmoid(), preds["size"], preds["offset"],
                                self.stride, self.topk_test, self.score_thresh_test,
                                self.pool_kernel_test)
        results = []
        for (boxes, scores, classes), image_size, inp in zip(dets, images.image_sizes, batched_inputs):
            inst = Instances(image_size)
            inst.pred_boxes = Boxes(boxes)
            inst.pred_boxes.clip(image_size)
            inst.scores = scores
            inst.pred_classes = classes
            h = inp.get("height", image_size[0])
            w = inp.get("width", image_size[1])
            results.append({"instances": detector_postprocess(inst, h, w)})
        return results
