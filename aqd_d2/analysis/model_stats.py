"""Complexity of a (quantized) model: parameters, storage at real bit widths, MACs, FLOPs,
binary operations (BOPs), equivalent FLOPs and the binarization ratio, per layer and in total.

This is aqd_d2's one counting core: ``tools/analyze_model.py`` prints it,
:mod:`aqd_d2.analysis.equivalent_flops` (paper 003's eq. 1 report, ``tools/equivalent_flops.py``)
is a view of the same rows, so the two can never disagree. Rules (the conventions of the
binary-detection papers):

* **MACs** of every conv / linear layer come from fvcore's ``FlopCountAnalysis`` (one
  multiply-add = one "flop"), only the layer's own conv / linear op: a norm inside
  detectron2's ``Conv2d(norm=...)`` is **not** part of the conv's MACs (fvcore's
  ``by_module`` adds children into their parent; here the norm is subtracted and gets its
  own row). Quantized layers run as custom autograd functions (``prim::PythonOp._QuantConv2d``
  / ``_QuantLinear``) and the deployed binary conv as ``aqd_binary::conv2d``; the handles of
  :mod:`aqd_d2.analysis.tracing` count them like fvcore's conv / linear. Fake-quantization
  nodes and XNOR's activation-scale arithmetic are not counted (deployment folds them).
* **Norms** (BN, SyncBN, FrozenBN, GN, LN) are rows of their own and always float: an
  inference BN is one multiply-add per output element (``y = x a + b`` after folding), GN /
  LN as fvcore counts them. Their FLOPs are float FLOPs even behind a binary conv.
* **FLOPs** are MACs (paper convention: BiDet and Bi-Real count ResNet-18 at 1.8 GFLOPs, its
  MAC count) of every layer that is *not* quantized on both sides, plus the norms, plus
  whatever else fvcore counts (upsampling, pooling, ...: the ``(other)`` row). A binary-weight
  layer with float activations (BWN, TWN 2/32) still needs float additions: it counts as FLOPs.
* **BOPs** of a layer with both weight and input quantized (``w_bits``, ``a_bits`` < 32):
  ``MACs * w_bits * a_bits`` (binary: ``MACs``).
* **Equivalent FLOPs**: BiDet's ``FLOPs + BOPs / 64`` (``equivalent_flops``), and paper 003's
  eq. 1 ``M r_b / 64 + M (1 - r_b)`` with ``M`` all conv/linear MACs and ``r_b`` the share of
  binary MACs (``equivalent_flops_eq1``; k-bit layers count as non-binary there, and only
  conv/linear MACs enter M).
* **Binarization ratio** ``r_b``: binary (1-bit weight and 1-bit input) MACs over all
  conv/linear MACs (paper 003, sec. 4.1); ``binary_param_ratio`` is the same over weights.
* **Storage**: :mod:`aqd_d2.analysis.storage` (quantized weights at their bits plus the scale
  they store: Xnor / BWN / Bi-Real per channel, TWN per tensor, BNN / DoReFa none; everything
  else float32; buffers not counted). MB = 2**20 bytes.
* **Inference only**: parameters of modules the traced inference never calls (BiDet's
  log-variance branches, dropped at inference by paper 000 sec. 3.1.3; AutoBiDet's complexity
  estimator; a knowledge-transfer teacher) are not counted; ``excluded_params`` and a note
  name them.
* Deployed models (:func:`aqd_d2.export.deploy.convert_for_inference`) count like the
  fake-quantized model: the binary kernel op and the int8 GEMM (``aten::_int_mm``) have
  handles, packed/int8 weight buffers count as the parameters they replace.

Detectron2 meta-architectures are traced through their dense part
(:class:`aqd_d2.analysis.tracing.DenseDetector`: backbone, heads, RPN head, the ROI box head on
``num_proposals`` boxes per image); post-processing is not counted.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from fvcore.nn import FlopCountAnalysis
from tabulate import tabulate
from torch import nn

from .storage import (FLOAT_BITS, MB, is_compute_layer, is_norm_layer, layer_bits,
                      layer_storage, top_level)
from .tracing import HANDLES, IGNORED, DenseDetector, input_tensor, is_detectron2_detector, zero_handle

__all__ = ["LayerStats", "ModelStats", "Trace", "analyze_model", "layer_bits", "FLOAT_BITS"]


# ==== the trace ================================================================================
@dataclass
class Trace:
    """fvcore's counts of one forward (names relative to the model): the part of the analysis
    that depends on the architecture and the input only, not on precision (a quantized layer
    counts the MACs of the float one). :func:`analyze_model` returns it in ``ModelStats.trace``
    and reuses one given back for a model of the same architecture (same conv / linear
    layers), e.g. the precision variants of one detector.

    Attributes:
        by_module: counted ops per module (children included, fvcore's ``by_module``).
        total: all counted ops.
        uncalled: modules the forward did not call.
        compute_layers: names of the conv / linear layers (checked on reuse).
        input_shape: the traced input's shape.
        num_proposals: RoIs per image of an R-CNN (None otherwise).
    """

    by_module: Dict[str, int]
    total: int
    uncalled: set
    compute_layers: Tuple[str, ...]
    input_shape: Tuple[int, ...]
    num_proposals: Optional[int] = None


# ==== results ==================================================================================
@dataclass
class LayerStats:
    """One conv/linear layer, one norm layer (``w_bits = a_bits = 32``, ``macs = 0``, its ops
    in ``flops``), or the ``(other)`` row: everything else."""

    name: str
    type: str
    w_bits: int
    a_bits: int
    params: int
    storage_bytes: float
    macs: int
    bops: int
    flops: int

    is_norm: bool = False

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
    #: FLOPs of the norm layers (inside ``flops``)
    norm_flops: int = 0
    #: parameters of modules the inference does not call (not in ``params`` / storage)
    excluded_params: int = 0
    #: fvcore's counts this analysis used (reusable for the same architecture)
    trace: Optional[Trace] = field(default=None, repr=False)

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
        layer_params = sum(r.params for r in self.layers if r.type != "(other)" and not r.is_norm)
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
            "norm_flops": self.norm_flops, "excluded_params": self.excluded_params,
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
            ("FLOPs (float layers + norms + other)", f"{self.flops / 1e9:.4f} G"),
            ("  of which norms", f"{self.norm_flops / 1e9:.4f} G"),
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


def _trace(model: nn.Module, x: torch.Tensor, num_proposals: Optional[int],
           compute: Tuple[str, ...]) -> Trace:
    """fvcore's counts of ``model`` (its dense part for a detectron2 detector) on ``x``."""
    was_training = model.training
    model.eval()
    try:
        if num_proposals is not None:  # a detectron2 detector: its dense part
            target: nn.Module = DenseDetector(model, int(num_proposals))
            prefix = "model."
        else:
            target, prefix = model, ""
        fa = FlopCountAnalysis(target, (x,))
        fa.set_op_handle(**HANDLES)
        fa.set_op_handle(**{k: zero_handle for k in IGNORED if not k.endswith(".")})
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = {k[len(prefix):] if k.startswith(prefix) else k: int(v) for k, v in fa.by_module().items()}
        total = int(fa.total())
        uncalled = {n[len(prefix):] for n in fa.uncalled_modules() if n.startswith(prefix)}
    finally:
        model.train(was_training)
    return Trace(by_module=by_module, total=total, uncalled=uncalled, compute_layers=compute,
                 input_shape=tuple(x.shape), num_proposals=num_proposals)


# ==== the API ==================================================================================
@torch.no_grad()
def analyze_model(
    model: nn.Module,
    inputs: Union[Sequence[int], torch.Tensor, List[Dict[str, Any]]] = (3, 320, 320),
    num_proposals: Optional[int] = None,
    trace: Optional[Trace] = None,
) -> ModelStats:
    """Count parameters, storage, MACs, FLOPs, BOPs of ``model`` (rules: module docstring).

    Args:
        model: any ``nn.Module`` (called as ``model(x)``), or a detectron2 detector (its
            dense part is traced, see :mod:`aqd_d2.analysis.tracing`). Not modified; it is
            run in eval mode and its mode restored.
        inputs: an input shape (``(C, H, W)`` or ``(N, C, H, W)``; random values), an input
            tensor, or a detectron2 batch (list of dicts; preprocessed by the model).
        num_proposals: ROI-head boxes per image for R-CNN models; default
            ``model.proposal_generator.post_nms_topk[False]`` (the test-time number).
        trace: fvcore's counts of a model of the same architecture at the same input
            (``ModelStats.trace`` of an earlier call): not traced again.
    Returns:
        :class:`ModelStats` with one row per conv/linear layer and per norm layer (in module
        order) and a ``(other)`` row for the parameters and counted ops outside them.
    Raises:
        ValueError: ``trace`` is of another architecture or input.
    """
    x = input_tensor(model, inputs)
    notes: List[str] = []
    rcnn = is_detectron2_detector(model)
    if rcnn and num_proposals is None:
        pg = getattr(model, "proposal_generator", None)
        num_proposals = int(pg.post_nms_topk[False]) if pg is not None and hasattr(pg, "post_nms_topk") else 1000
    compute = tuple(top_level([n for n, m in model.named_modules() if is_compute_layer(m)]))
    if rcnn:
        notes.append("traced backbone + heads (no post-processing)"
                     + (f"; ROI box head on {num_proposals} boxes/image"
                        if getattr(model, "roi_heads", None) is not None else ""))
    if trace is None:
        trace = _trace(model, x, num_proposals if rcnn else None, compute)
    elif (trace.compute_layers, trace.input_shape, trace.num_proposals) != (
            compute, tuple(x.shape), num_proposals if rcnn else None):
        raise ValueError("analyze_model: the given trace is of another architecture or input "
                         f"({len(trace.compute_layers)} vs {len(compute)} conv/linear layers, input "
                         f"{trace.input_shape} vs {tuple(x.shape)}, RoIs {trace.num_proposals})")
    by_module, total_counted, uncalled = trace.by_module, trace.total, trace.uncalled
    modules = dict(model.named_modules())
    # layers the inference never calls (and modules holding only such layers): training-only
    # branches. A quantizer is "uncalled" too (its conv calls its kernel), but holds no layer.
    # A container whose children are called one by one is not called itself (QuickNet's
    # scales): a module is unused when nothing in it was called.
    active = set()  # called modules and every module around one
    for c in set(modules) - uncalled:
        parts = c.split(".")
        active.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    unused = top_level([n for n in modules if n and n not in active
                        and any(is_compute_layer(c) for c in modules[n].modules())])
    unused_ids = {id(p) for n in unused for p in modules[n].parameters()}
    excluded = sum(p.numel() for p in {id(p): p for n in unused for p in modules[n].parameters()}.values())
    if excluded:
        notes.append(f"{excluded:,} parameters of modules not called at inference are not "
                     f"counted: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}")

    def macs_of(name: str) -> int:
        return int(by_module.get(name, 0))

    compute = top_level([n for n, m in modules.items() if is_compute_layer(m)])
    norms = top_level([n for n, m in modules.items() if is_norm_layer(m)])
    order = {n: i for i, n in enumerate(modules)}
    counted_ids: set = set(unused_ids)
    rows: List[LayerStats] = []
    for name in sorted(compute + norms, key=order.__getitem__):
        m = modules[name]
        if name in unused or any(name.startswith(u + ".") for u in unused):
            continue
        if name in norms:
            own = [p for p in m.parameters() if id(p) not in counted_ids]
            counted_ids.update(id(p) for p in own)
            rows.append(LayerStats(
                name=name, type=type(m).__name__, w_bits=FLOAT_BITS, a_bits=FLOAT_BITS,
                params=sum(p.numel() for p in own),
                storage_bytes=float(sum(p.numel() * p.element_size() for p in own)),
                macs=0, bops=0, flops=macs_of(name), is_norm=True))
            continue
        wb, ab = layer_bits(m)
        inner_norms = [n for n in norms if n.startswith(name + ".")]
        norm_ids = {id(p) for n in inner_norms for p in modules[n].parameters()}
        own = [p for p in m.parameters() if id(p) not in counted_ids and id(p) not in norm_ids]
        counted_ids.update(id(p) for p in own)
        params, storage = layer_storage(m, own)
        macs = macs_of(name) - sum(macs_of(n) for n in inner_norms)
        if getattr(m, "has_sum_column", False):  # int8 GEMM's receptive-field-sum column
            macs = macs // (m.out_channels + 1) * m.out_channels
        quantized = wb < FLOAT_BITS and ab < FLOAT_BITS
        rows.append(LayerStats(
            name=name, type=type(m).__name__, w_bits=wb, a_bits=ab, params=params,
            storage_bytes=storage, macs=macs, bops=macs * wb * ab if quantized else 0,
            flops=0 if quantized else macs,
        ))
    other_params = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in counted_ids]
    layer_macs = sum(r.macs for r in rows if not r.is_norm)
    norm_flops = sum(r.flops for r in rows if r.is_norm)
    other_flops = max(total_counted - layer_macs - norm_flops, 0)
    rows.append(LayerStats(
        name="(other)", type="(other)", w_bits=FLOAT_BITS, a_bits=FLOAT_BITS,
        params=sum(p.numel() for p in other_params),
        storage_bytes=float(sum(p.numel() * p.element_size() for p in other_params)),
        macs=0, bops=0, flops=other_flops,
    ))
    return ModelStats(
        layers=rows,
        params=sum(r.params for r in rows),
        storage_bytes=sum(r.storage_bytes for r in rows),
        float_storage_bytes=float(sum(r.params for r in rows) * 4),
        macs=layer_macs,
        binary_macs=sum(r.macs for r in rows if r.is_binary and not r.is_norm),
        flops=sum(r.flops for r in rows),
        bops=sum(r.bops for r in rows),
        binary_params=sum(r.params for r in rows if r.is_binary and r.type != "(other)" and not r.is_norm),
        input_shape=tuple(x.shape),
        other_flops=other_flops,
        notes=notes,
        norm_flops=norm_flops,
        excluded_params=excluded,
        trace=trace,
    )
