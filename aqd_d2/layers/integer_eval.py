"""Eval-mode integer arithmetic of quantized layers: the arithmetic of the deployed kernels.

A fake-quantized layer computes ``conv(Q_x(x), Q_w(W))`` in float32: products of real-valued
grid points summed in whatever order the float kernel (oneDNN AVX2 / AVX-512, MKL, cuDNN)
chooses. The deployed kernels (:mod:`aqd_d2.export`) sum the *integer codes* exactly (popcount,
int32 accumulators) and apply the scales afterwards. Both are the same function in real
arithmetic, but their float32 roundings differ by about 1e-6 relative, and a value that lands
near a quantizer threshold of the next layer flips one code: the detections of the deployed
model then differ from those of the trained model (issue 19: 23 detections instead of 20,
binary Faster R-CNN top-20 agreeing on 81 of 120).

So in eval mode, without autograd, a qualifying :class:`~aqd_d2.layers.QConv2d` /
:class:`~aqd_d2.layers.QLinear` computes what the deployed kernel computes:

* **binary** (1-bit weight ``alpha * sign(W)`` and 1-bit input ``sign(x)`` padded with -1, no
  XNOR scale K): ``D = conv(pad(sign(x), -1), sign(W))`` summed exactly (a float conv of +-1
  values: every partial sum is an integer below 2**24), then ``y = D * alpha' + b'`` (a float32
  multiply, then a float32 add: the C++ kernel's epilogue, ``csrc/binary_conv.cpp``);
* **k-bit** (weight grid ``w = s_w c_w + o_w``, per channel, at most 8 bits; input grid
  ``x = s_x (c_x - z)`` containing 0, 2..8 bits): ``A = conv(c_x - z, c_w - 2^(k-1))`` and, where
  the weight grid is not symmetric about 0, ``S = conv(c_x - z, 1)``, summed exactly (float32 where
  the largest possible sum is below 2**24, else float64, rounded once to float32 as the int32
  accumulator is), then ``y = fma(A, s_w' s_x, b')`` and ``y = fma(S, o_w' s_x, y)``:
  :func:`int8_epilogue`, the very function the deployed :class:`~aqd_d2.export.Int8ConvInference`
  runs (its C++ kernel is tested bit-identical to it).

``alpha'``, ``s_w'``, ``o_w'`` and ``b'`` have the layer's eval-mode batch norm folded in (BN
follows the conv directly, ``y = x * a + b`` per channel with ``(a, b)`` read off the norm's own
forward, :func:`aqd_d2.export.bn_affine.eval_affine`): :func:`binary_constants` and
:func:`int8_constants`, shared with the deployment. A norm that cannot be folded (group norm,
multi-level BN, a linear layer's norm) is applied as a module afterwards, as in the deployed
model.

Everything that reaches a quantizer of the deployed model is then bit-identical to what reaches
it in the trained model, so every binary and k-bit activation code is the same and the
detections are the same (tests/export/test_deployed_equals_trained.py).

Not used (the fake-quant float path runs): in training mode; when autograd records (eval-mode
forward with gradients, e.g. an adversarial probe); under autocast; while the JIT tracer runs (fvcore's FLOP
count sees the fake-quant graph); for layers that do not qualify (XNOR's K, float inputs,
per-channel activation steps, grouped k-bit convs with an asymmetric weight grid, non-"zeros"
padding modes); for CUDA tensors unless ``MODEL.QUANT.INTEGER_EVAL`` is ``on`` (the deployed
kernels are CPU kernels; on a GPU the fused fake-quant path is faster and cuDNN's algorithms do
not promise exact integer sums).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INTEGER_EVAL_CHOICES", "IntegerPlan", "binary_constants", "fold_norm", "int8_constants",
    "int8_epilogue", "integer_forward", "integer_plan", "kernel_memory_format",
]

#: values of MODEL.QUANT.INTEGER_EVAL / ``Quantizer.integer_eval``
INTEGER_EVAL_CHOICES = ("auto", "on", "off")
#: the largest integer every partial sum of a float32 accumulation holds exactly
_F32_EXACT = 1 << 24

Encoding = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # codes, step, offset, bits


# ==== constants shared with the deployment ======================================================
def fold_norm(layer: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(a, b)`` (float32 ``[O]``) with ``layer.norm(y) == y * a + b``, read off the norm's own
    eval-mode forward, or None where the norm is not folded (no norm, training mode, not a
    batch norm with running statistics, a linear layer, non-finite values)."""
    from aqd_d2.export.bn_affine import eval_affine, is_affine_norm

    norm = getattr(layer, "norm", None)
    if norm is None or isinstance(layer, nn.Linear) or not is_affine_norm(norm):
        return None
    if getattr(norm, "training", False):
        return None
    probe = norm if norm.weight.device.type == "cpu" else copy.deepcopy(norm).cpu()
    a, b = eval_affine(probe)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    return a, b


def binary_constants(alpha: torch.Tensor, bias: Optional[torch.Tensor],
                     bn: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """``(alpha', bias')`` of the binary epilogue ``y = D * alpha' + bias'`` (float32 ``[O]``;
    ``bias'`` None when there is neither bias nor norm): ``alpha * a`` and ``bias * a + b``."""
    alpha = alpha.detach().float().reshape(-1)
    bias = None if bias is None else bias.detach().float().reshape(-1)
    if bn is None:
        return alpha, bias
    a, b = bn[0].to(alpha), bn[1].to(alpha)
    return alpha * a, (b.clone() if bias is None else bias * a + b)


def int8_constants(step: torch.Tensor, offset: torch.Tensor, bits: int, out_channels: int,
                   bias: Optional[torch.Tensor], bn: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """``(w_scale, w_shift, bias', has_sum)`` of the k-bit epilogue (:func:`int8_epilogue`), float32
    ``[O]``, computed in float64: ``w_scale = s_w a``, ``w_shift = (o_w + s_w 2^(k-1)) a``,
    ``bias' = bias a + b`` (``a = 1, b = 0`` without a folded norm); ``has_sum``: the weight grid
    is not symmetric about 0 (``w_shift != 0``), so the receptive-field sum ``S`` is needed."""
    o, half = int(out_channels), 1 << (int(bits) - 1)
    step = step.detach().double().reshape(-1).expand(o)
    offset = offset.detach().double().reshape(-1).expand(o)
    wscale, wshift = step, offset + step * half
    has_sum = bool((wshift != 0).any())
    bias_d = bias.detach().double().reshape(-1) if bias is not None else torch.zeros(o, dtype=torch.float64, device=step.device)
    if bn is not None:  # (s_w A + o'_w S) s_x + b, then * a + b_bn
        a, b = bn[0].double().to(step.device), bn[1].double().to(step.device)
        wscale, wshift, bias_d = wscale * a, wshift * a, bias_d * a + b
    return wscale.float(), wshift.float(), bias_d.float(), has_sum


def int8_epilogue(acc: torch.Tensor, w_scale: torch.Tensor, w_shift: torch.Tensor,
                  bias: torch.Tensor, sx: torch.Tensor, has_sum: bool) -> torch.Tensor:
    """``y = fma(A, w_scale * s_x, bias)``, then ``y = fma(S, w_shift * s_x, y)`` with a sum column.

    Args:
        acc: float32 ``[M, O (+1)]``, exact integers (``A``, then ``S`` as the last column).
        sx: the input step (0-d float32).
    Returns:
        float32 ``[M, O]``.
    """
    o = w_scale.numel()
    if has_sum:
        y = torch.addcmul(bias, acc[:, :o], w_scale * sx)
        y.addcmul_(acc[:, o:], w_shift * sx)
        return y
    return torch.addcmul(bias, acc, w_scale * sx)


# ==== the plan of one layer =====================================================================
@dataclass
class IntegerPlan:
    """How one layer computes in integer form (:func:`integer_plan`)."""

    kind: str  # "binary" or "kbit"
    weight: torch.Tensor  # +-1 signs, or codes - 2^(k-1) (+ an all-ones row): [O(+1), C/g, ...]
    dtype: torch.dtype  # accumulation dtype: float32 where exact, else float64
    norm: Optional[nn.Module]  # the norm still to apply (None: folded or absent)
    alpha: Optional[torch.Tensor] = None  # binary
    bias: Optional[torch.Tensor] = None  # binary: bias' or None; k-bit: bias'
    w_scale: Optional[torch.Tensor] = None  # k-bit
    w_shift: Optional[torch.Tensor] = None
    has_sum: bool = False
    a_bits: int = 0


def _active(q) -> bool:
    return q is not None and bool(q.is_enabled if hasattr(q, "is_enabled") else getattr(q, "enabled", True))


def _weight_encoding(layer: nn.Module) -> Optional[Encoding]:
    """The layer's weight codes: the frozen ones of a deployed fallback layer
    (``layer.integer_encoding``, set by :func:`aqd_d2.export.convert_for_inference`), else its
    active weight quantizer's ``encode``; None for float weights or quantizers without one."""
    enc = getattr(layer, "integer_encoding", None)
    if enc is not None:
        return enc
    wq = getattr(layer, "weight_quantizer", None)
    if not _active(wq) or int(wq.bits) > 8 or getattr(wq, "kernel", None) is None:
        return None
    codes, step, offset = wq.encode(layer.weight)
    return codes, step, offset, int(wq.bits)


def integer_plan(layer: nn.Module, encoding: Optional[Encoding] = None) -> Optional[IntegerPlan]:
    """The integer form of ``layer`` (eval mode), or None where it does not qualify (module
    docstring).

    Args:
        layer: a ``QConv2d`` or ``QLinear``.
        encoding: ``(codes, step, offset, bits)`` of the weight to use instead of the layer's
            (:func:`aqd_d2.export.load_for_inference` passes a packed file's).
    """
    iq = layer.input_quantizer
    if not _active(iq) or getattr(iq, "kernel", None) is None or getattr(iq, "scale_activations", False):
        return None
    conv = not isinstance(layer, nn.Linear)
    if conv and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return None
    enc = encoding if encoding is not None else _weight_encoding(layer)
    if enc is None:
        return None
    codes, step, offset, wbits = enc
    a_bits, o = int(iq.bits), int(layer.weight.shape[0])
    groups = layer.groups if conv else 1
    taps = int(layer.weight[0].numel())  # (C / groups) * KH * KW, or C
    pad_value = float(getattr(iq, "padding_value", 0.0))
    dev = layer.weight.device
    bn = fold_norm(layer)
    norm = None if bn is not None else getattr(layer, "norm", None)
    shape = layer.weight.shape
    codes = codes.to(dev).reshape(shape)
    if wbits == 1 and a_bits == 1:
        alpha = (-offset.detach().float()).reshape(-1).expand(o).to(dev)
        if pad_value != -1.0 or not torch.equal(step.detach().float().reshape(-1).expand(o).to(dev), 2 * alpha):
            return None  # not a (scaled) sign on both sides
        dtype = torch.float32 if taps <= _F32_EXACT else torch.float64
        alpha, bias = binary_constants(alpha, layer.bias, bn)
        return IntegerPlan("binary", codes.to(dtype) * 2 - 1, dtype, norm, alpha=alpha, bias=bias, a_bits=1)
    if not (2 <= a_bits <= 8) or pad_value != 0.0 or wbits > 8:
        return None
    half = 1 << (wbits - 1)
    w_scale, w_shift, bias, has_sum = int8_constants(step, offset, wbits, o, layer.bias, bn)
    if has_sum and groups != 1:
        return None  # the receptive-field sum would be per group
    w = codes.to(torch.float64) - half
    if has_sum:
        w = torch.cat([w, torch.ones_like(w[:1])], 0)
    # |c_x - z| < 2^a_bits and |c_w - 2^(k-1)| <= 2^(k-1): the largest possible sum
    bound = taps * ((1 << a_bits) - 1) * half
    dtype = torch.float32 if bound <= _F32_EXACT else torch.float64
    return IntegerPlan("kbit", w.to(dtype), dtype, norm, bias=bias.to(dev), w_scale=w_scale.to(dev),
                       w_shift=w_shift.to(dev), has_sum=has_sum, a_bits=a_bits)


def _stamp(layer: nn.Module) -> Optional[Tuple[Any, ...]]:
    """What the plan depends on: each tensor's identity and version counter (None where a
    tensor has no version counter: inference tensors; then nothing is cached)."""
    tensors = [layer.weight, layer.bias]
    for q in (layer.weight_quantizer, layer.input_quantizer):
        if q is not None:
            tensors += [q.enabled, *q.quant_params()]
    norm = getattr(layer, "norm", None)
    if isinstance(norm, nn.Module):
        tensors += list(norm.parameters()) + list(norm.buffers())
    try:
        key = tuple(None if t is None else (id(t), t._version) for t in tensors)
    except RuntimeError:
        return None
    return key + (id(getattr(layer, "integer_encoding", None)), id(norm),
                  bool(getattr(norm, "training", False)), layer.weight.device)


def _cached_plan(layer: nn.Module) -> Optional[IntegerPlan]:
    stamp = _stamp(layer)
    cached = layer.__dict__.get("_integer_plan")
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    plan = integer_plan(layer)
    layer.__dict__["_integer_plan"] = (stamp, plan) if stamp is not None else None
    return plan


def _wanted(layer: nn.Module, x: torch.Tensor) -> bool:
    """Integer form for this call (module docstring: eval mode, no autograd, no tracer, and
    the device / ``integer_eval`` setting of the input quantizer)."""
    iq = layer.input_quantizer
    if layer.training or iq is None or not x.is_floating_point() or x.numel() == 0:
        return False
    mode = getattr(iq, "integer_eval", "auto")
    if mode == "off" or (mode == "auto" and x.device.type != "cpu"):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return False
    if _autocast(x.device.type):  # mixed precision asked for: the fake-quant path honours it
        return False
    return True


def _autocast(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the deployed binary kernel gives its output for input ``x``
    (``csrc/binary_conv.cpp``): channels_last where ``x`` is channels_last and not also
    contiguous, else contiguous. (A float layer after a conv may round differently on the
    other layout, so both models must agree on it.)"""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _padding4(layer: nn.Module) -> Tuple[int, int, int, int]:
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def integer_forward(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The layer's output (norm and activation applied) in integer form, or None where the
    layer or this call does not qualify (the caller then runs the fake-quant path)."""
    if not _wanted(layer, x):
        return None
    plan = _cached_plan(layer)
    if plan is None:
        return None
    conv = not isinstance(layer, nn.Linear)
    iq = layer.input_quantizer
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    codes, sx, offset = iq.encode(x)
    if plan.kind == "binary":
        xs = codes.to(plan.dtype) * 2 - 1  # +-1: the input codes' signs
        with torch.backends.nnpack.flags(enabled=False):  # NNPACK's Winograd is not exact
            if conv:
                if any(_padding4(layer)):
                    xs = F.pad(xs, _padding4(layer), value=-1.0)
                d = F.conv2d(xs, plan.weight, None, layer.stride, 0, layer.dilation, layer.groups)
            else:
                d = F.linear(xs, plan.weight)
        d = d.float()
        view = (1, -1, 1, 1) if conv else (-1,)
        y = d * plan.alpha.view(view)
        if plan.bias is not None:
            y = y + plan.bias.view(view)
        if conv:  # x's memory format, as the deployed binary kernels return it
            y = y.contiguous(memory_format=kernel_memory_format(x))
    else:
        if sx.numel() != 1:
            return None  # a per-channel activation step: no single integer grid
        sx = sx.reshape(())
        zero = int(torch.round(-offset.reshape(()) / sx))
        xi = codes.to(plan.dtype) - zero if zero else codes.to(plan.dtype)
        o = int(layer.weight.shape[0])
        with torch.backends.nnpack.flags(enabled=False):
            if conv:
                acc = F.conv2d(xi, plan.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
                n, _, oh, ow = acc.shape
                acc2d = acc.permute(0, 2, 3, 1).reshape(-1, acc.shape[1])
            else:
                lead = xi.shape[:-1]
                acc2d = F.linear(xi.reshape(-1, xi.shape[-1]), plan.weight)
        y2d = int8_epilogue(acc2d.float().contiguous(), plan.w_scale, plan.w_shift, plan.bias, sx, plan.has_sum)
        y = y2d.view(n, oh, ow, o).permute(0, 3, 1, 2) if conv else y2d.reshape(*lead, o)
    if plan.norm is not None:
        y = plan.norm(y)
    act = getattr(layer, "activation", None)
    if act is not None:
        y = act(y)
    return y
