"""Exact references for the deploy tests, so that they hold on every CPU.

A deployed layer is compared with its source layer computed *exactly*: the quantized operands
are the quantizers' grid values ``codes * step + offset`` (their ``encode``, the codes the
model uses) evaluated in float64, and the convolution / product, bias and norm run in
float64 too. Every product of two float32 values is exact in float64 and a float64 sum of a
few thousand of them is within about 1e-13 of the true value, so the reference does not
depend on which float32 kernel (oneDNN's AVX-512 or AVX2 convolution, ATen's GEMM, their
summation order) ran the model. The deployed layer must then be within the float32 rounding
that *its own* arithmetic can produce, a bound derived from the operations, not measured,
elementwise:

    |deployed - exact| <= gamma(n + c) * mag,    gamma(k) = k u / (1 - k u)

``u = 2^-24`` is float32's unit roundoff; ``mag`` bounds the sum of the magnitudes of the
terms that enter the output; ``n`` the length of the float32 dot product the deployed layer
accumulates (0 for the integer paths: binary popcounts and int8 GEMMs accumulate exactly in
integers, only their epilogue rounds, a few operations per term), ``c`` =
:data:`EPILOGUE_ROUNDINGS` for the epilogue and the folded constants. For float32 sums this is
the classical a-priori bound (Higham's gamma_n: any summation order, with or without FMA),
so no kernel crosses it; for the integer paths it is 16 ulps of ``mag``, far below what one
wrong code changes (one input step times one weight: about 1e5 u * mag in
tests/export/test_deploy.py's layers).

Why the grid values and not the fake-quantized tensors: ``Q_w(W)`` is ``codes * step +
offset`` rounded to float32, and with a large offset (an 8-bit LSQ grid: offset -128 step)
that rounding is an ulp of the *offset*, many ulps of the weight; the int8 kernel computes
with the codes and is closer to the grid than the fake-quantized tensor is.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

U = 2.0 ** -24  # float32 unit roundoff
EPILOGUE_ROUNDINGS = 16  # c above: epilogue FMAs, folded scale / shift / bias rounded to float32

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _enabled(q: Optional[nn.Module]) -> bool:
    """As ``QuantLayerMixin._active``: a present, enabled quantizer."""
    if q is None:
        return False
    return bool(q.is_enabled) if hasattr(q, "is_enabled") else bool(getattr(q, "enabled", True))


@torch.no_grad()
def grid_values(q: Optional[nn.Module], t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, bound)`` float64: the exact grid values ``codes * step + offset`` that the
    quantizer ``q`` (eval mode) gives ``t`` (from ``q.encode``; ``t`` itself for no / a disabled
    quantizer; ``q(t)`` for one without an integer encoding), and a bound of the grid's
    magnitude shaped like ``step`` (``|values|`` elementwise where there is no grid): twice
    (the largest ``|grid point|`` + ``step``), which bounds both parts the int8 kernels split a
    value into, ``step (code - 2^(k-1))`` and the shift ``offset + step 2^(k-1)``."""
    if not _enabled(q) or t.numel() == 0:
        v = t.detach().double()
        return v, v.abs()
    try:
        codes, step, offset = q.encode(t)
    except NotImplementedError:
        v = q(t).detach().double()
        return v, v.abs()
    step, offset = step.detach().double(), offset.detach().double()
    values = codes.double() * step + offset
    top = offset + step * float(2 ** int(q.bits) - 1)
    return values, 2 * (torch.maximum(offset.abs(), top.abs()) + step.abs())


@torch.no_grad()
def exact_conv(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
               pad_value: float = 0.0, wmag: Optional[torch.Tensor] = None,
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y, mag)`` float64: ``conv2d(pad(x, pad_value), w) + bias`` (``w`` 4-D) or
    ``linear(x, w) + bias`` (``w`` 2-D), and ``mag``, the same product of ``|x|`` and
    ``wmag`` (a bound of ``|w|`` broadcastable to it; None: no ``mag``) plus ``|bias|``."""
    x64, w64 = x.detach().double(), w.detach().double()
    if w64.dim() == 2:
        op = F.linear
    else:
        ph, pw = _pair(padding)
        if ph or pw:
            x64 = F.pad(x64, (pw, pw, ph, ph), mode="constant", value=float(pad_value))
        geometry = (_pair(stride), 0, _pair(dilation), groups)
        op = lambda a, b: F.conv2d(a, b, None, *geometry)  # noqa: E731
    y = op(x64, w64)
    mag = None if wmag is None else op(x64.abs(), wmag.double().expand_as(w64).contiguous())
    if bias is not None:
        b = bias.detach().double().view((1, -1, 1, 1) if w64.dim() == 4 else (-1,))
        y = y + b
        mag = None if mag is None else mag + b.abs()
    return y, mag


def _norm_act(layer: nn.Module, y: torch.Tensor, mag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``layer.norm`` (a float64 copy; a per-channel affine map in eval mode: BN, FrozenBN)
    and ``layer.activation`` (ReLU-like, 1-Lipschitz: the bound carries over) on ``y``;
    ``mag`` becomes ``(mag + |running mean|) |scale| + |shift|``: float32 BN subtracts the
    mean first, a folded BN rounds its scale and shift."""
    norm = getattr(layer, "norm", None)
    if norm is not None:
        n64 = copy.deepcopy(norm).double().eval()
        probe = torch.zeros((1, y.shape[1]) + (1,) * (y.dim() - 2), dtype=torch.float64)
        shift = n64(probe)
        scale = n64(probe + 1) - shift
        mean = getattr(norm, "running_mean", None)
        mean = torch.zeros_like(shift) if mean is None else mean.detach().double().view_as(shift)
        y = n64(y)
        mag = (mag + mean.abs()) * scale.abs() + (shift + mean * scale).abs()
    act = getattr(layer, "activation", None)
    if act is not None:
        y = act(y)
    return y, mag


def _check_layer(layer: nn.Module) -> None:
    if getattr(layer, "scales_activations", False):
        raise NotImplementedError("XNOR's activation scale K is not part of this reference")
    if getattr(layer, "padding_mode", "zeros") != "zeros" or isinstance(getattr(layer, "padding", 0), str):
        raise NotImplementedError("only numeric zero padding (with the quantizer's padding value)")


def _geometry(layer: nn.Module) -> dict:
    if layer.weight.dim() == 2:
        return {}
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


@torch.no_grad()
def fake_quant_exact(layer: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(exact output, mag)`` float64 of a fake-quantized ``QConv2d`` / ``QLinear`` on ``x``:
    the grid values of its input and weight (:func:`grid_values`), then conv / linear (padded
    with the input quantizer's padding value), bias, norm and activation in float64; ``mag``
    from ``|x|`` and the weight grid's bound per output channel (the float weight's largest
    ``|w|``, doubled, when the weight is not quantized)."""
    _check_layer(layer)
    xq, _ = grid_values(layer.input_quantizer, x)
    wq, wbound = grid_values(layer.weight_quantizer, layer.weight)
    per_channel = wbound.expand_as(wq).reshape(wq.shape[0], -1).amax(1)
    wmag = per_channel.view((-1,) + (1,) * (wq.dim() - 1))
    if not _enabled(layer.weight_quantizer):
        wmag = 2 * wmag
    pad_value = float(layer.input_padding_value)
    y, mag = exact_conv(xq, wq, layer.bias, pad_value=pad_value, wmag=wmag, **_geometry(layer))
    return _norm_act(layer, y, mag)


@torch.no_grad()
def float_exact(layer: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(exact output, mag, n)`` for a float ``nn.Conv2d`` (detectron2's, with norm and
    activation) or ``nn.Linear`` on ``x``: float64, ``mag`` from ``|x|`` and ``|W|``, ``n``
    the dot-product length (input channels per group x kernel taps)."""
    _check_layer(layer)
    y, mag = exact_conv(x, layer.weight, layer.bias, wmag=layer.weight.detach().abs(), **_geometry(layer))
    y, mag = _norm_act(layer, y, mag)
    return y, mag, layer.weight[0].numel()


def float_terms(deployed: nn.Module) -> int:
    """``n`` for a deployed layer: the length of the float32 dot product it accumulates. 0
    for the binary and int8 modules (exact integer sums); the fan-in for a layer left as a
    float conv / linear (e.g. a frozen fake-quant weight with the BN folded in)."""
    if isinstance(deployed, (nn.Conv2d, nn.Linear)):
        return deployed.weight[0].numel()
    return 0


def assert_within(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, n: int, what: str = "") -> float:
    """``|out - ref| <= gamma(n + c) * mag`` elementwise (module docstring). Returns the largest
    ``|out - ref| / (u * mag)``: how many float32 roundings of the terms the error amounts to."""
    assert out.shape == ref.shape, (what, tuple(out.shape), tuple(ref.shape))
    k = n + EPILOGUE_ROUNDINGS
    bound = mag * (k * U / (1 - k * U))
    err = (out.double() - ref).abs()
    bad = err > bound
    worst = float((err / (U * mag).clamp_min(1e-300)).max()) if err.numel() else 0.0
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the float32 rounding bound; "
        f"max |diff| {float(err.max()):.3g}, worst {worst:.3g} u*mag (allowed {k})")
    return worst


@torch.no_grad()
def exact_conv_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s (a ``QConv2d`` / ``QLinear``) forward with its conv / linear of the grid
    values plus bias computed exactly and rounded once to float32; its norm and activation
    are its own float32 modules, as in the model."""
    _check_layer(layer)
    xq, _ = grid_values(layer.input_quantizer, x)
    wq, _ = grid_values(layer.weight_quantizer, layer.weight)
    y = exact_conv(xq, wq, layer.bias, pad_value=float(layer.input_padding_value),
                   **_geometry(layer))[0].float()
    if layer.norm is not None:
        y = layer.norm(y)
    if layer.activation is not None:
        y = layer.activation(y)
    return y


class ExactQuantizedConvs:
    """Context manager: inside it, every ``QConv2d`` / ``QLinear`` of ``model`` with a quantizer
    computes :func:`exact_conv_forward` (a forward hook replaces its output): the
    fake-quantized model whose quantized sums do not depend on a float kernel's summation
    order. ``layers``: those layers."""

    def __init__(self, model: nn.Module):
        from aqd_d2.layers import QConv2d, QLinear

        self.layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))
                       and (_enabled(m.weight_quantizer) or _enabled(m.input_quantizer))]
        self.handles = []

    def __enter__(self) -> "ExactQuantizedConvs":
        self.handles = [m.register_forward_hook(lambda mod, inp, out: exact_conv_forward(mod, inp[0]))
                        for m in self.layers]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
