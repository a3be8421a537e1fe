"""MACs, binarization ratio, equivalent FLOP (paper 003 eq. 1) and model size (paper 004
Tables I-II) of any model, float or converted.

* ``M``: multiply-accumulates of every conv (incl. transposed and depthwise) and linear layer
  for one forward pass, counted per layer by forward hooks: ``out elements x (C_in / groups)
  x k_h x k_w`` for a conv (``in elements x (C_out / groups) x k_h x k_w`` for a transposed
  conv), ``out elements x in_features`` for a linear layer. This equals fvcore's
  ``FlopCountAnalysis`` (which counts one "flop" per MAC for these ops; a test checks it) but
  also works on converted layers whose forward runs custom autograd kernels that fvcore's
  tracer cannot see, and attributes every MAC to a named layer.
* binary MACs: MACs of quantized layers whose weight AND input quantizers are both enabled and
  1-bit (XNOR-popcount operations). Binary-weight-only layers (BWN) are not binary MACs.
* ``r_b = binary MACs / M`` and equivalent FLOP ``M r_b / 64 + M (1 - r_b)`` (eq. 1: one
  64-bit operation computes 64 binary MACs).
* model size: float parameters at 32 bits, quantized weights at their bit width (plus one
  float scale per output channel for 1-bit weights), buffers not counted. In MB = 2**20 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from aqd_d2.layers import QuantLayerMixin

__all__ = ["ComplexityReport", "count_macs", "equivalent_flops", "model_equivalent_flops",
           "model_size_bytes", "model_size_mb", "is_binary_layer"]


def _layer_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, _ConvTransposeNd):
        k = 1
        for s in m.kernel_size:
            k *= s
        return inp.numel() * (m.out_channels // m.groups) * k
    if isinstance(m, _ConvNd):
        k = 1
        for s in m.kernel_size:
            k *= s
        return out.numel() * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return 0


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

    def summary(self) -> Dict[str, float]:
        return {"MACs": self.macs, "binary_MACs": self.binary_macs,
                "r_b": self.binarization_ratio, "equivalent_FLOP": self.equivalent_flops}


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any) -> ComplexityReport:
    """Run ``model(inputs)`` once (in eval mode, restored afterwards) and count MACs per layer.

    Args:
        model: any module; detectron2 meta-architectures take ``inputs`` = list of dicts.
        inputs: the forward argument (a tensor, or a list of detectron2 input dicts).
    Returns:
        a :class:`ComplexityReport` (layers called several times are summed).
    """
    report = ComplexityReport()
    handles = []

    def hook(name):
        def fn(m, args, out):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                report.layer_macs[name] = report.layer_macs.get(name, 0) + _layer_macs(m, args[0], out)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
            if is_binary_layer(m):
                report.binary_layers.add(name)
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return report


def equivalent_flops(macs: float, binarization_ratio: float) -> float:
    """Paper 003 eq. 1: ``M r_b / 64 + M (1 - r_b)`` (the single place of the formula;
    :mod:`aqd_d2.analysis.model_stats` uses it too)."""
    return macs * binarization_ratio / 64.0 + macs * (1.0 - binarization_ratio)


def model_equivalent_flops(model: nn.Module, inputs: Any) -> Dict[str, float]:
    """``{"MACs", "binary_MACs", "r_b", "equivalent_FLOP"}`` of one forward pass of any
    model (detectron2 meta-architectures included: the whole forward runs, hooks count)."""
    return count_macs(model, inputs).summary()


def model_size_bytes(model: nn.Module, binary_scale_bits: int = 32) -> float:
    """Storage of the parameters: float 32 bits; weights of quantized layers with an enabled
    k-bit weight quantizer at k bits, 1-bit weights plus one ``binary_scale_bits`` scale per
    output channel. Frozen parameters (e.g. a fixed blur kernel) count as float."""
    bits = 0
    counted = set()
    for _, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            q = dict(m.quantizers()).get("weight")
            if q is not None and q.is_enabled and q.bits < 32:
                w = m.weight
                bits += w.numel() * q.bits
                if q.bits == 1:
                    bits += w.shape[0] * binary_scale_bits
                counted.add(id(w))
    for p in model.parameters():
        if id(p) not in counted:
            bits += p.numel() * 32
    return bits / 8


def model_size_mb(model: nn.Module) -> float:
    """:func:`model_size_bytes` in MB (2**20 bytes)."""
    return model_size_bytes(model) / 2 ** 20

