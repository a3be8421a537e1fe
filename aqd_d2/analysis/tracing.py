"""What :func:`~aqd_d2.analysis.model_stats.analyze_model` runs: the dense part of a detectron2
detector, and the input tensor.

A detectron2 meta-architecture's whole forward would count a data-dependent number of RoIs
(and post-processing); its dense part is counted instead: the model's
``dense_forward(x)`` where it has one (aqd_d2's CenterNet, YOLOv2), else backbone, then the
dense head (RetinaNet/FCOS/SSD ``head``), the RPN head, and the ROI box head on
``num_proposals`` boxes per image (default ``MODEL.RPN.POST_NMS_TOPK_TEST``, as at test time).
Post-processing (anchor decoding, NMS) is not counted. Any other ``nn.Module`` is called on the
input tensor directly.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["DenseDetector", "is_detectron2_detector", "input_tensor"]


# ==== the dense part ==================================================================================
class DenseDetector(nn.Module):
    """The dense part of a detectron2 detector (see module docstring)."""

    def __init__(self, model: nn.Module, num_proposals: int):
        super().__init__()
        self.model = model
        self.num_proposals = num_proposals

    def forward(self, x: torch.Tensor):
        m = self.model
        if hasattr(m, "dense_forward"):  # detectors that expose their dense part (CenterNet, YOLOv2)
            return tuple(_flatten(m.dense_forward(x)))
        feats = m.backbone(x)
        outs: List[torch.Tensor] = list(feats.values())
        head = getattr(m, "head", None)
        if head is not None and hasattr(m, "head_in_features"):
            outs += _flatten(head([feats[f] for f in m.head_in_features]))
        pg = getattr(m, "proposal_generator", None)
        if pg is not None and hasattr(pg, "rpn_head"):
            outs += _flatten(pg.rpn_head([feats[f] for f in pg.in_features]))
        rh = getattr(m, "roi_heads", None)
        if rh is not None and getattr(rh, "box_head", None) is not None:
            bf = rh.box_pooler([feats[f] for f in rh.box_in_features], [self._boxes(x)] * x.shape[0])
            bf = rh.box_head(bf)
            outs += _flatten(rh.box_predictor(bf))
        elif rh is not None and hasattr(rh, "res5") and hasattr(rh, "pooler"):  # Res5ROIHeads
            bf = rh.res5(rh.pooler([feats[f] for f in rh.in_features], [self._boxes(x)] * x.shape[0]))
            outs += _flatten(rh.box_predictor(bf.mean(dim=[2, 3])))
        return tuple(outs)

    def _boxes(self, x: torch.Tensor):
        """``num_proposals`` fixed boxes spread over the image (only their number matters)."""
        from detectron2.structures import Boxes

        h, w = x.shape[-2:]
        t = torch.linspace(0, 1, self.num_proposals, dtype=x.dtype)
        return Boxes(torch.stack([t * w * 0.5, t * h * 0.5, t * w * 0.5 + w * 0.5, t * h * 0.5 + h * 0.5], 1))


def _flatten(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    out: List[torch.Tensor] = []
    for o in obj:
        out += _flatten(o)
    return out


def is_detectron2_detector(model: nn.Module) -> bool:
    if callable(getattr(model, "dense_forward", None)):
        return True
    return hasattr(model, "backbone") and (
        hasattr(model, "head") or hasattr(model, "proposal_generator") or hasattr(model, "roi_heads"))


def input_tensor(model: nn.Module, inputs) -> torch.Tensor:
    """A float input tensor from a shape, a tensor or a detectron2 batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs if inputs.dim() == 4 or not is_detectron2_detector(model) else inputs[None]
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
        return model.preprocess_image(inputs).tensor
    shape = tuple(int(v) for v in inputs)
    if len(shape) == 3 and is_detectron2_detector(model):
        shape = (1,) + shape
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    if is_detectron2_detector(model):
        # normalized like preprocess_image would; padded to the backbone's divisibility
        div = int(getattr(getattr(model, "backbone", None), "size_divisibility", 0) or 0)
        if div > 1:
            h, w = shape[-2:]
            x = nn.functional.pad(x, (0, (-w) % div, 0, (-h) % div))
    return x


