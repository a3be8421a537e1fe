"""MACs, binarization ratio, equivalent FLOP (paper 003 eq. 1) and model size (paper 004
Tables I-II) of any model, float or converted: a report over aqd_d2's one counting core,
:func:`aqd_d2.analysis.model_stats.analyze_model`, so ``tools/equivalent_flops.py`` and
``tools/analyze_model.py`` give the same numbers for the same model and input.

* ``M``: multiply-accumulates of every conv (incl. transposed and depthwise) and linear layer
  for one forward pass (``out elements x (C_in / groups) x k_h x k_w`` for a conv, ``in
  elements x (C_out / groups) x k_h x k_w`` for a transposed conv, ``out elements x
  in_features`` for a linear layer: fvcore's count). Norms are not MACs (they are float
  FLOPs of their own in the analysis).
* binary MACs: MACs of quantized layers whose weight AND input are both 1-bit (XNOR-popcount
  operations). Binary-weight-only layers (BWN) are not binary MACs.
* ``r_b = binary MACs / M`` and equivalent FLOP ``M r_b / 64 + M (1 - r_b)`` (eq. 1: one
  64-bit operation computes 64 binary MACs).
* model size: the storage rule of :mod:`aqd_d2.analysis.storage` (quantized weights at their
  bits plus the scale they store; everything else float32). In MB = 2**20 bytes.

Detectron2 detectors are counted through their traced dense part (backbone, heads, the ROI
head on ``MODEL.RPN.POST_NMS_TOPK_TEST`` boxes), as in the analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import nn

from aqd_d2.layers import QuantLayerMixin

from .storage import MB, parameter_storage_bytes

__all__ = ["ComplexityReport", "count_macs", "equivalent_flops", "model_equivalent_flops",
           "model_size_bytes", "model_size_mb", "is_binary_layer", "report_from_stats"]


def is_binary_layer(m: nn.Module) -> bool:
    """True for a quantized layer whose weights and inputs are both binarized right now."""
    if not isinstance(m, QuantLayerMixin):
        return False
    qs = dict(m.quantizers())
    return all(
        r in qs and qs[r].is_enabled and qs[r].bits == 1 for r in ("weight", "activation")
    )


@dataclass
class ComplexityReport:
    """Per-layer MACs and the totals of paper 003 sec. 4.1."""

    layer_macs: Dict[str, int] = field(default_factory=dict)
    binary_layers: set = field(default_factory=set)
    size_bytes: float = 0.0
    #: the :class:`~aqd_d2.analysis.model_stats.ModelStats` this report is a view of
    stats: Optional[Any] = field(default=None, repr=False)

    @property
    def macs(self) -> int:
        """M: all MACs."""
        return sum(self.layer_macs.values())

    @property
    def binary_macs(self) -> int:
        return sum(v for k, v in self.layer_macs.items() if k in self.binary_layers)

    @property
    def binarization_ratio(self) -> float:
        """r_b = binary MACs / M (0 for a model without MACs)."""
        return self.binary_macs / self.macs if self.macs else 0.0

    @property
    def equivalent_flops(self) -> float:
        """Eq. 1: ``M r_b / 64 + M (1 - r_b)``."""
        return equivalent_flops(self.macs, self.binarization_ratio)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB

    def summary(self) -> Dict[str, float]:
        return {"MACs": self.macs, "binary_MACs": self.binary_macs,
                "r_b": self.binarization_ratio, "equivalent_FLOP": self.equivalent_flops}


def report_from_stats(stats) -> ComplexityReport:
    """The eq. 1 view of a :class:`~aqd_d2.analysis.model_stats.ModelStats`."""
    layers = [r for r in stats.layers if r.type != "(other)" and not r.is_norm]
    return ComplexityReport(layer_macs={r.name: r.macs for r in layers},
                            binary_layers={r.name for r in layers if r.is_binary},
                            size_bytes=stats.storage_bytes, stats=stats)


def count_macs(model: nn.Module, inputs: Any, num_proposals: Optional[int] = None,
               trace: Optional[Any] = None) -> ComplexityReport:
    """Count the MACs of one forward pass per layer (in eval mode, restored afterwards).

    Args:
        model: any module, or a detectron2 detector (its dense part is traced).
        inputs: an input tensor, an input shape, or a list of detectron2 input dicts.
        num_proposals: ROI-head boxes per image for R-CNN models (default: the test-time
            top-k of the RPN).
        trace: an earlier analysis' ``ModelStats.trace`` of the same architecture (reused).
    Returns:
        a :class:`ComplexityReport` (layers called several times are summed).
    """
    from .model_stats import analyze_model

    return report_from_stats(analyze_model(model, inputs, num_proposals=num_proposals, trace=trace))


def equivalent_flops(macs: float, binarization_ratio: float) -> float:
    """Paper 003 eq. 1: ``M r_b / 64 + M (1 - r_b)`` (the single place of the formula;
    :mod:`aqd_d2.analysis.model_stats` uses it too)."""
    return macs * binarization_ratio / 64.0 + macs * (1.0 - binarization_ratio)


def model_equivalent_flops(model: nn.Module, inputs: Any) -> Dict[str, float]:
    """``{"MACs", "binary_MACs", "r_b", "equivalent_FLOP"}`` of one forward pass of any
    model (detectron2 meta-architectures included)."""
    return count_macs(model, inputs).summary()


def model_size_bytes(model: nn.Module, inputs: Any = None) -> float:
    """Storage of the parameters by aqd_d2's storage rule (:mod:`aqd_d2.analysis.storage`).

    Args:
        model: any module.
        inputs: when given, the model is traced (as :func:`count_macs`) and parameters of
            modules the inference does not call (training-only branches) are left out, as in
            the analysis; without, every parameter counts.
    """
    if inputs is not None:
        from .model_stats import analyze_model

        return float(analyze_model(model, inputs).storage_bytes)
    return parameter_storage_bytes(model)


def model_size_mb(model: nn.Module, inputs: Any = None) -> float:
    """:func:`model_size_bytes` in MB (2**20 bytes)."""
    return model_size_bytes(model, inputs) / MB
