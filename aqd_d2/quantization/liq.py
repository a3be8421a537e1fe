"""AQD's learned interval quantization (LIQ), paper 002 Sec. 3.3, eq. 3-7.

Weights (symmetric interval ``[-alpha, alpha]``)::

    w_hat = 1/2 * (clip(w / alpha, -1, 1) + 1)          # eq. 3, transformer to [0, 1]
    R     = round(w_hat * q),   q = 2**k - 1             # eq. 5, discretizer (codes)
    w_bar = alpha * (2 * R / q - 1)                      # affine back to [-alpha, alpha]

Activations (interval ``[0, alpha]``)::

    x_hat = clip(x / alpha, 0, 1)                        # eq. 4
    x_bar = alpha * round(x_hat * q) / q                 # eq. 5 + affine back to [0, alpha]

Backward (STE through ``round``), written out in :class:`LIQKernel`:

* input: ``dw_bar/dw = 1{|w| < alpha}``, ``dx_bar/dx = 1{0 < x < alpha}`` (the interiors
  of the clipping ranges; at ``x = 0`` the clip has no derivative and we take 0, PyTorch's
  ReLU convention, which is also what a preceding ReLU passes back there);
* interval, eq. 6 / 7: inside the interval ``d v_bar / d alpha = v_bar/alpha - v/alpha``
  (the paper's "round(v/alpha) - v/alpha", with round meaning the quantized value in
  interval units); outside, the output is the clipped end point, so the derivative is
  ``sign(w)`` for weights (the paper writes 1, which is the ``w >= alpha`` side; the
  ``w <= -alpha`` side outputs ``-alpha``) and ``1`` for ``x >= alpha``; activations below 0
  output 0 and get 0. This is exactly the autograd derivative of the unfused formula.

Memory: one autograd node per quantizer saving only ``x`` and ``alpha``; everything else is
recomputed in backward (4 elementwise passes), see :mod:`.functional`.

Initialisation (the ``initialized`` buffer, see :class:`~.base.Quantizer`): on the first
training forward ``alpha`` is set from data. Default ``init="mse"``: the clipping value
among 64 evenly spaced fractions of ``max|v|`` that minimises the mean squared quantization
error of ``v`` (the standardised weight, or the first batch of activations, subsampled to
65536 evenly strided elements). Unlike a fixed percentile this adapts to the bit width
(2-bit clips much harder than 8-bit, as it should); ``"percentile"`` (99.9 by default) and
``"max"`` are available. The value is averaged over DDP ranks.

Weight normalisation (``weight_norm=True``, as APOT, Li et al. 2020): the weight is first
standardised, ``u = (W - mean(W)) / std(W)`` (per tensor, unbiased std, ``sqrt(var+1e-12)``),
so ``alpha`` is measured in standard deviations and is comparable across layers. Scale
handling: with ``rescale=True`` (default) the quantized value is mapped back,
``W_bar = std * Q(u) + mean`` (equivalently, quantization on the grid
``mean + std * alpha * [-1, 1]``), so a converted float checkpoint keeps its output scale;
this matters for detectron2 backbones whose ``FrozenBatchNorm2d`` cannot re-normalise a
weight whose scale changed by ``1/std``. With ``rescale=False`` the output is ``Q(u)``, in
standardised units (APOT's form; only for layers followed by a trainable normalisation).
Gradients flow through ``mean`` and ``std`` exactly as autograd would on the unfused formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from .base import Quantizer
from .functional import (
    Grads,
    QuantKernel,
    Scalar,
    as_scalar,
    flat_dot,
    flat_sum,
    masked_grad,
    param_grad,
    scalar_tensor,
)
from .registry import register_quantizer

__all__ = ["LIQKernel", "LearnedIntervalQuantizer", "standardize_stats"]

_ALPHA_MIN = 1e-8
_VAR_EPS = 1e-12
_INIT_SAMPLES = 1 << 16
_INIT_CANDIDATES = 64


def standardize_stats(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of ``w`` as 0-d tensors; ``std = sqrt(unbiased var + 1e-12)``."""
    if w.numel() < 2:
        return w.mean(), torch.full((), _VAR_EPS ** 0.5, dtype=w.dtype, device=w.device)
    # (torch.var_mean is ~6x slower than var + mean on CPU)
    return w.mean(), torch.sqrt(w.var() + _VAR_EPS)


class _Consts(NamedTuple):
    """Scalars of one LIQ evaluation: Python floats on CPU, 0-d tensors elsewhere."""

    a: Scalar  # alpha, floored at 1e-8
    step: Scalar  # y = R * step + offset
    offset: Optional[Scalar]
    mu: Optional[Scalar]  # standardisation statistics (weights with weight_norm)
    sigma: Optional[Scalar]


@dataclass(frozen=True)
class LIQKernel(QuantKernel):
    """LIQ math for one quantizer; params ``(alpha,)`` with ``alpha`` a 0-d tensor.

    Implementation: eq. 3-5 are folded into one affine map to the code axis,
    ``s = (x - mean) * q / (2 alpha std) + q/2`` for weights (``mean = 0, std = 1`` without
    standardisation) and ``s = x * q / alpha`` for activations, then
    ``R = round(clip(s, 0, q))`` and ``y = R * step + offset``. ``0 < s < q`` is
    ``|w| < alpha`` (weights) and ``0 < x < alpha`` (activations). The backward needs no
    tensor of ``x / alpha`` or of the standardised weight: its reductions are dot products
    with ``clip(s)``, ``R`` (or the output) and ``x``; masked gradients are one
    ``hardtanh_backward`` pass.

    Args:
        levels: ``q = 2**bits - 1``.
        signed: weights (``[-alpha, alpha]``, eq. 3) if True, activations (eq. 4) if False.
        weight_norm: standardise the input first (signed only).
        rescale: map the standardised output back (``std * . + mean``).
    """

    levels: int
    signed: bool
    weight_norm: bool = False
    rescale: bool = True

    def _affine(self, x: torch.Tensor, alpha: torch.Tensor) -> Tuple[_Consts, torch.Tensor]:
        """``(consts, s)`` with ``s`` the pre-rounding code (a new tensor)."""
        q = self.levels
        a = as_scalar(alpha.detach().to(x.dtype))
        a = max(a, _ALPHA_MIN) if isinstance(a, float) else a.clamp_min(_ALPHA_MIN)
        if not self.signed:
            return _Consts(a, a / q, None, None, None), x * (q / a)  # x_bar = alpha R / q
        if not (self.weight_norm and x.numel() > 1):
            s = (x * ((q / 2.0) / a)).add_(q / 2.0)
            return _Consts(a, a * (2.0 / q), -a, None, None), s
        # standardisation: two-pass mean / unbiased variance (centred dot product)
        mu = as_scalar(x.detach().mean())
        s = x - mu
        var = flat_dot(s, s) / (x.numel() - 1)
        sigma = (var + _VAR_EPS) ** 0.5
        s.mul_((q / 2.0) / (a * sigma)).add_(q / 2.0)
        if self.rescale:  # w_bar = std * alpha * (2R/q - 1) + mean
            return _Consts(a, a * sigma * (2.0 / q), mu - a * sigma, mu, sigma), s
        return _Consts(a, a * (2.0 / q), -a, mu, sigma), s  # w_bar = alpha * (2R/q - 1)

    @staticmethod
    def _dequantize_(codes: torch.Tensor, k: _Consts) -> torch.Tensor:
        """``codes * step + offset`` in place: the arithmetic of :func:`dequantize` on the
        tensors :meth:`grid` returns, hence bit-identical."""
        codes.mul_(k.step)
        return codes if k.offset is None else codes.add_(k.offset)

    def grid(self, x: torch.Tensor, alpha: torch.Tensor):
        k, s = self._affine(x, alpha)
        codes = s.clamp_(0.0, self.levels).round_()  # eq. 3/4 + 5
        offset = None if k.offset is None else scalar_tensor(k.offset, x)
        return codes, scalar_tensor(k.step, x), offset

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        k, s = self._affine(x, alpha)
        return self._dequantize_(s.clamp_(0.0, self.levels).round_(), k)

    def forward_with_state(self, x, params, want_output=True):
        k, s = self._affine(x, params[0])
        s.clamp_(0.0, self.levels)
        if not want_output:
            return None, (s, torch.round(s), 1.0, 0.0, k)
        y = self._dequantize_(torch.round(s), k)
        # the codes are recovered in backward from y: <g, R> = (<g, y> - offset sum g) / step
        return y, (s, y, k.step, 0.0 if k.offset is None else k.offset, k)

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        (alpha,) = params
        q = self.levels
        if state is None:
            _, state = self.forward_with_state(x, params, want_output=False)
        s, coded, scale, shift, k = state  # s = clip(s, 0, q); R = (coded - shift) / scale
        sum_g = flat_sum(grad_y) if self.signed else 0.0  # (activations: shift is 0)
        dot_gR = None
        if needs_grad[1] or self.signed:
            dot_gR = (flat_dot(grad_y, coded) - shift * sum_g) / scale
        # grad * 1{0 < s < q}: |w| < alpha (eq. 6 interior), 0 < x < alpha (eq. 7 interior)
        h = masked_grad(grad_y, s, 0.0, q, out=grad_y if overwrite_grad else None)
        if not self.signed:
            ga = None
            if needs_grad[1]:
                # eq. 7 times q: R - s inside (0, q), q above, 0 below = R - s 1{0 < s < q}
                # (R is 0 below and q above): sum(grad * .) = <grad, R> - <h, s>
                ga = param_grad((dot_gR - flat_dot(h, s)) / q, alpha)
            return (h if needs_grad[0] else None), ga
        a, mu, sigma = k.a, k.mu, k.sigma
        # G = 2R/q - 1 (output in interval units); t = u/alpha = (s - q/2) 2/q inside
        sum_gG = dot_gR * (2.0 / q) - sum_g
        sum_h = flat_sum(h)
        sum_ht = flat_dot(h, s) * (2.0 / q) - sum_h
        ga = None
        if needs_grad[1]:
            # eq. 6: d w_bar / d alpha = G - t inside the interval, sign(w) = G outside
            ga = sum_gG - sum_ht
            if sigma is not None and self.rescale:
                ga = ga * sigma
            ga = param_grad(ga, alpha)
        if not needs_grad[0] or sigma is None:
            return (h if needs_grad[0] else None), ga
        # Standardisation u = (w - mean)/std, y = std * g(u) + mean (rescale) or g(u):
        #   gx = c_h h - c_h sum(h)/N - u c_h sum(h u)/(N-1) [+ u sum(gy g)/(N-1) + sum(gy)/N]
        # with g = alpha G and u = (x - mean)/std.
        n = x.numel()
        c_h = 1.0 if self.rescale else 1.0 / sigma
        k1 = -c_h * (sum_ht * a)
        k0 = -c_h * sum_h
        if self.rescale:
            k1 = k1 + a * sum_gG
            k0 = k0 + sum_g
        k1, k0 = k1 / ((n - 1) * sigma), k0 / n  # u k1 = x k1/std - mean k1/std
        gx = h if self.rescale else h.mul_(c_h)
        k0 = k0 - mu * k1
        gx = gx.add_(x, alpha=k1) if isinstance(k1, float) else gx.add_(x * k1)
        return gx.add_(k0), ga


@register_quantizer("liq")
class LearnedIntervalQuantizer(Quantizer):
    """AQD learned interval quantization (paper 002, eq. 3-7), ``k`` in 2..8 bits.

    Args:
        bits: 2..8.
        role: ``"weight"`` (symmetric interval) or ``"activation"`` (``[0, alpha]``).
        weight_norm: standardise weights before quantizing (weights only; ignored for
            activations). Default True.
        rescale: with ``weight_norm``, map the output back to the weight's scale (default
            True, see module docstring).
        init: how ``alpha`` is set on the first training forward: ``"mse"`` (default: the
            candidate among 64 fractions of ``max`` minimising the quantization MSE on up to
            65536 evenly strided elements; bit-width aware, so 2-bit clips harder than
            8-bit), ``"percentile"`` (``init_percentile`` of ``|u|`` for weights, of
            ``max(x, 0)`` for activations) or ``"max"``.
        init_percentile: percentile for ``init="percentile"`` (default 99.9).
        alpha: initial value before data initialisation (used as-is in eval mode if the
            quantizer was never run in training); default 3.0 for normalised weights, else 1.0.

    Parameters: ``alpha`` (0-d), in standard deviations when ``weight_norm`` is on.
    Encoding: per tensor; ``codes = R``, ``step = 2*alpha*std/q``, ``offset = mean - alpha*std``
    for weights (std = 1, mean = 0 without normalisation/rescale); ``step = alpha/q``,
    ``offset = 0`` for activations.
    """

    allowed_bits = tuple(range(2, 9))
    needs_init = True

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        weight_norm: bool = True,
        rescale: bool = True,
        init: str = "mse",
        init_percentile: float = 99.9,
        alpha: Optional[float] = None,
    ):
        super().__init__(bits, role)
        if init not in ("mse", "percentile", "max"):
            raise ValueError(f"liq: init must be 'mse', 'percentile' or 'max', got {init!r}")
        signed = role == "weight"
        self.weight_norm = bool(weight_norm) and signed
        self.rescale = bool(rescale)
        self.init = init
        self.init_percentile = float(init_percentile)
        if alpha is None:
            alpha = 3.0 if self.weight_norm else 1.0
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.kernel = LIQKernel(2 ** self.bits - 1, signed, self.weight_norm, self.rescale)

    def quant_params(self) -> Tuple[torch.Tensor, ...]:
        return (self.alpha,)

    def initialize(self, x: torch.Tensor) -> None:
        """Set ``alpha`` from ``x`` per ``self.init`` (weights: standardised if
        ``weight_norm``). A degenerate result (0, inf, nan) keeps the current value."""
        v = x.float()
        if self.weight_norm and v.numel() > 1:
            mu, sigma = standardize_stats(v)
            v = (v - mu) / sigma
        v = v.flatten() if self.role == "weight" else v.flatten().clamp_min(0)
        if self.init == "max":
            a = v.abs().max()
        else:
            stride = max(1, v.numel() // _INIT_SAMPLES)
            sample = v[::stride][:_INIT_SAMPLES]
            if self.init == "percentile":
                a = torch.quantile(sample.abs(), self.init_percentile / 100.0)
            else:
                a = self._mse_alpha(sample)
        if torch.isfinite(a) and a > _ALPHA_MIN:
            with torch.no_grad():  # (not .data: the version counter must see the write)
                self.alpha.fill_(float(a))

    def _mse_alpha(self, sample: torch.Tensor) -> torch.Tensor:
        """The ``alpha`` among ``max|sample| * (i/64)``, i = 1..64, minimising MSE."""
        kernel = LIQKernel(self.kernel.levels, self.kernel.signed)  # sample already normalised
        top = sample.abs().max()
        cand = top * torch.arange(1, _INIT_CANDIDATES + 1, device=sample.device) / _INIT_CANDIDATES
        cand = cand.to(sample.dtype).view(-1, 1)
        err = (kernel.forward(sample.view(1, -1), cand) - sample).pow_(2).mean(dim=1)
        return cand[int(torch.argmin(err))].reshape(())

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, alpha={self.alpha.item():.4g}, init={self.init}"
        if self.role == "weight":
            s += f", weight_norm={self.weight_norm}, rescale={self.rescale}"
        return s
