"""Straight-through-estimator (STE) primitives and the generic fake-quantization Function.

Everything here is pure PyTorch. Two layers of API:

* Elementwise STE primitives (:func:`round_ste`, :func:`sign_ste`, :func:`approx_sign`),
  each a ``torch.autograd.Function`` whose backward is documented on the class and which
  saves at most its input (``round_ste`` saves nothing).
* :class:`QuantKernel` + :func:`fake_quantize`: a quantizer's *whole* forward as one
  ``autograd.Function`` that saves only the input and the (scalar / per-channel)
  quantizer parameters, with the backward written out analytically by the kernel. This keeps
  the autograd graph at one node per quantizer (no saved intermediates such as ``x/alpha``,
  masks or rounded values), which is what makes fake quantization cheap in memory.

Sign convention: ``sign(0) = +1`` everywhere in aqd_d2, so binary outputs are strictly
``{-1, +1}`` (``torch.sign`` would map 0 to 0, a third value). BiDet (paper 000, Sec. 3)
maps 0 to -1; the choice only affects exact zeros and is made once here, in
:func:`binary_sign`.

Rounding: ``torch.round`` rounds half to even (as ``numpy.round``).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "as_scalar",
    "binary_sign",
    "clipped_ste_grad",
    "masked_grad",
    "round_ste",
    "sign_ste",
    "approx_sign",
    "dequantize",
    "QuantKernel",
    "fake_quantize",
    "kernel_backward",
    "widen",
]

Grads = Tuple[Optional[torch.Tensor], ...]


_aten = torch.ops.aten
Scalar = Union[float, torch.Tensor]

# Performance notes (eager CPU, 1M-element float32 tensors): bool masks, ``torch.where``
# and ``masked_fill_`` cost 3-10x a plain float op; multiplying by a 0-d tensor ~3x a
# multiply by a Python number; a freshly allocated large tensor pays page faults that an
# in-place op does not. The kernels therefore build masked gradients with one
# ``hardtanh_backward`` pass (:func:`masked_grad`), reduce with dot products, work in place
# where they own the buffer, and use Python scalars on CPU (:func:`as_scalar`).


def as_scalar(t: torch.Tensor) -> Scalar:
    """A one-element tensor as a Python float on CPU (faster elementwise kernels, exact: the
    value is already rounded to the tensor's dtype); unchanged otherwise (GPU: no sync)."""
    return t.item() if (t.device.type == "cpu" and t.numel() == 1) else t


def scalar_tensor(v: Scalar, like: torch.Tensor) -> torch.Tensor:
    """``v`` as a 0-d tensor with ``like``'s dtype and device (the rounding kernels apply)."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype=like.dtype, device=like.device)
    return torch.full((), v, dtype=like.dtype, device=like.device)  # a fill, not a copy


@functools.lru_cache(maxsize=None)
def _next_float(v: float, dtype: torch.dtype, up: bool) -> float:
    t = torch.tensor(v, dtype=dtype)
    toward = torch.tensor(float("inf") if up else float("-inf"), dtype=dtype)
    return torch.nextafter(t, toward).item()


def masked_grad(
    grad: torch.Tensor,
    x: torch.Tensor,
    lo: float,
    hi: float,
    lo_inclusive: bool = False,
    hi_inclusive: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grad * 1{lo < x < hi}`` (bounds optionally inclusive) in one pass.

    Inclusive bounds are made strict by moving them one ulp of ``x.dtype`` outwards, so the
    result is exact: no value of that dtype lies between a bound and its neighbour.
    ``out`` may be ``grad`` itself (in place).
    """
    if lo_inclusive:
        lo = _next_float(float(lo), x.dtype, False)
    if hi_inclusive:
        hi = _next_float(float(hi), x.dtype, True)
    if out is None:
        return _aten.hardtanh_backward(grad, x, lo, hi)
    return _aten.hardtanh_backward.grad_input(grad, x, lo, hi, grad_input=out)


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0`` else ``-1`` (sign(0) = +1, also for -0.0), dtype of ``x``.

    Computed as ``copysign(1, x + 0)`` (``-0.0 + 0 = +0.0``); no gradient.
    """
    y = x + 0.0
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), y, out=y)


def clipped_ste_grad(
    grad: torch.Tensor, x: torch.Tensor, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``grad * 1{|x| <= 1}``: the clipped straight-through estimator."""
    return masked_grad(grad, x, -1.0, 1.0, True, True, out=out)


class RoundSTE(torch.autograd.Function):
    """``round(x)`` forward; backward is the identity, ``dL/dx = dL/dy`` (Bengio et al.'s
    straight-through estimator). Saves nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        return grad_y


class SignSTE(torch.autograd.Function):
    """``binary_sign(x)`` forward; clipped STE backward (Binarized Neural Networks,
    Hubara et al. 2016, the estimator ``g_r = g_q 1{|r| <= 1}``):
    ``dL/dx = dL/dy * 1{|x| <= 1}`` (the gradient of hardtanh). Saves ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return clipped_ste_grad(grad_y, x)


class ApproxSign(torch.autograd.Function):
    """``binary_sign(x)`` forward; Bi-Real-Net's ApproxSign backward (Liu et al. 2018,
    Sec. 3.2): the derivative of the piecewise quadratic ``2x + x^2`` / ``2x - x^2``::

        dy/dx = 2 + 2x  for -1 <= x < 0
                2 - 2x  for  0 <= x < 1
                0       otherwise

    Saves ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_y * approx_sign_derivative(x)


def approx_sign_derivative(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign's derivative, ``max(0, 2 - 2|x|)``: 2+2x on [-1,0), 2-2x on [0,1), 0
    elsewhere (both pieces reach 0 at the ends)."""
    return x.abs().mul_(-2.0).add_(2.0).clamp_min_(0.0)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with identity gradient (see :class:`RoundSTE`)."""
    return RoundSTE.apply(x)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` in ``{-1, +1}`` with the clipped STE (see :class:`SignSTE`)."""
    return SignSTE.apply(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` in ``{-1, +1}`` with Bi-Real's ApproxSign gradient (see :class:`ApproxSign`)."""
    return ApproxSign.apply(x)


def dequantize(
    codes: torch.Tensor, step: torch.Tensor, offset: Optional[torch.Tensor]
) -> torch.Tensor:
    """``codes * step + offset`` (offset ``None`` means 0): the single arithmetic shared by
    every fake-quantized forward and by :meth:`Quantizer.decode`, so that decoding the
    integer codes reproduces the forward output bit for bit."""
    y = codes.to(step.dtype) * step
    if offset is not None:
        y = y + offset
    return y


class QuantKernel:
    """A fake-quantizer's math: forward grid and analytic backward, no state.

    Subclasses implement :meth:`grid` (the integer codes plus the affine map back to the
    float range) and :meth:`backward`; :meth:`forward` may be overridden by a faster
    expression only when it is bit-identical to ``dequantize(*grid(...))``.
    ``params`` are the tensors the quantizer learns or needs (e.g. ``(alpha,)``), passed in
    the same order to every method.

    :meth:`forward_with_state` lets a caller that needs both the output and the gradient
    (the fused conv's backward recomputes the quantized input) share the elementwise work:
    it returns the output together with the intermediates :meth:`backward` would otherwise
    recompute.
    """

    #: True for kernels that compute in float32 whatever the input dtype and accept
    #: ``out_dtype`` in ``forward`` / ``forward_with_state`` (the Triton kernels of
    #: :mod:`.triton_ops`); eager kernels compute in the input's dtype, so callers widen
    #: half-precision inputs to float32 first (:func:`widen`).
    fused: bool = False

    def grid(
        self, x: torch.Tensor, *params: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(codes, step, offset)``: float tensor of integers in ``[0, 2**bits-1]``
        shaped like ``x``; step/offset broadcastable to ``x`` (offset ``None`` = 0)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``x`` (same shape and dtype)."""
        return dequantize(*self.grid(x, *params))

    def forward_with_state(
        self,
        x: torch.Tensor,
        params: Sequence[torch.Tensor],
        want_output: bool = True,
    ) -> Tuple[Optional[torch.Tensor], object]:
        """``(forward(x) or None, state for backward)``; the output must equal
        :meth:`forward` bit for bit."""
        return (self.forward(x, *params) if want_output else None), None

    def backward(
        self,
        x: torch.Tensor,
        params: Sequence[torch.Tensor],
        grad_y: torch.Tensor,
        needs_grad: Sequence[bool],
        state: object = None,
        overwrite_grad: bool = False,
    ) -> Grads:
        """Gradients ``(dL/dx, dL/dparam_0, ...)`` given ``dL/dy``; an entry may be None
        where ``needs_grad`` (same order) is False. ``state`` comes from
        :meth:`forward_with_state` on the same inputs (None: recompute) and is consumed.
        ``overwrite_grad``: the caller owns ``grad_y`` and lets it be reused in place."""
        raise NotImplementedError


_HALF = (torch.float16, torch.bfloat16)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16 / bfloat16, else unchanged: quantizers compute
    their rounding grid in float32 (under autocast the activations arrive in half
    precision; only the result is cast to the conv's dtype)."""
    return t.float() if t.dtype in _HALF else t


def kernel_backward(
    kernel: QuantKernel,
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    grad_y: torch.Tensor,
    needs_grad: Sequence[bool],
    state: object = None,
    overwrite_grad: bool = False,
) -> Grads:
    """``kernel.backward`` with the float32 rule of :func:`widen`: an eager kernel gets
    ``x`` and ``grad_y`` in float32 and dL/dx is returned in ``x``'s dtype (fused kernels
    widen internally and write dL/dx in ``x``'s dtype themselves)."""
    if kernel.fused:
        return kernel.backward(x, params, grad_y, needs_grad, state, overwrite_grad)
    xw = widen(x)
    gw = grad_y.to(xw.dtype)
    grads = kernel.backward(xw, params, gw, needs_grad, state, overwrite_grad or gw is not grad_y)
    gx = grads[0]
    if gx is not None and gx.dtype != x.dtype:
        gx = gx.to(x.dtype)
    return (gx, *grads[1:])


class _FakeQuantize(torch.autograd.Function):
    """One graph node for a whole quantizer: saves ``x`` and ``params`` only, and calls the
    kernel's analytic backward (which recomputes what it needs from them). Half-precision
    inputs are quantized in float32 and the result is returned in the input's dtype."""

    @staticmethod
    def forward(ctx, kernel: QuantKernel, x: torch.Tensor, *params: torch.Tensor):
        ctx.kernel = kernel
        ctx.save_for_backward(x, *params)
        if kernel.fused:
            return kernel.forward(x, *params)
        return kernel.forward(widen(x), *params).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *params = ctx.saved_tensors
        grads = kernel_backward(ctx.kernel, x, params, grad_y, ctx.needs_input_grad[1:])
        return (None, *grads)


def fake_quantize(kernel: QuantKernel, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """Apply ``kernel`` to ``x`` as a single autograd node (see :class:`_FakeQuantize`).

    Args:
        kernel: the method's math.
        x: tensor of any shape.
        params: the kernel's parameter tensors.
    Returns:
        fake-quantized tensor, same shape/dtype as ``x``.
    """
    return _FakeQuantize.apply(kernel, x, *params)


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> Scalar:
    """``sum(a * b)`` as one BLAS dot product (no temporary), through :func:`as_scalar`."""
    return as_scalar(torch.dot(a.reshape(-1), b.reshape(-1)))


def flat_sum(a: torch.Tensor) -> Scalar:
    """``a.sum()`` through :func:`as_scalar`."""
    return as_scalar(a.sum())


def param_grad(value: Scalar, param: torch.Tensor) -> torch.Tensor:
    """A scalar gradient as a tensor shaped and typed like ``param``."""
    if isinstance(value, torch.Tensor):
        return value.reshape(param.shape).to(param.dtype)
    return param.new_full(param.shape, value)
