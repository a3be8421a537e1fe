"""Binary (1-bit) quantizers: ``bnn``, ``xnor``, ``bwn``, ``bireal``.

Conventions shared by all of them:

* ``sign(0) = +1`` (:func:`~.functional.binary_sign`), so outputs are strictly two-valued.
* Binary *activation* quantizers have ``padding_value = -1``: a conv's zero padding would
  insert 0, which is not a binary value; deployed XNOR/popcount kernels store -1 as bit 0
  and pad with it, so the float simulation pads the quantized input with -1 to match.
* Encoding: ``codes = 1{x >= 0}`` (uint8 0/1), ``decode = codes * step + offset`` with
  ``step = 2, offset = -1`` (plain sign) or ``step = 2 alpha, offset = -alpha`` (scaled
  sign, alpha per output channel, shape ``(C_out, 1, ..., 1)``). Both are exact in floating
  point (``2a - a = a`` exactly), which is why the forward may compute ``+-1`` / ``+-alpha``
  directly (``copysign``) and still equal ``decode(*encode(x))`` bit for bit.
* Memory: each quantizer is one autograd node saving only its input (see
  :mod:`.functional`); the per-channel scale is recomputed in backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .base import Quantizer
from .functional import (
    Grads,
    QuantKernel,
    approx_sign_derivative,
    binary_sign,
    clipped_ste_grad,
    masked_grad,
)
from .registry import register_quantizer

__all__ = [
    "SignKernel",
    "ScaledSignKernel",
    "BinaryQuantizer",
    "XNORQuantizer",
    "BinaryWeightQuantizer",
    "BiRealQuantizer",
    "channel_mean_abs",
    "xnor_activation_scale",
]

IntPair = Union[int, Tuple[int, int]]


def channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """``mean |W|`` per output channel (dim 0), shape ``(C_out, 1, ..., 1)``; a 0-d tensor
    for tensors with fewer than 2 dims (per-tensor scale)."""
    if w.dim() < 2:
        return w.abs().mean()
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


@dataclass(frozen=True)
class SignKernel(QuantKernel):
    """``binary_sign(x)`` in {-1, +1}; no params.

    Args:
        grad: ``"clipped"``: BNN's clipped STE, ``1{|x| <= 1}`` (Hubara et al. 2016);
            ``"approx"``: Bi-Real's ApproxSign derivative ``2 - 2|x|`` on ``[-1, 1)``, 0
            elsewhere (Liu et al. 2018, Sec. 3.2).
    """

    grad: str = "clipped"

    def grid(self, x: torch.Tensor):
        step = torch.full((), 2.0, dtype=x.dtype, device=x.device)  # a fill: no host->device copy
        return (x >= 0).to(x.dtype), step, torch.full_like(step, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binary_sign(x)  # == codes * 2 - 1 exactly

    def forward_with_state(self, x, params, want_output=True):
        return (binary_sign(x) if want_output else None), None

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        if self.grad == "approx":
            d = approx_sign_derivative(x)
            return (grad_y.mul_(d) if overwrite_grad else grad_y * d,)
        return (clipped_ste_grad(grad_y, x, out=grad_y if overwrite_grad else None),)


@dataclass(frozen=True)
class ScaledSignKernel(QuantKernel):
    """``alpha * sign(W)`` with ``alpha = mean|W|`` per output channel (XNOR-Net / BWN,
    paper 004 eq. 2: ``alpha* = ||W||_1 / n``, ``B* = sign(W)``, n = elements per filter).

    Args:
        grad: ``"paper"``: the gradient XNOR-Net gives and paper 004 (Sec. III-A) restates,
            ``dC/dW = dC/dW~ * (1/n + alpha * 1{|W| <= 1})`` (elementwise; it is the exact
            derivative with the cross terms of alpha's dependence on the other weights
            dropped). ``"magnitude"``: Bi-Real-Net's magnitude-aware gradient (Liu et al.
            2018, Sec. 3.3), ``dC/dW = dC/dW_b * alpha * 1{|W| < 1}`` (alpha a constant).
    """

    grad: str = "paper"

    def grid(self, w: torch.Tensor):
        alpha = channel_mean_abs(w)
        return (w >= 0).to(w.dtype), 2.0 * alpha, -alpha

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.forward_with_state(w, ())[0]

    def forward_with_state(self, w, params, want_output=True):
        # copysign(alpha, w + 0) = +-alpha with sign(0) = +1; == codes * 2 alpha - alpha
        # exactly. One weight-sized allocation: |W| is reused for the output. State: alpha.
        buf = w.abs()
        alpha = buf.mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() >= 2 else buf.mean()
        y = torch.add(w, 0.0, out=buf)
        return torch.copysign(alpha.expand_as(w), y, out=y), alpha

    def backward(self, w, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        alpha = channel_mean_abs(w) if state is None else state
        if self.grad == "magnitude":  # alpha * 1{|W| < 1}
            gx = masked_grad(grad_y, w, -1.0, 1.0, out=grad_y if overwrite_grad else None)
            return (gx.mul_(alpha),)
        # 1/n + alpha * 1{|W| <= 1}, as one factor
        n = w[0].numel() if w.dim() >= 2 else w.numel()
        factor = clipped_ste_grad(alpha.expand_as(w), w).add_(1.0 / n)
        return (grad_y.mul_(factor) if overwrite_grad else grad_y * factor,)


class _BinaryBase(Quantizer):
    """1-bit quantizer: validates ``bits == 1``; binary activations pad with -1."""

    allowed_bits = (1,)
    weight_kernel: QuantKernel = SignKernel("clipped")
    activation_kernel: QuantKernel = SignKernel("clipped")

    def __init__(self, bits: int = 1, role: str = "weight"):
        super().__init__(bits, role)
        self.kernel = self.weight_kernel if role == "weight" else self.activation_kernel

    @property
    def padding_value(self) -> float:
        return -1.0 if self.role == "activation" else 0.0


@register_quantizer("bnn")
class BinaryQuantizer(_BinaryBase):
    """BNN (Hubara et al. 2016): ``sign`` for weights and activations, clipped STE
    ``1{|x| <= 1}``. Encoding: codes {0,1}, ``step = 2``, ``offset = -1`` (0-d)."""


@register_quantizer("xnor")
class XNORQuantizer(_BinaryBase):
    """XNOR-Net (Rastegari et al. 2016).

    Weights: ``mean|W|_c * sign(W)`` per output channel, gradient as the paper gives it
    (:class:`ScaledSignKernel`, ``grad="paper"``). Activations: ``sign`` with the clipped
    STE. Encoding: weights ``step = 2 alpha``, ``offset = -alpha`` (shape (C_out,1,...));
    activations ``step = 2``, ``offset = -1``.

    Args:
        bits: must be 1.
        role: ``"weight"`` or ``"activation"``.
        scale_activations: (activations) ask the conv layer to multiply its output by
            XNOR's per-pixel scale ``K`` (:func:`xnor_activation_scale`); default False.
    """

    weight_kernel = ScaledSignKernel("paper")

    def __init__(self, bits: int = 1, role: str = "weight", scale_activations: bool = False):
        super().__init__(bits, role)
        self.scale_activations = bool(scale_activations) and role == "activation"

    def activation_scale(self, x: torch.Tensor, kernel_size, stride, padding, dilation=1):
        """:func:`xnor_activation_scale` of the float input ``x`` (see there)."""
        return xnor_activation_scale(x, kernel_size, stride, padding, dilation)

    def extra_repr(self) -> str:
        extra = ", scale_activations=True" if self.scale_activations else ""
        return super().extra_repr() + extra


@register_quantizer("bwn")
class BinaryWeightQuantizer(_BinaryBase):
    """Binary-weight network (paper 004 eq. 2, XNOR-Net's BWN): ``mean|W|_c * sign(W)`` per
    output channel with the paper's gradient ``g * (1/n + alpha 1{|W| <= 1})``; role weight
    only (activations stay float). Encoding: ``step = 2 alpha``, ``offset = -alpha``."""

    roles = ("weight",)
    weight_kernel = ScaledSignKernel("paper")


@register_quantizer("bireal")
class BiRealQuantizer(_BinaryBase):
    """Bi-Real-Net (Liu et al. 2018): activations ``sign`` with the ApproxSign gradient
    (Sec. 3.2); weights ``mean|W|_c * sign(W)`` with the magnitude-aware gradient
    ``alpha * 1{|W| < 1}`` (Sec. 3.3). Encoding as :class:`XNORQuantizer`."""

    weight_kernel = ScaledSignKernel("magnitude")
    activation_kernel = SignKernel("approx")


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def xnor_activation_scale(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """XNOR-Net's per-pixel input scale ``K = A * k`` (Rastegari et al. 2016, Sec. 3.2).

    ``A = mean_c |x|`` and ``k`` is a ``kh x kw`` box filter of value ``1/(kh kw)`` applied
    with the conv's geometry, so ``K[n, 0, i, j]`` is the mean ``|x|`` over the receptive
    field of output pixel (i, j); padded positions count as 0. The binary conv output is
    multiplied by ``K`` (and by the per-channel weight scale). Differentiable by autograd
    (the exact derivative; the paper does not prescribe one).

    Args:
        x: float input, shape (N, C, H, W).
        kernel_size, stride, dilation: int or (h, w), as for the conv.
        padding: int, ``(ph, pw)`` as for ``nn.Conv2d``, or ``(left, right, top, bottom)``
            as for ``F.pad``.
    Returns:
        K, shape (N, 1, H_out, W_out).
    """
    kh, kw = _pair(kernel_size)
    a = x.abs().mean(dim=1, keepdim=True)
    if isinstance(padding, int):
        padding = (padding, padding)
    if len(padding) == 2:
        pad2 = _pair(tuple(padding))
    else:
        a = F.pad(a, tuple(int(p) for p in padding), value=0.0)
        pad2 = (0, 0)
    k = a.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
    return F.conv2d(a, k, None, _pair(stride), pad2, _pair(dilation))
