"""Full precision and k-bit uniform quantizers: ``fp``, ``lsq``, ``dorefa``, ``twn``.

(AQD's ``liq`` lives in :mod:`.liq`.) Each kernel's forward is ``codes * step + offset``
(:func:`~.functional.dequantize`), the arithmetic :meth:`Quantizer.decode` repeats, so
``decode(*encode(x))`` equals ``quantize(x)`` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from .base import Quantizer
from .functional import (
    Grads,
    QuantKernel,
    as_scalar,
    flat_dot,
    masked_grad,
    param_grad,
    scalar_tensor,
)
from .registry import register_quantizer

__all__ = [
    "FullPrecision",
    "LSQKernel",
    "LearnedStepSizeQuantizer",
    "DoReFaWeightKernel",
    "DoReFaActivationKernel",
    "DoReFaQuantizer",
    "TernaryKernel",
    "TernaryWeightQuantizer",
]

_KBIT = tuple(range(2, 9))
_STEP_MIN = 1e-8


@register_quantizer("fp")
class FullPrecision(Quantizer):
    """Identity (32-bit float). Accepts only ``bits=32``; no integer encoding."""

    allowed_bits = (32,)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, x: torch.Tensor):
        return None


# ---- LSQ ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LSQKernel(QuantKernel):
    """Learned step size quantization (Esser et al., ICLR 2020), params ``(s,)``.

    Forward (LSQ eq. 1): ``v_bar = round(clip(v / s, -Qn, Qp)) * s``, computed as
    ``codes = round(clip(v/s, -Qn, Qp)) + Qn`` (in ``[0, 2**k - 1]``), ``step = s``,
    ``offset = -Qn * s``.
    Backward: ``dv_bar/dv = 1{-Qn < v/s < Qp}`` (STE); step, LSQ eq. 3 times the gradient
    scale ``g = 1/sqrt(N * Qp)`` (Sec. 2.2)::

        dv_bar/ds = round(v/s) - v/s   if -Qn < v/s < Qp;   -Qn  if v/s <= -Qn;   Qp  if v/s >= Qp

    ``N`` is the number of weights for weights and the number of features per sample
    (``numel / batch``) for activations, as the paper defines N_W / N_F.
    """

    qn: int
    qp: int
    per_sample: bool = False

    def _consts(self, x: torch.Tensor, s: torch.Tensor):
        """``(s, 1/s, offset)``: Python floats on CPU, 0-d tensors elsewhere."""
        s = as_scalar(s.detach().to(x.dtype))
        s = max(s, _STEP_MIN) if isinstance(s, float) else s.clamp_min(_STEP_MIN)
        return s, 1.0 / s, (None if self.qn == 0 else s * (-self.qn))

    def _dequantize_(self, r, s, offset):
        """``(r + Qn) * s + offset`` in place: the arithmetic of :func:`dequantize` on
        :meth:`grid`'s tensors, hence bit-identical."""
        if self.qn:
            r.add_(self.qn)
        r.mul_(s)
        return r if offset is None else r.add_(offset)

    def grid(self, x: torch.Tensor, s: torch.Tensor):
        s, rs, offset = self._consts(x, s)
        r = (x * rs).clamp_(-self.qn, self.qp).round_()
        codes = r if self.qn == 0 else r.add_(self.qn)
        off = None if offset is None else scalar_tensor(offset, x)
        return codes, scalar_tensor(s, x), off

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s, rs, offset = self._consts(x, s)
        return self._dequantize_((x * rs).clamp_(-self.qn, self.qp).round_(), s, offset)

    def grad_scale(self, x: torch.Tensor) -> float:
        n = x.numel()
        if self.per_sample and x.dim() > 1 and x.shape[0] > 0:
            n //= x.shape[0]
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def forward_with_state(self, x, params, want_output=True):
        s, rs, offset = self._consts(x, params[0])
        v = (x * rs).clamp_(-self.qn, self.qp)  # clip(v); the masks below are exact on it
        if not want_output:
            return None, (v, torch.round(v), 1.0)
        y = self._dequantize_(torch.round(v), s, offset)
        return y, (v, y, s)  # round(clip(v)) = y / s (the Qn shift and offset cancel)

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        (s,) = params
        if state is None:
            _, state = self.forward_with_state(x, params, want_output=False)
        v, coded, scale = state
        dot_gr = flat_dot(grad_y, coded) / scale if needs_grad[1] else None
        gx = masked_grad(grad_y, v, -self.qn, self.qp, out=grad_y if overwrite_grad else None)
        gs = None
        if needs_grad[1]:
            # LSQ eq. 3: round(v) - v inside, -Qn for v <= -Qn, Qp for v >= Qp, i.e.
            # round(clip(v)) - v 1{-Qn < v < Qp}: sum(grad * .) = <grad, r> - <gx, v>
            gs = param_grad((dot_gr - flat_dot(gx, v)) * self.grad_scale(x), s)
        return (gx if needs_grad[0] else None), gs


@register_quantizer("lsq")
class LearnedStepSizeQuantizer(Quantizer):
    """LSQ, ``k`` in 2..8 bits: signed for weights (``Qn = 2**(k-1)``,
    ``Qp = 2**(k-1) - 1``), unsigned for activations (``Qn = 0``, ``Qp = 2**k - 1``).

    Args:
        bits: 2..8.
        role: ``"weight"`` or ``"activation"``.
        step: step size before data initialisation (default 1.0).

    Parameters: ``step`` (0-d). Initialised on the first training forward to
    ``2 * mean|x| / sqrt(Qp)`` (LSQ Sec. 2.1), from the weight or the first batch.
    Encoding: per tensor, ``codes = round(clip(x/s)) + Qn``, ``step = s``, ``offset = -Qn*s``.
    """

    allowed_bits = _KBIT
    needs_init = True

    def __init__(self, bits: int, role: str = "weight", step: float = 1.0):
        super().__init__(bits, role)
        if role == "weight":
            qn, qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        else:
            qn, qp = 0, 2 ** self.bits - 1
        self.step = nn.Parameter(torch.tensor(float(step)))
        self.kernel = LSQKernel(qn, qp, per_sample=role == "activation")

    def quant_params(self) -> Tuple[torch.Tensor, ...]:
        return (self.step,)

    def initialize(self, x: torch.Tensor) -> None:
        s = 2.0 * x.float().abs().mean() / math.sqrt(self.kernel.qp)
        if torch.isfinite(s) and s > _STEP_MIN:
            with torch.no_grad():  # (not .data: the version counter must see the write)
                self.step.fill_(float(s))

    def extra_repr(self) -> str:
        k = self.kernel
        return f"{super().extra_repr()}, Qn={k.qn}, Qp={k.qp}, step={self.step.item():.4g}"


# ---- DoReFa -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoReFaWeightKernel(QuantKernel):
    """DoReFa-Net k-bit weights (Zhou et al. 2016, Sec. 2.3)::

        r     = tanh(W) / (2 max|tanh W|) + 1/2
        W_bar = 2 * quantize_k(r) - 1,      quantize_k(r) = round((2**k - 1) r) / (2**k - 1)

    computed as ``codes = round(q r)``, ``step = 2/q``, ``offset = -1``.
    Backward: STE through round; exact derivative of tanh and of the max normaliser
    (the max's gradient is split evenly among tied maxima, as torch does)::

        dL/dW_j = (1 - t_j^2) / m * (g_j - sign(t_j) M_j * sum_i g_i t_i / m)

    with ``t = tanh W``, ``m = max|t|``, ``M_j = 1{|t_j| = m} / #ties``.
    """

    levels: int

    def grid(self, w: torch.Tensor):
        t = torch.tanh(w)
        m = t.abs().max().clamp_min(_STEP_MIN)
        codes = t.div_(2.0 * m).add_(0.5).mul_(self.levels).round_()
        step = torch.full((), 2.0 / self.levels, dtype=w.dtype, device=w.device)  # no H2D copy
        return codes, step, torch.full_like(step, -1.0)

    def backward(self, w, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        t = torch.tanh(w)
        a = t.abs()
        m = a.max().clamp_min(_STEP_MIN)
        ties = (a == m).to(w.dtype)
        ties = ties / ties.sum().clamp_min(1.0)
        corr = torch.sign(t) * ties * ((grad_y * t).sum() / m)
        return ((1.0 - t * t) / m * (grad_y - corr),)


@dataclass(frozen=True)
class DoReFaActivationKernel(QuantKernel):
    """DoReFa-Net k-bit activations (Sec. 2.5): ``quantize_k(clip(x, 0, 1))``, computed as
    ``codes = round(q clip(x, 0, 1))``, ``step = 1/q``. Backward: ``1{0 <= x <= 1}``."""

    levels: int

    def grid(self, x: torch.Tensor):
        codes = x.clamp(0.0, 1.0).mul_(self.levels).round_()
        return codes, torch.full((), 1.0 / self.levels, dtype=x.dtype, device=x.device), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, step, _ = self.grid(x)
        return codes.mul_(as_scalar(step))  # == codes * step

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        out = grad_y if overwrite_grad else None
        return (masked_grad(grad_y, x, 0.0, 1.0, lo_inclusive=True, hi_inclusive=True, out=out),)


@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net, ``k`` in 2..8 bits, no learned state.

    Weights: tanh-normalised to ``[-1, 1]`` per tensor. Activations: clipped to ``[0, 1]``.
    Encoding: per tensor; weights ``step = 2/q``, ``offset = -1``; activations ``step = 1/q``,
    ``offset = 0`` (``q = 2**k - 1``).
    """

    allowed_bits = _KBIT

    def __init__(self, bits: int, role: str = "weight"):
        super().__init__(bits, role)
        q = 2 ** self.bits - 1
        self.kernel = DoReFaWeightKernel(q) if role == "weight" else DoReFaActivationKernel(q)


# ---- TWN ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TernaryKernel(QuantKernel):
    """Ternary weight networks (Li & Liu 2016, Sec. 2, approximate solution)::

        Delta = 0.7 * E|W|,    alpha = mean_{|W| > Delta} |W|,
        W_t   = alpha * sign(W) * 1{|W| > Delta}   in {-alpha, 0, alpha}

    computed as ``codes = 1 + sign(W) 1{|W| > Delta}`` in {0, 1, 2}, ``step = alpha``,
    ``offset = -alpha``. Backward: straight-through, ``dL/dW = dL/dW_t`` (TWN trains the
    float weights with the gradient of the ternary ones). Per tensor.
    """

    def grid(self, w: torch.Tensor):
        a = w.abs()
        delta = 0.7 * a.mean()
        keep = a > delta
        alpha = (a * keep).sum() / keep.sum().clamp_min(1).to(w.dtype)
        codes = torch.where(w > delta, 2.0, torch.where(w < -delta, 0.0, 1.0)).to(w.dtype)
        return codes, alpha, -alpha

    def backward(self, w, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        return (grad_y if needs_grad[0] else None,)


@register_quantizer("twn")
class TernaryWeightQuantizer(Quantizer):
    """TWN ternary weights (role weight only). Reported as ``bits=2`` (the storage width)
    with 3 levels; ``bits`` must be 2. Encoding: codes {0,1,2}, ``step = alpha``,
    ``offset = -alpha`` (0-d)."""

    allowed_bits = (2,)
    roles = ("weight",)

    def __init__(self, bits: int = 2, role: str = "weight"):
        super().__init__(bits, role)
        self.kernel = TernaryKernel()

    @property
    def num_levels(self) -> int:
        return 3
