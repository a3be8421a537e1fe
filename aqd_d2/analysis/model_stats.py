"""Complexity of a (quantized) model: parameters, storage at real bit widths, MACs, FLOPs,
binary operations (BOPs), equivalent FLOPs and the binarization ratio, per layer and in total.

Counting rules (the conventions of the binary-detection papers):

* **MACs** of every conv / linear layer come from fvcore's ``FlopCountAnalysis`` (which counts
  one multiply-add as one "flop"). The quantized layers run as custom autograd functions
  (``aqd_d2.quantization.fused``: ``prim::PythonOp._QuantConv2d`` / ``_QuantLinear`` in the
  traced graph) and the deployed binary conv as ``aqd_binary::conv2d``; handles registered
  here count them like fvcore's own conv/linear handles (``MACs = numel(out) * C_in/groups *
  kh * kw``, resp. ``numel(out) * in_features``). The fake-quantization nodes themselves and
  XNOR's activation-scale arithmetic are not counted (deployment folds them into the kernel).
* **FLOPs** are MACs (paper convention: BiDet and Bi-Real count ResNet-18 at 1.8 GFLOPs, which
  is its MAC count) of every layer that is *not* quantized on both sides, plus whatever else
  fvcore counts (batch norm, upsampling, ...). A binary-weight layer with float activations
  (BWN) still needs float additions: it counts as FLOPs.
* **BOPs** of a layer with both weight and input quantized (``w_bits``, ``a_bits`` < 32):
  ``MACs * w_bits * a_bits`` (binary: ``MACs``).
* **Equivalent FLOPs**: BiDet's ``FLOPs + BOPs / 64`` (``equivalent_flops``), and paper 003's
  eq. 1 ``M r_b / 64 + M (1 - r_b)`` with ``M`` all conv/linear MACs and ``r_b`` the share of
  binary MACs (``equivalent_flops_eq1``; k-bit layers count as non-binary there, and only
  conv/linear MACs enter M). Both agree on a model whose quantized layers are all binary
  and has no other counted ops.
* **Binarization ratio** ``r_b``: binary (1-bit weight and 1-bit input) MACs over all
  conv/linear MACs (paper 003, sec. 4.1); ``binary_param_ratio`` is the same over weights.
* **Storage**: every parameter at its real bit width: the weight of a layer with an enabled
  k-bit weight quantizer takes ``numel * k / 8`` bytes, every other parameter (biases, norms,
  float layers, quantizer parameters) its dtype's size. Buffers (BN running statistics) are
  not parameters and are not counted; :func:`aqd_d2.export.packed_size_report` gives the
  size of a whole packed checkpoint. MB = 2**20 bytes.
* Deployed models (:func:`aqd_d2.export.deploy.convert_for_inference`) count like the
  fake-quantized model: the binary kernel op and the int8 GEMM (``aten::_int_mm``) have
  handles, packed/int8 weight buffers count as the parameters they replace, and a layer whose
  weight quantizer was disabled after its weight was decoded from codes (``load_packed``, the
  deploy fallback) counts at that quantizer's bits when every output channel of the weight
  has at most ``2**bits`` distinct values.

Detectron2 meta-architectures cannot be traced as a whole (their inputs are lists of dicts and
their outputs ``Instances``); :func:`analyze_model` traces their dense part instead: the
model's ``dense_forward(x)`` where it has one (aqd_d2's CenterNet, YOLOv2), else backbone,
then the dense head (RetinaNet/FCOS ``head``), the RPN head, and the ROI box head on
``num_proposals`` boxes per image (default ``MODEL.RPN.POST_NMS_TOPK_TEST``, as at test
time). Post-processing (anchor decoding, NMS) is not counted. Any other ``nn.Module`` is
called on the input tensor directly.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from fvcore.nn import FlopCountAnalysis
from tabulate import tabulate
from torch import nn

__all__ = ["LayerStats", "ModelStats", "analyze_model", "layer_bits", "FLOAT_BITS"]

FLOAT_BITS = 32
MB = float(2 ** 20)


# ==== per-layer precision ======================================================================
def _active_bits(q: Optional[nn.Module]) -> int:
    if q is None or not bool(getattr(q, "enabled", True)):
        return FLOAT_BITS
    return int(getattr(q, "bits", FLOAT_BITS))


def layer_bits(module: nn.Module) -> Tuple[int, int]:
    """``(weight bits, input bits)`` of a layer: its enabled quantizers' bits, 1/1 for a
    deployed binary conv (``weight_words`` buffer), the ``w_bits``/``a_bits`` attributes of
    deployed k-bit modules, else 32/32 (float)."""
    if hasattr(module, "w_bits") and hasattr(module, "a_bits"):
        return int(module.w_bits), int(module.a_bits)
    if isinstance(getattr(module, "weight_words", None), torch.Tensor):
        return 1, 1
    if hasattr(module, "weight_quantizer") or hasattr(module, "input_quantizer"):
        wq = getattr(module, "weight_quantizer", None)
        wb = _active_bits(wq)
        if wb >= FLOAT_BITS and wq is not None and _on_grid(getattr(module, "weight", None), int(wq.bits)):
            wb = int(wq.bits)  # weight already quantized and frozen (load_packed, deploy)
        return wb, _active_bits(getattr(module, "input_quantizer", None))
    return FLOAT_BITS, FLOAT_BITS


def _on_grid(weight: Optional[torch.Tensor], bits: int) -> bool:
    """True when every output channel of ``weight`` takes at most ``2**bits`` distinct values
    (a weight decoded from ``bits``-bit codes, whose quantizer was then disabled)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or bits > 8:
        return False
    rows = weight.detach().reshape(weight.shape[0], -1).sort(dim=1).values
    distinct = (rows.diff(dim=1) != 0).sum(dim=1) + 1
    return bool((distinct <= 2 ** bits).all())


def _is_compute_layer(m: nn.Module) -> bool:
    return (isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) or isinstance(getattr(m, "weight_words", None), torch.Tensor)
            or hasattr(m, "w_bits"))


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


def _zero(inputs, outputs) -> int:
    return 0


#: traced op name -> handle. fvcore names custom autograd functions
#: ``prim::PythonOp.<class name>``.
_HANDLES = {
    "prim::PythonOp._QuantConv2d": _conv_macs,
    "prim::PythonOp._QuantLinear": _linear_macs,
    "aqd_binary::conv2d": _binary_kernel_macs,
    "aten::_int_mm": _int_mm_macs,
    "quantized::conv2d": _conv_macs,
    "quantized::conv2d_relu": _conv_macs,
}
#: ops that are deliberately not counted (fake quantization, elementwise glue)
_IGNORED = (
    "prim::PythonOp.", "aten::abs", "aten::mean", "aten::add", "aten::add_", "aten::mul",
    "aten::mul_", "aten::sub", "aten::div", "aten::relu", "aten::relu_", "aten::sigmoid",
    "aten::pad", "aten::constant_pad_nd", "aten::where", "aten::ge", "aten::copysign",
    "aten::max_pool2d", "aten::cat", "aten::flatten", "aten::reshape", "aten::view",
    "torchvision::roi_align", "aten::quantize_per_tensor", "aten::dequantize",
)


# ==== results ==================================================================================
@dataclass
class LayerStats:
    """One conv/linear layer (or the ``(other)`` row: everything else)."""

    name: str
    type: str
    w_bits: int
    a_bits: int
    params: int
    storage_bytes: float
    macs: int
    bops: int
    flops: int

    @property
    def is_binary(self) -> bool:
        return self.w_bits == 1 and self.a_bits == 1


@dataclass
class ModelStats:
    """Totals and per-layer rows of :func:`analyze_model` (rules in the module docstring)."""

    layers: List[LayerStats]
    params: int
    storage_bytes: float
    float_storage_bytes: float
    macs: int
    binary_macs: int
    flops: int
    bops: int
    binary_params: int
    input_shape: Tuple[int, ...]
    other_flops: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def storage_mb(self) -> float:
        return self.storage_bytes / MB

    @property
    def float_storage_mb(self) -> float:
        return self.float_storage_bytes / MB

    @property
    def compression_ratio(self) -> float:
        """Float32 storage / storage at real bit widths."""
        return self.float_storage_bytes / max(self.storage_bytes, 1e-12)

    @property
    def equivalent_flops(self) -> float:
        """BiDet: ``FLOPs + BOPs / 64``."""
        return self.flops + self.bops / 64.0

    @property
    def binarization_ratio(self) -> float:
        """``r_b``: binary MACs / conv+linear MACs."""
        return self.binary_macs / self.macs if self.macs else 0.0

    @property
    def binary_param_ratio(self) -> float:
        layer_params = sum(r.params for r in self.layers if r.type != "(other)")
        return self.binary_params / layer_params if layer_params else 0.0

    @property
    def equivalent_flops_eq1(self) -> float:
        """Paper 003, eq. 1: ``M r_b / 64 + M (1 - r_b)``."""
        return _equivalent_flop_eq1(self.macs, self.binarization_ratio)

    def summary(self) -> Dict[str, Any]:
        """The totals as a flat dict (also the ``"totals"`` entry of :meth:`to_json`)."""
        return {
            "input_shape": list(self.input_shape), "params": self.params,
            "storage_bytes": self.storage_bytes, "storage_mb": self.storage_mb,
            "float_storage_mb": self.float_storage_mb, "compression_ratio": self.compression_ratio,
            "macs": self.macs, "binary_macs": self.binary_macs, "flops": self.flops,
            "bops": self.bops, "equivalent_flops": self.equivalent_flops,
            "equivalent_flops_eq1": self.equivalent_flops_eq1,
            "binarization_ratio": self.binarization_ratio,
            "binary_param_ratio": self.binary_param_ratio, "other_flops": self.other_flops,
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """JSON text: ``{"totals": {...}, "layers": [{...}, ...], "notes": [...]}``."""
        return json.dumps({"totals": self.summary(), "layers": [asdict(r) for r in self.layers],
                           "notes": self.notes}, indent=indent)

    def table(self, max_rows: Optional[int] = None) -> str:
        """Per-layer table plus totals (text)."""
        def bits(b: int) -> str:
            return "fp" if b >= FLOAT_BITS else str(b)

        rows = [(r.name, r.type, bits(r.w_bits), bits(r.a_bits), f"{r.params:,}",
                 f"{r.storage_bytes / 1024:.1f}", f"{r.macs / 1e6:.2f}", f"{r.bops / 1e6:.2f}",
                 f"{r.flops / 1e6:.2f}") for r in self.layers]
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [("...", f"{len(rows) - max_rows} more", "", "", "", "", "", "", "")]
        head = ("layer", "type", "W", "A", "params", "KiB", "MMACs", "MBOPs", "MFLOPs")
        s = self.summary()
        totals = [
            ("input", "x".join(str(v) for v in self.input_shape)),
            ("params", f"{self.params:,}"),
            ("storage (MB, real bit widths)", f"{s['storage_mb']:.3f}"),
            ("storage if float32 (MB)", f"{s['float_storage_mb']:.3f}  ({s['compression_ratio']:.2f}x)"),
            ("MACs (conv+linear)", f"{self.macs / 1e9:.4f} G"),
            ("FLOPs", f"{self.flops / 1e9:.4f} G"),
            ("BOPs", f"{self.bops / 1e9:.4f} G"),
            ("equivalent FLOPs (BiDet: FLOPs + BOPs/64)", f"{s['equivalent_flops'] / 1e9:.4f} G"),
            ("equivalent FLOPs (paper 003 eq. 1)", f"{s['equivalent_flops_eq1'] / 1e9:.4f} G"),
            ("binarization ratio (MACs / params)",
             f"{s['binarization_ratio']:.4f} / {s['binary_param_ratio']:.4f}"),
        ]
        return (tabulate(rows, headers=head, tablefmt="github") + "\n\n"
                + tabulate(totals, tablefmt="plain"))


def _equivalent_flop_eq1(macs: float, r_b: float) -> float:
    """Paper 003 eq. 1, from its one implementation (:mod:`aqd_d2.analysis.equivalent_flops`)."""
    from .equivalent_flops import equivalent_flops

    return float(equivalent_flops(macs, r_b))


# ==== tracing ==================================================================================
class _DenseDetector(nn.Module):
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
            from detectron2.structures import Boxes

            n, _, h, w = x.shape
            r = self.num_proposals
            # fixed proposal boxes spread over the image (only their number matters)
            t = torch.linspace(0, 1, r, dtype=x.dtype)
            boxes = torch.stack([t * w * 0.5, t * h * 0.5, t * w * 0.5 + w * 0.5, t * h * 0.5 + h * 0.5], 1)
            bf = rh.box_pooler([feats[f] for f in rh.box_in_features], [Boxes(boxes)] * n)
            bf = rh.box_head(bf)
            outs += _flatten(rh.box_predictor(bf))
        return tuple(outs)


def _flatten(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    out: List[torch.Tensor] = []
    for o in obj:
        out += _flatten(o)
    return out


def _is_detectron2_detector(model: nn.Module) -> bool:
    if callable(getattr(model, "dense_forward", None)):
        return True
    return hasattr(model, "backbone") and (
        hasattr(model, "head") or hasattr(model, "proposal_generator") or hasattr(model, "roi_heads"))


def _input_tensor(model: nn.Module, inputs) -> torch.Tensor:
    """A float input tensor from a shape, a tensor or a detectron2 batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs if inputs.dim() == 4 or not _is_detectron2_detector(model) else inputs[None]
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
        return model.preprocess_image(inputs).tensor
    shape = tuple(int(v) for v in inputs)
    if len(shape) == 3 and _is_detectron2_detector(model):
        shape = (1,) + shape
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    if _is_detectron2_detector(model):
        # normalized like preprocess_image would; padded to the backbone's divisibility
        div = int(getattr(getattr(model, "backbone", None), "size_divisibility", 0) or 0)
        if div > 1:
            h, w = shape[-2:]
            x = nn.functional.pad(x, (0, (-w) % div, 0, (-h) % div))
    return x


# ==== the API ==================================================================================
@torch.no_grad()
def analyze_model(
    model: nn.Module,
    inputs: Union[Sequence[int], torch.Tensor, List[Dict[str, Any]]] = (3, 320, 320),
    num_proposals: Optional[int] = None,
) -> ModelStats:
    """Count parameters, storage, MACs, FLOPs, BOPs of ``model`` (rules: module docstring).

    Args:
        model: any ``nn.Module`` (called as ``model(x)``), or a detectron2 detector (its
            backbone and heads are traced, see module docstring). Not modified; it is run in
            eval mode and its mode restored.
        inputs: an input shape (``(C, H, W)`` or ``(N, C, H, W)``; random values), an input
            tensor, or a detectron2 batch (list of dicts; preprocessed by the model).
        num_proposals: ROI-head boxes per image for R-CNN models; default
            ``model.proposal_generator.post_nms_topk[False]`` (the test-time number).
    Returns:
        :class:`ModelStats` with one row per conv/linear layer (in module order) and a
        ``(other)`` row for the parameters and counted ops outside them.
    """
    x = _input_tensor(model, inputs)
    notes: List[str] = []
    was_training = model.training
    model.eval()
    try:
        if _is_detectron2_detector(model):
            if num_proposals is None:
                pg = getattr(model, "proposal_generator", None)
                num_proposals = int(pg.post_nms_topk[False]) if pg is not None and hasattr(pg, "post_nms_topk") else 1000
            target: nn.Module = _DenseDetector(model, num_proposals)
            prefix = "model."
            notes.append("traced backbone + heads (no post-processing)"
                         + (f"; ROI box head on {num_proposals} boxes/image"
                            if getattr(model, "roi_heads", None) is not None else ""))
        else:
            target, prefix = model, ""
        fa = FlopCountAnalysis(target, (x,))
        fa.set_op_handle(**_HANDLES)
        fa.set_op_handle(**{k: _zero for k in _IGNORED if not k.endswith(".")})
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = fa.by_module()
        total_counted = int(fa.total())
    finally:
        model.train(was_training)

    rows: List[LayerStats] = []
    layer_param_ids: set = set()
    counted: List[str] = []
    for name, m in model.named_modules():
        if not _is_compute_layer(m) or any(name.startswith(c + ".") for c in counted):
            continue  # a deployed layer's inner module (e.g. BinaryLinearInference.conv)
        counted.append(name)
        wb, ab = layer_bits(m)
        # parameters of the layer itself (weight, bias) and of its norm / quantizers
        sub = [p for p in m.parameters() if id(p) not in layer_param_ids]
        for p in sub:
            layer_param_ids.add(id(p))
        weight = getattr(m, "weight", None)
        params = sum(p.numel() for p in sub)
        storage = 0.0
        for p in sub:
            if p is weight and wb < FLOAT_BITS:
                storage += p.numel() * wb / 8.0
            else:
                storage += p.numel() * p.element_size()
        # deployed modules keep weight (and bias) as buffers: count them as the parameters
        # they were
        n_w = 0
        if hasattr(m, "weight_words"):
            n_w = m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(getattr(m, "weight_int8", None), torch.Tensor):
            n_w = m.weight_int8.shape[0] * m.out_channels
        if n_w:
            params += n_w
            storage += n_w * wb / 8.0
            bias = getattr(m, "bias", None)
            if bias is None and hasattr(m, "conv"):
                bias = getattr(m.conv, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
                params += bias.numel()
                storage += bias.numel() * 4.0
        macs = int(by_module.get(prefix + name, 0))
        if getattr(m, "has_sum_column", False):  # int8 GEMM's receptive-field-sum column
            macs = macs // (m.out_channels + 1) * m.out_channels
        quantized = wb < FLOAT_BITS and ab < FLOAT_BITS
        rows.append(LayerStats(
            name=name, type=type(m).__name__, w_bits=wb, a_bits=ab, params=params,
            storage_bytes=storage, macs=macs, bops=macs * wb * ab if quantized else 0,
            flops=0 if quantized else macs,
        ))
    other_params = [p for p in model.parameters() if id(p) not in layer_param_ids]
    layer_macs = sum(r.macs for r in rows)
    other_flops = max(total_counted - layer_macs, 0)
    rows.append(LayerStats(
        name="(other)", type="(other)", w_bits=FLOAT_BITS, a_bits=FLOAT_BITS,
        params=sum(p.numel() for p in other_params),
        storage_bytes=float(sum(p.numel() * p.element_size() for p in other_params)),
        macs=0, bops=0, flops=other_flops,
    ))
    float_storage = float(sum(r.params for r in rows) * 4)
    return ModelStats(
        layers=rows,
        params=sum(r.params for r in rows),
        storage_bytes=sum(r.storage_bytes for r in rows),
        float_storage_bytes=float_storage,
        macs=layer_macs,
        binary_macs=sum(r.macs for r in rows if r.is_binary),
        flops=sum(r.flops for r in rows),
        bops=sum(r.bops for r in rows),
        binary_params=sum(r.params for r in rows if r.is_binary and r.type != "(other)"),
        input_shape=tuple(x.shape),
        other_flops=other_flops,
        notes=notes,
    )
