"""SSD's default boxes and its per-level prediction head (Liu et al. 2016, sec. 2.1-2.2).

``SSDDefaultBoxes`` is registered in detectron2's ANCHOR_GENERATOR_REGISTRY (it returns
per-level ``Boxes`` like detectron2's anchor generators); ``SSDHead`` holds one 3x3 conv per
level for the (num_classes + 1) class scores (``head.cls_score.<level>``) and one for the box
outputs (``head.bbox_pred.<level>``): the last layers of the detector (KEEP_LAST_FP).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.structures import Boxes
from torch import nn

__all__ = ["SSDDefaultBoxes", "SSDHead"]


@ANCHOR_GENERATOR_REGISTRY.register()
class SSDDefaultBoxes(nn.Module):
    """SSD default boxes (sec. 2.2 "Choosing scales and aspect ratios for default boxes").

    Per level k and cell (i, j): centre ``((j + offset) * step_k, (i + offset) * step_k)``;
    boxes (w, h) in this order: ``(s_k, s_k)``, ``(s'_k, s'_k)`` with
    ``s'_k = sqrt(s_k s_{k+1})``, then for each ratio ``a_r``: ``(s_k sqrt(a_r), s_k / sqrt(a_r))``
    and ``(s_k / sqrt(a_r), s_k sqrt(a_r))``. ``s_k`` = ``min_sizes[k]``, ``s_{k+1}`` =
    ``max_sizes[k]`` (pixels). Boxes are ordered (H, W, A) as detectron2's anchors, matching
    ``permute_to_N_HWA_K`` of the head outputs.

    Args:
        min_sizes, max_sizes: per-level s_k and s_{k+1} (pixels).
        aspect_ratios: per-level ratios > 1 besides 1.
        steps: per-level centre spacing (pixels); empty = image_size / feature size.
        offset: cell-centre offset.
        clip: clip boxes to the image.
        image_size: side of the (square) network input.
    """

    @configurable
    def __init__(self, *, min_sizes: Sequence[float], max_sizes: Sequence[float],
                 aspect_ratios: Sequence[Sequence[float]], steps: Sequence[float] = (),
                 offset: float = 0.5, clip: bool = True, image_size: int = 300):
        super().__init__()
        self.min_sizes = [float(s) for s in min_sizes]
        self.max_sizes = [float(s) for s in max_sizes]
        self.aspect_ratios = [[float(a) for a in ars] for ars in aspect_ratios]
        self.steps = [float(s) for s in steps]
        self.offset = float(offset)
        self.clip = bool(clip)
        self.image_size = int(image_size)

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        s = cfg.MODEL.SSD
        return {"min_sizes": s.MIN_SIZES, "max_sizes": s.MAX_SIZES, "aspect_ratios": s.ASPECT_RATIOS,
                "steps": s.STEPS, "offset": s.OFFSET, "clip": s.CLIP_DEFAULT_BOXES,
                "image_size": s.INPUT_SIZE}

    @property
    def num_cell_anchors(self) -> List[int]:
        """Default boxes per location, per level (2 + 2 * len(aspect_ratios[k]))."""
        return [2 + 2 * len(ars) for ars in self.aspect_ratios]

    num_anchors = num_cell_anchors

    def cell_shapes(self, level: int) -> List[Tuple[float, float]]:
        """The (w, h) of the boxes of one location of ``level``, in output order."""
        s, s_next = self.min_sizes[level], self.max_sizes[level]
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for a in self.aspect_ratios[level]:
            r = math.sqrt(a)
            shapes += [(s * r, s / r), (s / r, s * r)]
        return shapes

    def grid_boxes(self, level: int, height: int, width: int, device=None) -> torch.Tensor:
        """Boxes of one level as an (H * W * A, 4) XYXY tensor (pixels)."""
        step_y = self.steps[level] if self.steps else self.image_size / height
        step_x = self.steps[level] if self.steps else self.image_size / width
        cy = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * step_y
        cx = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * step_x
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        wh = torch.tensor(self.cell_shapes(level), dtype=torch.float32, device=device)  # (A, 2)
        ctr = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # (HW, 1, 2)
        boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=-1).reshape(-1, 4)
        if self.clip:
            boxes = boxes.clamp(min=0.0, max=float(self.image_size))
        return boxes

    def forward(self, features: List[torch.Tensor]) -> List[Boxes]:
        """Args: features: per-level (N, C, H_k, W_k). Returns: per-level Boxes (H_k W_k A_k, 4)."""
        if len(features) != len(self.min_sizes):
            raise ValueError(f"{len(features)} feature maps but MODEL.SSD.MIN_SIZES has "
                             f"{len(self.min_sizes)} levels")
        return [Boxes(self.grid_boxes(k, f.shape[-2], f.shape[-1], f.device))
                for k, f in enumerate(features)]


class SSDHead(nn.Module):
    """One 3x3 conv per level for class scores and one for box outputs (SSD sec. 2.1).

    Args:
        input_shape: per-level ShapeSpec of the input features.
        num_classes: K (without background); scores are K + 1 per box (index K = background).
        num_anchors: default boxes per location, per level.
        box_dim: outputs per box of ``bbox_pred`` (4; a subclass may predict more).
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, num_anchors: List[int],
                 box_dim: int = 4):
        super().__init__()
        if len(input_shape) != len(num_anchors):
            raise ValueError(f"{len(input_shape)} levels but {len(num_anchors)} anchor counts")
        self.num_classes = num_classes
        self.box_dim = box_dim
        self.cls_score = nn.ModuleList()
        self.bbox_pred = nn.ModuleList()
        for spec, a in zip(input_shape, num_anchors):
            self.cls_score.append(Conv2d(spec.channels, a * (num_classes + 1), 3, padding=1))
            self.bbox_pred.append(Conv2d(spec.channels, a * box_dim, 3, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)  # SSD (caffe) initialisation
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec], num_anchors: List[int]):
        return {"input_shape": input_shape, "num_classes": cfg.MODEL.SSD.NUM_CLASSES,
                "num_anchors": num_anchors}

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Args: features: per-level (N, C_k, H_k, W_k).
        Returns: (logits, box outputs): per-level (N, A_k (K + 1), H_k, W_k) and
        (N, A_k box_dim, H_k, W_k)."""
        logits = [conv(f) for conv, f in zip(self.cls_score, features)]
        deltas = [conv(f) for conv, f in zip(self.bbox_pred, features)]
        return logits, deltas
