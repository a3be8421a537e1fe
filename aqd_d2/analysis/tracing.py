"""How :func:`~aqd_d2.analysis.model_stats.analyze_model` runs a model under fvcore's tracer:
the op handles for aqd_d2's custom ops, and the traceable dense part of a detectron2 detector.

Detectron2 meta-architectures cannot be traced as a whole (their inputs are lists of dicts and
their outputs ``Instances``); the dense part is traced instead: the model's
``dense_forward(x)`` where it has one (aqd_d2's CenterNet, YOLOv2), else backbone, then the
dense head (RetinaNet/FCOS/SSD ``head``), the RPN head, and the ROI box head on
``num_proposals`` boxes per image (default ``MODEL.RPN.POST_NMS_TOPK_TEST``, as at test time).
Post-processing (anchor decoding, NMS) is not counted. Any other ``nn.Module`` is called on the
input tensor directly.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

__all__ = ["HANDLES", "IGNORED", "DenseDetector", "is_detectron2_detector", "input_tensor",
           "zero_handle"]


# ==== fvcore handles ===========================================================================
def _shape(v) -> Optional[List[int]]:
    t = v.type()
    try:
        return t.sizes()
    except Exception:  # noqa: BLE001 - not a complete tensor type
        return None


def _conv_macs(inputs, outputs) -> int:
    """MACs of ``conv(x, w)``: numel(out) * C_in/groups * kh * kw = numel(out) * prod(w[1:])."""
    out, w = _shape(outputs[0]), _shape(inputs[1])
    if out is None or w is None:
        return 0
    return math.prod(out) * math.prod(w[1:])


def _linear_macs(inputs, outputs) -> int:
    out, x = _shape(outputs[0]), _shape(inputs[0])
    if out is None or x is None:
        return 0
    return math.prod(out) * x[-1]


def _binary_kernel_macs(inputs, outputs) -> int:
    """``aqd_binary::conv2d(x, words, alpha, bias, O, C, [kh, kw], ...)``: MACs from the input's
    channels and the kernel size list (node input 6)."""
    out, x = _shape(outputs[0]), _shape(inputs[0])
    if out is None or x is None:
        return 0
    ks = inputs[6].toIValue() if inputs[6].node().kind() == "prim::Constant" else None
    if ks is None and inputs[6].node().kind() == "prim::ListConstruct":
        ks = [i.toIValue() for i in inputs[6].node().inputs()]
    kh, kw = (ks or [1, 1])[:2]
    return math.prod(out) * x[1] * int(kh) * int(kw)


def _int_mm_macs(inputs, outputs) -> int:
    """``aten::_int_mm(A [m, k], B [k, n])``: ``m * k * n`` (the deployed int8 layers,
    :class:`aqd_d2.export.deploy.Int8ConvInference`; an extra all-ones weight column of theirs
    is subtracted per layer in :func:`analyze_model`)."""
    a, b = _shape(inputs[0]), _shape(inputs[1])
    if a is None or b is None:
        return 0
    return a[0] * a[1] * b[1]


def _batch_norm_macs(inputs, outputs) -> int:
    """Inference batch norm (any BN, SyncBN, detectron2's FrozenBatchNorm2d under no_grad):
    ``y = x * a + b`` per element after folding the statistics, one multiply-add per output
    element, counted like a conv's multiply-adds (fvcore counts 2 per element for an affine
    BN)."""
    out = _shape(outputs[0])
    return math.prod(out) if out is not None else 0


def zero_handle(inputs, outputs) -> int:
    return 0


#: traced op name -> handle. fvcore names custom autograd functions
#: ``prim::PythonOp.<class name>``.
HANDLES = {
    "prim::PythonOp._QuantConv2d": _conv_macs,
    "prim::PythonOp._QuantLinear": _linear_macs,
    "aqd_binary::conv2d": _binary_kernel_macs,
    "aten::_int_mm": _int_mm_macs,
    "quantized::conv2d": _conv_macs,
    "quantized::conv2d_relu": _conv_macs,
    "aten::batch_norm": _batch_norm_macs,
}
#: ops that are deliberately not counted (fake quantization, elementwise glue)
IGNORED = (
    "prim::PythonOp.", "aten::abs", "aten::mean", "aten::add", "aten::add_", "aten::mul",
    "aten::mul_", "aten::sub", "aten::div", "aten::relu", "aten::relu_", "aten::sigmoid",
    "aten::pad", "aten::constant_pad_nd", "aten::where", "aten::ge", "aten::copysign",
    "aten::max_pool2d", "aten::cat", "aten::flatten", "aten::reshape", "aten::view",
    "torchvision::roi_align", "aten::quantize_per_tensor", "aten::dequantize",
)


# ==== tracing ==================================================================================
class DenseDetector(nn.Module):
    """The traceable dense part of a detectron2 detector (see module docstring)."""

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


