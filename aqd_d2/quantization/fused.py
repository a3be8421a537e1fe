"""Quantized conv / linear as single autograd nodes that recompute the quantized operands.

``F.conv2d(Q_x(x), Q_w(W))`` written with separate ops keeps *two* activation-sized tensors
alive for backward: the quantizer's input ``x`` (needed for its gradient) and the conv's
input ``Q_x(x)`` (needed for the weight gradient). :func:`quant_conv2d` saves only ``x``,
``W`` and the quantizer parameters, and recomputes ``Q_x(x)`` / ``Q_w(W)`` (elementwise,
cheap next to the conv) in backward, sharing that work with the quantizers' backward
(:meth:`QuantKernel.forward_with_state`). Its saved memory therefore equals the float
conv's, and when ``x`` is a ReLU output (saved by the ReLU anyway) it costs nothing extra.

The results (outputs and gradients) equal the unfused composition: same kernels, same
padding (the input quantizer's ``padding_value``, -1 for binary activations, written around
the quantized input), same STE backward. Under autocast the conv runs in the autocast dtype
exactly as ``F.conv2d`` would, the quantizers in the input's dtype. XNOR's activation scale
``K`` is not part of this op: multiply the output by it afterwards.

Host work. On a GPU these ops are bound by the Python around the kernels, so:

* without autograd (``torch.no_grad()``, inference, or no input requiring grad) the op runs
  directly, with no ``autograd.Function`` (the same computation);
* the fake-quantized *weight* is cached by its quantizer (:meth:`.base.Quantizer.cached_weight`:
  valid while the weight and the quantizer's parameters are the same tensors with the same
  version counters) and reused by later calls and by the backward: inference quantizes each
  weight once, not on every call, and a training step once per layer (a head conv shared by
  five pyramid levels: once, not ten times). The cached tensor is the value the op would
  recompute (same kernel, same inputs), so outputs and gradients are unchanged. Memory: one
  quantized copy of each weight (plus, for eager kernels in training, their backward state);
* ``torch.autocast(enabled=False)`` is entered only where autocast is on.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .base import Quantizer
from .functional import QuantKernel, kernel_backward, widen

__all__ = ["quant_conv2d", "quant_linear"]

_Spec = Optional[Tuple[QuantKernel, Tuple[torch.Tensor, ...]]]
_Pad4 = Optional[Tuple[int, int, int, int]]


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _prepare(q: Optional[Quantizer], t: torch.Tensor) -> _Spec:
    """``(kernel, params)`` of an enabled quantizer (running its data init), else None."""
    if q is None or t.numel() == 0:
        return None
    return q.prepare(t)


def _weight_cache(q: Optional[Quantizer], spec: _Spec) -> Optional[Quantizer]:
    """``q`` where its quantized weight may be cached: an aqd_d2 weight quantizer in use,
    outside ``torch.compile`` tracing."""
    if spec is None or not isinstance(q, Quantizer) or q.role != "weight" or _compiling():
        return None
    return q


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def _needs_graph(tensors) -> bool:
    """True when autograd records an op on ``tensors`` (grad mode on and one requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: only the CUDA query exists
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    except RuntimeError:  # a device type without autocast (e.g. meta)
        pass
    return None


def _no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing for device types that
    have no autocast (meta)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]):
    return t if (t is None or dtype is None) else t.to(dtype)


def _quantize(spec: _Spec, t: torch.Tensor, want_state: bool, pad4: _Pad4 = None,
              value: float = 0.0, out_dtype: Optional[torch.dtype] = None):
    """``(pad(Q(t), value) in out_dtype, state for the quantizer's backward)``. The rounding
    grid is computed in float32 (eager kernels get half-precision ``t`` widened; fused
    kernels widen on load and write ``out_dtype`` directly). (Writing the quantized values
    straight into the interior of a padded buffer measured slower on CPU than one
    contiguous pass plus ``F.pad``: strided writes, and a strided gradient upstream.)"""
    if spec is None:
        y, state = _cast(t, out_dtype), None
    elif spec[0].fused:
        y, state = spec[0].forward_with_state(t, spec[1], True, out_dtype)
    elif want_state:
        y, state = spec[0].forward_with_state(widen(t), spec[1])
        y = _cast(y, out_dtype)
    else:
        y, state = _cast(spec[0].forward(widen(t), *spec[1]), out_dtype), None
    if pad4 is not None:
        y = F.pad(y, pad4, value=value)
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)  # F.pad returns NCHW
    return y, state


def _quantize_weight(spec: _Spec, w: torch.Tensor, want_state: bool,
                     out_dtype: Optional[torch.dtype], cache: Optional[Quantizer]):
    """``_quantize(spec, w, want_state, out_dtype=out_dtype)`` through ``cache``'s cached
    weight (see the module docstring): the stored result when it was computed from these
    very tensors, else computed (with the backward state when ``want_state``) and stored."""
    if cache is None or spec is None:
        return _quantize(spec, w, want_state, out_dtype=out_dtype)
    kernel, params = spec
    hit = cache.cached_weight(kernel, w, params, out_dtype, want_state)
    if hit is not None:
        return hit.y, (hit.state if want_state else None)
    y, state = _quantize(spec, w, want_state, out_dtype=out_dtype)
    cache.cache_weight(kernel, w, params, out_dtype, y, state, want_state)
    return y, state


def _chain(spec: _Spec, t: torch.Tensor, grad, needs: Sequence[bool], state=None):
    """Back through a quantizer: ``(grad_t, grads of params...)``. ``grad`` is ours (fresh
    from the conv backward), so the kernel may overwrite it, unless it is a strided view
    (the interior of a padded gradient): then a fresh contiguous result is better for the
    ops upstream. dL/dt comes back in ``t``'s dtype (see :func:`kernel_backward`)."""
    if spec is None:
        return (grad.to(t.dtype),)
    owned = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
    return kernel_backward(spec[0], t, spec[1], grad, needs, state, overwrite_grad=owned)


def _specs(ctx, params):
    """Rebuild ``(kernel, params)`` pairs saved by a forward."""
    xk, wk = ctx.kernels
    xp, wp = tuple(params[: ctx.nx]), tuple(params[ctx.nx:])
    return (None if xk is None else (xk, xp)), (None if wk is None else (wk, wp))


def _conv_forward(x, w, bias, xspec, wspec, geom, wcache, want_wstate):
    """``conv2d(pad(Q_x(x)), Q_w(W)) + bias`` without autograd (the forward of
    :class:`_QuantConv2d`, and the whole op where no graph is recorded)."""
    stride, pad4, conv_pad, dilation, groups, pad_value = geom
    cdtype = _autocast_dtype(x.device.type)
    if cdtype is None:  # (autocast off: nothing to switch off)
        xq, _ = _quantize(xspec, x, False, pad4, pad_value)
        wq, _ = _quantize_weight(wspec, w, want_wstate, None, wcache)
        return F.conv2d(xq, wq, bias, stride, conv_pad, dilation, groups)
    with _no_autocast(x.device.type):
        xq, _ = _quantize(xspec, x, False, pad4, pad_value, cdtype)
        wq, _ = _quantize_weight(wspec, w, want_wstate, cdtype, wcache)
        return F.conv2d(xq, wq, _cast(bias, cdtype), stride, conv_pad, dilation, groups)


class _QuantConv2d(torch.autograd.Function):
    """Inputs ``(x, w, bias, xspec, wspec, geom, wcache, *params)``; saves ``x, w, *params``.
    ``wcache``: the weight quantizer whose cached quantized weight may be used, or None."""

    @staticmethod
    def forward(ctx, x, w, bias, xspec, wspec, geom, wcache, *params):
        nx = 0 if xspec is None else len(xspec[1])
        # with a cache, compute the weight's backward state now: the backward reuses it
        want_wstate = wcache is not None and any(ctx.needs_input_grad[i] for i in (1, *range(7 + nx, 7 + len(params))))
        y = _conv_forward(x, w, bias, xspec, wspec, geom, wcache, want_wstate)
        ctx.kernels = (None if xspec is None else xspec[0], None if wspec is None else wspec[0])
        ctx.geom, ctx.has_bias, ctx.wcache = geom, bias is not None, wcache
        ctx.cdtype = _autocast_dtype(x.device.type)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.nx = nx
        ctx.save_for_backward(x, w, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, *params = ctx.saved_tensors
        xspec, wspec = _specs(ctx, params)
        stride, pad4, conv_pad, dilation, groups, pad_value = ctx.geom
        need = ctx.needs_input_grad
        need_x, need_w = (need[0], *need[7:7 + ctx.nx]), (need[1], *need[7 + ctx.nx:])
        # recompute the quantized operands (the weight from the cache where still valid),
        # keeping what the quantizers' backward needs
        cd = ctx.cdtype
        xq, xstate = _quantize(xspec, x, any(need_x), pad4, pad_value, cd)
        wq, wstate = _quantize_weight(wspec, w, any(need_w), cd, ctx.wcache)
        gxq, gwq, gb = torch.ops.aten.convolution_backward(
            _cast(gy, cd), xq, wq, [w.shape[0]] if ctx.has_bias else None,
            list(stride), list(conv_pad), list(dilation), False, [0, 0], groups,
            [any(need_x), any(need_w), ctx.has_bias and need[2]],
        )
        del xq, wq
        gx_all: Tuple = (None,) * len(need_x)
        if gxq is not None and xspec is None:
            gxq = gxq.to(x.dtype)
        if gxq is not None:
            if pad4 is not None:
                left, right, top, bottom = pad4
                gxq = gxq[..., top: gxq.shape[-2] - bottom, left: gxq.shape[-1] - right]
            gx_all = _chain(xspec, x, gxq, need_x, xstate)
        gw_all: Tuple = (None,) * len(need_w)
        if gwq is not None:
            gw_all = _chain(wspec, w, gwq, need_w, wstate)
        if gb is not None and ctx.has_bias and gb.dtype != ctx.bias_dtype:
            gb = gb.to(ctx.bias_dtype)
        return (gx_all[0], gw_all[0], gb, None, None, None, None, *gx_all[1:], *gw_all[1:])


def _pad4(padding: Union[int, Sequence[int]]) -> Tuple[int, int, int, int]:
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        ph, pw = int(padding[0]), int(padding[1])
        return (pw, pw, ph, ph)
    left, right, top, bottom = (int(p) for p in padding)
    return (left, right, top, bottom)


def quant_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    input_quantizer: Optional[Quantizer] = None,
    weight_quantizer: Optional[Quantizer] = None,
) -> torch.Tensor:
    """``conv2d(pad(Q_x(x), padding_value), Q_w(W)) + bias`` as one memory-lean autograd node.

    Runs the quantizers' data initialisation when due and honours their ``enabled`` flags
    (a disabled or absent quantizer is the identity; both absent is plain ``F.conv2d``).

    Args:
        x: input (N, C_in, H, W).
        weight: (C_out, C_in / groups, kh, kw); bias: (C_out,) or None.
        stride, dilation: int or pair. groups: int.
        padding: int, ``(ph, pw)`` or ``(left, right, top, bottom)``; filled with the input
            quantizer's ``padding_value`` (0 if there is no enabled input quantizer).
        input_quantizer: role-activation quantizer or None.
        weight_quantizer: role-weight quantizer or None.
    Returns:
        (N, C_out, H_out, W_out).
    """
    xspec = _prepare(input_quantizer, x)
    wspec = _prepare(weight_quantizer, weight)
    left, right, top, bottom = _pad4(padding)
    pad_value = 0.0 if xspec is None else float(input_quantizer.padding_value)
    symmetric = left == right and top == bottom
    if symmetric and (pad_value == 0.0 or not (left or top)):
        pad4, conv_pad = None, (top, left)  # the conv's own zero padding
    else:
        pad4, conv_pad = (left, right, top, bottom), (0, 0)
    if xspec is None and wspec is None:
        xp = x if pad4 is None else F.pad(x, pad4)
        return F.conv2d(xp, weight, bias, stride, conv_pad, dilation, groups)
    geom = (_pair(stride), pad4, conv_pad, _pair(dilation), int(groups), pad_value)
    params = (xspec[1] if xspec else ()) + (wspec[1] if wspec else ())
    wcache = _weight_cache(weight_quantizer, wspec)
    if not _needs_graph((x, weight, bias, *params)):
        return _conv_forward(x, weight, bias, xspec, wspec, geom, wcache, False)
    return _QuantConv2d.apply(x, weight, bias, xspec, wspec, geom, wcache, *params)


def _linear_forward(x, w, bias, xspec, wspec, wcache, want_wstate):
    """``linear(Q_x(x), Q_w(W), bias)`` without autograd (see :func:`_conv_forward`)."""
    cdtype = _autocast_dtype(x.device.type)
    if cdtype is None:
        xq, _ = _quantize(xspec, x, False)
        wq, _ = _quantize_weight(wspec, w, want_wstate, None, wcache)
        return F.linear(xq, wq, bias)
    with _no_autocast(x.device.type):
        xq, _ = _quantize(xspec, x, False, out_dtype=cdtype)
        wq, _ = _quantize_weight(wspec, w, False, cdtype, wcache)
        return F.linear(xq, wq, _cast(bias, cdtype))


class _QuantLinear(torch.autograd.Function):
    """Inputs ``(x, w, bias, xspec, wspec, wcache, *params)``; saves ``x, w, *params``."""

    @staticmethod
    def forward(ctx, x, w, bias, xspec, wspec, wcache, *params):
        nx = 0 if xspec is None else len(xspec[1])
        want_wstate = wcache is not None and any(ctx.needs_input_grad[i] for i in (1, *range(6 + nx, 6 + len(params))))
        y = _linear_forward(x, w, bias, xspec, wspec, wcache, want_wstate)
        ctx.kernels = (None if xspec is None else xspec[0], None if wspec is None else wspec[0])
        ctx.nx, ctx.wcache = nx, wcache
        ctx.cdtype, ctx.has_bias = _autocast_dtype(x.device.type), bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, w, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, *params = ctx.saved_tensors
        xspec, wspec = _specs(ctx, params)
        need = ctx.needs_input_grad
        need_x, need_w = (need[0], *need[6:6 + ctx.nx]), (need[1], *need[6 + ctx.nx:])
        cd, wc = ctx.cdtype, ctx.wcache
        g2 = _cast(gy, cd).reshape(-1, gy.shape[-1])
        gx_all: Tuple = (None,) * len(need_x)
        gw_all: Tuple = (None,) * len(need_w)
        xq, xstate = _quantize(xspec, x, any(need_x), out_dtype=cd)
        if any(need_x):
            wq, _ = _quantize_weight(wspec, w, False, cd, wc)
            gxq = (g2 @ wq).reshape(x.shape)
            del wq
            gx_all = _chain(xspec, x, gxq, need_x, xstate)
        if any(need_w):
            wq, wstate = _quantize_weight(wspec, w, True, None, wc)
            gwq = g2.t() @ xq.reshape(-1, xq.shape[-1])
            gw_all = _chain(wspec, w, gwq, need_w, wstate)
        gb = g2.sum(0) if (ctx.has_bias and need[2]) else None
        if gb is not None and gb.dtype != ctx.bias_dtype:
            gb = gb.to(ctx.bias_dtype)
        return (gx_all[0], gw_all[0], gb, None, None, None, *gx_all[1:], *gw_all[1:])


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    input_quantizer: Optional[Quantizer] = None,
    weight_quantizer: Optional[Quantizer] = None,
) -> torch.Tensor:
    """``linear(Q_x(x), Q_w(W), bias)`` as one memory-lean autograd node (see module doc).

    Args:
        x: (..., in_features); weight: (out_features, in_features); bias: (out,) or None.
        input_quantizer, weight_quantizer: as for :func:`quant_conv2d`.
    Returns:
        (..., out_features).
    """
    xspec = _prepare(input_quantizer, x)
    wspec = _prepare(weight_quantizer, weight)
    if xspec is None and wspec is None:
        return F.linear(x, weight, bias)
    params = (xspec[1] if xspec else ()) + (wspec[1] if wspec else ())
    wcache = _weight_cache(weight_quantizer, wspec)
    if not _needs_graph((x, weight, bias, *params)):
        return _linear_forward(x, weight, bias, xspec, wspec, wcache, False)
    return _QuantLinear.apply(x, weight, bias, xspec, wspec, wcache, *params)
