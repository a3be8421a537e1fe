"""One forward pass, counted per layer: the measuring instrument of
:func:`~aqd_d2.analysis.model_stats.analyze_model`.

Every module call is seen by forward hooks and every ATen op by a ``TorchDispatchMode``, so
nothing depends on how a layer computes (fake-quantized custom autograd functions, deployed C++
kernels, int8 GEMMs) and no JIT trace is built (fast: the test over every config runs in
seconds).

* **conv / linear layers** (:func:`~aqd_d2.analysis.storage.is_compute_layer`, the outermost
  one when layers nest): MACs from the layer's geometry and its output, per call (a shared head
  called per level adds up): ``numel(out) * C_in / groups * k_h * k_w`` for a conv (fvcore's
  count), ``numel(in) * C_out / groups * k_h * k_w`` for a transposed conv, ``numel(out) *
  in_features`` for a linear layer. Ops inside the layer (the quantizers, XNOR's
  activation-scale box filter, padding) are not counted.
* **norms** (:func:`~aqd_d2.analysis.storage.is_norm_layer`): batch norms (BN, SyncBN,
  FrozenBN) one multiply-add per output element (``y = x a + b`` after folding the statistics
  at inference); GroupNorm / LayerNorm / InstanceNorm ``5 * numel`` (4 without affine), fvcore's
  estimate, as their statistics are computed at inference.
* **other ops** outside those layers: fvcore's set: conv and matrix products
  (``convolution``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``; einsum / matmul reach them) as
  MACs, batch / group / layer norm as above, ``upsample_nearest2d`` / ``upsample_bilinear2d`` /
  ``grid_sampler_2d`` ``numel(out)``, ``_adaptive_avg_pool2d`` ``numel(in)``. Elementwise glue,
  pooling, RoIAlign and NMS are not counted.
* **called**: names of the modules the pass called (the layers it never calls are
  training-only: BiDet's log-variance branches, AutoBiDet's estimator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Set

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .storage import is_compute_layer, is_norm_layer

__all__ = ["OpCounts", "count_ops", "layer_macs"]

aten = torch.ops.aten


@dataclass
class OpCounts:
    """Counts of one forward pass (names relative to the counted module).

    Attributes:
        layer_macs: MACs per conv / linear layer (outermost layers only).
        norm_flops: FLOPs per norm layer.
        other_flops: counted ops outside layers and norms.
        called: names of every module that was called.
    """

    layer_macs: Dict[str, int] = field(default_factory=dict)
    norm_flops: Dict[str, int] = field(default_factory=dict)
    other_flops: int = 0
    called: Set[str] = field(default_factory=set)


def _first_tensor(obj) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


def _pair_prod(k) -> int:
    return math.prod(k) if isinstance(k, (tuple, list)) else int(k) * int(k)


def layer_macs(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one call of a conv / linear layer (fake-quantized, deployed or float).

    Args:
        m: the layer; ``x`` its input, ``out`` its output.
    Returns:
        the multiply-accumulates (0 for a module without a known geometry).
    """
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return x.numel() * (m.out_channels // m.groups) * _pair_prod(m.kernel_size)
    if hasattr(m, "kernel_size") and hasattr(m, "in_channels") and not getattr(m, "linear", False):
        groups = int(getattr(m, "groups", 1))
        return out.numel() * (int(m.in_channels) // groups) * _pair_prod(m.kernel_size)
    n_in = getattr(m, "in_features", None) or getattr(m, "in_channels", None)
    return out.numel() * int(n_in) if n_in else 0


def _norm_flops(m: nn.Module, out: torch.Tensor) -> int:
    from detectron2.layers import FrozenBatchNorm2d

    if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        return out.numel()
    affine = getattr(m, "weight", None) is not None
    return out.numel() * (5 if affine else 4)


def _conv_op(args, kwargs, out) -> int:
    """``convolution(x, w, b, stride, pad, dilation, transposed, ...)``: MACs as a layer's."""
    w, transposed = args[1], bool(args[6]) if len(args) > 6 else False
    return (args[0] if transposed else out).numel() * math.prod(w.shape[1:])


def _mm_op(args, kwargs, out) -> int:
    a = args[-2] if len(args) >= 3 else args[0]
    return out.numel() * a.shape[-1]


def _out_numel(args, kwargs, out) -> int:
    return _first_tensor(out).numel()


def _in_numel(args, kwargs, out) -> int:
    return args[0].numel()


def _gn_ln(args, kwargs, out) -> int:
    return _first_tensor(out).numel() * 5


_OTHER_OPS: Dict[Any, Callable] = {
    aten.convolution: _conv_op,
    aten.mm: _mm_op, aten.addmm: _mm_op, aten.bmm: _mm_op, aten.baddbmm: _mm_op,
    aten.native_batch_norm: _out_numel,
    aten._native_batch_norm_legit_no_training: _out_numel,
    aten.native_group_norm: _gn_ln, aten.native_layer_norm: _gn_ln,
    aten.upsample_nearest2d: _out_numel, aten.upsample_bilinear2d: _out_numel,
    aten.grid_sampler_2d: _out_numel, aten._adaptive_avg_pool2d: _in_numel,
}


class _OtherOps(TorchDispatchMode):
    """Counts :data:`_OTHER_OPS` while no layer / norm is on the module stack."""

    def __init__(self, inside: Callable[[], bool]):
        super().__init__()
        self.inside = inside
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fn = _OTHER_OPS.get(func.overloadpacket)
        if fn is not None and not self.inside():
            self.flops += int(fn(args, kwargs or {}, out))
        return out


@torch.no_grad()
def count_ops(module: nn.Module, *inputs) -> OpCounts:
    """Run ``module(*inputs)`` once and count it (module doc). The caller sets eval mode.

    Args:
        module: the module to run (e.g. :class:`~aqd_d2.analysis.tracing.DenseDetector`).
        inputs: its arguments.
    Returns:
        :class:`OpCounts` with names relative to ``module``.
    """
    names = {id(m): n for n, m in module.named_modules()}
    kinds = {}
    for n, m in module.named_modules():
        kinds[id(m)] = "layer" if is_compute_layer(m) else ("norm" if is_norm_layer(m) else "")
    counts = OpCounts()
    stack: List[nn.Module] = []

    def pre(m, args):
        if id(m) in names:
            stack.append(m)
            counts.called.add(names[id(m)])

    def post(m, args, out):
        if id(m) not in names:
            return
        if stack and stack[-1] is m:
            stack.pop()
        kind = kinds[id(m)]
        if not kind or any(kinds[id(s)] == kind for s in stack):
            return  # not counted, or inside a layer / norm of its kind (a deployed layer's conv)
        y = _first_tensor(out)
        x = _first_tensor(args)
        if y is None:
            return
        name = names[id(m)]
        if kind == "layer":
            counts.layer_macs[name] = counts.layer_macs.get(name, 0) + layer_macs(m, x, y)
        else:
            counts.norm_flops[name] = counts.norm_flops.get(name, 0) + _norm_flops(m, y)

    def inside() -> bool:
        return any(kinds[id(s)] in ("layer", "norm") for s in stack)

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post, always_call=True)
    mode = _OtherOps(inside)
    try:
        with mode:
            module(*inputs)
    finally:
        h1.remove()
        h2.remove()
    counts.other_flops = mode.flops
    return counts
