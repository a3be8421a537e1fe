"""Fused fake quantization: the eager kernels' math as Triton launches (CUDA tensors).

The eager kernels (:mod:`.liq`, :mod:`.uniform`, :mod:`.binary`) spend one ATen launch per
elementwise op: a LIQ weight quantizer's forward + backward is about 25 launches and, for
per-tensor parameter gradients, host round trips of ``.item()`` on CPU (on CUDA the
scalars stay 0-d tensors, each op a launch). :func:`fused_kernel` swaps in a
:class:`TritonKernel` with the same interface (``forward`` / ``forward_with_state`` /
``backward`` / ``grid``), so :class:`.base.Quantizer`, :func:`.functional.fake_quantize` and
:func:`.fused.quant_conv2d` use it unchanged. Launches per call:

==========================  ========  ========================================================
method (role)               forward   backward (all gradients)
==========================  ========  ========================================================
LIQ activations, LIQ        1         1 (dL/dx and dL/dalpha; alpha's sum reduced in-kernel)
weights w/o normalisation
LIQ weights + weight norm   2         2 (+1 when called without the forward's state)
LSQ                         1         1
DoReFa activations          1         1
DoReFa weights              3         3 (torch.tanh, a max / tie-count reduction, apply)
TWN                         3         0 (straight-through: the gradient passes unchanged)
BNN / Bi-Real sign          1         1
XNOR / BWN / Bi-Real        1         1 (one program per output channel)
weights (scaled sign)
==========================  ========  ========================================================

The multi-launch rows are the per-tensor statistics a weight quantizer needs before any
element can be written (mean / std, max |tanh W|, TWN's threshold then scale): a kernel
cannot wait for all its own programs, so each statistic ends one launch.

Equality with the eager kernels (tests/quantization/test_triton_equal.py): elementwise
formulas, op order and float32 roundings are those of the eager code (see
:mod:`.triton_kernels`), so outputs are equal bit for bit where no reduction is involved.
Sums (parameter gradients, LIQ's mean / std, TWN's and XNOR's means, DoReFa's sum g t) are
accumulated in a different order (float32 within a program, float64 across programs), so
they agree with eager within float32 summation error, and an output that depends on such a
statistic may differ where the pre-rounding value lies within that error of a rounding tie.

Chosen when: the tensor is on CUDA, Triton imports, and the quantizer's ``fused_kernels``
is ``"auto"`` (the default; ``MODEL.QUANT.FUSED_KERNELS``). ``"off"`` keeps the eager path;
``"force"`` also runs the kernels on CPU tensors, which works only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported; tests use it).
Inputs may be float32, float16 or bfloat16 (computed in float32, written in the input's
dtype or the requested ``out_dtype``), contiguous or channels_last (elementwise kernels walk
the storage in memory order; gradients are laid out like the input first).
Launches go to the current stream; the reduction counter is per device, so two streams
must not run these kernels on one device concurrently.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence, Tuple

import torch

from .binary import ScaledSignKernel, SignKernel
from .functional import Grads, QuantKernel
from .liq import LIQKernel
from .uniform import DoReFaActivationKernel, DoReFaWeightKernel, LSQKernel, TernaryKernel

__all__ = ["FUSED_MODES", "TritonKernel", "fused_kernel", "triton_available"]

#: values of ``Quantizer.fused_kernels`` (and, except "force", of MODEL.QUANT.FUSED_KERNELS)
FUSED_MODES = ("auto", "off", "force")

_BLOCK = 4096  # elements per program (elementwise and reduction kernels)
_ROW_BLOCK = 2048  # chunk of an output channel's row (scaled-sign kernels)
_BLOCK_P = 1024  # partial rows added per step by the last program
_WARPS = 8


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton and the kernels import (cached)."""
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a Triton too old for the kernels' API
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_kernel(kernel: Optional[QuantKernel], x: torch.Tensor, mode: str) -> Optional[QuantKernel]:
    """The :class:`TritonKernel` to use for ``kernel`` on ``x``, or None (eager).

    Args:
        kernel: the quantizer's eager kernel (None: no kernel, eager).
        x: the tensor about to be quantized.
        mode: ``"auto"`` (CUDA tensors), ``"off"`` or ``"force"`` (any tensor; CPU tensors
            need the Triton interpreter).
    Raises:
        ValueError: unknown ``mode``; RuntimeError: ``"force"`` where Triton cannot run.
    """
    if mode not in FUSED_MODES:
        raise ValueError(f"fused_kernels must be one of {FUSED_MODES}, got {mode!r}")
    if mode == "off" or kernel is None or x.numel() == 0:
        return None
    if x.device.type != "cuda":
        if mode != "force":
            return None
        if x.device.type != "cpu" or not _interpreting():
            raise RuntimeError(
                "fused_kernels='force' on a non-CUDA tensor needs Triton's interpreter "
                "(TRITON_INTERPRET=1 before triton is imported) and a CPU tensor"
            )
    if not triton_available():
        if mode == "force":
            raise RuntimeError("fused_kernels='force' but triton is not importable")
        return None
    return _wrap(kernel)


@functools.lru_cache(maxsize=None)
def _wrap(kernel: QuantKernel) -> Optional["TritonKernel"]:
    for base_cls, cls in _FAMILIES:
        if type(kernel) is base_cls:
            return cls(kernel)
    return None  # an unknown (e.g. user-registered) kernel stays eager


# ---- helpers -------------------------------------------------------------------------------
_KERNELS = None


def _k():
    """:mod:`.triton_kernels` (imported on first use: it imports Triton)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels

        _KERNELS = triton_kernels
    return _KERNELS


def _launch(fn, n_programs: int, *args, **meta) -> None:
    fn[(n_programs,)](*args, num_warps=_WARPS, enable_fp_fusion=False, **meta)


def _programs(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK


@functools.lru_cache(maxsize=None)
def _counter(device: torch.device) -> torch.Tensor:
    """The per-device ticket counter of the last-program reductions (kept at 0)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


_SCRATCH: dict = {}


def _scratch(x: torch.Tensor, role: str, numel: int) -> torch.Tensor:
    """A float64 work buffer of at least ``numel`` elements on ``x``'s device, one per
    ``role`` ("part": the per-program partial rows of a last-program reduction, written and
    read within one launch; "coef": coefficients one launch hands to the next). Reused across
    calls instead of allocated per launch (an allocation costs about as much host time as a
    small launch); kernels read only the rows of their own launch (``mask=i < nprog``), so
    a larger buffer is fine. Launches on one stream run in order, which makes the reuse safe;
    like :func:`_counter`, this assumes one stream per device runs these kernels."""
    key = (x.device, role)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=torch.float64,
                          device=x.device)
        _SCRATCH[key] = buf
    return buf


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its storage is dense in a layout the flat kernels can walk, else a copy."""
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, n in zip(sa, sb, a.shape) if n > 1)


def _like(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g`` laid out in ``x``'s memory order (``x`` dense)."""
    if _same_order(g, x):
        return g
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous():
        fmt = torch.channels_last
    return g.contiguous(memory_format=fmt)


def _grad_buffer(g: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, overwrite: bool):
    """Where to write dL/dx: over ``g`` when allowed (or when ``g`` is already our copy)
    and of x's dtype, else a new tensor laid out like ``x``."""
    if g.dtype == x.dtype and (overwrite or g is not grad_y):
        return g
    return torch.empty_like(x)


def _scalar_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=x.device)


def _as_param(gv: Optional[torch.Tensor], p: torch.Tensor) -> Optional[torch.Tensor]:
    if gv is None or (gv.shape == p.shape and gv.dtype == p.dtype):
        return gv
    return gv.reshape(p.shape).to(p.dtype)


def _out(x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


# ---- kernels -------------------------------------------------------------------------------
class TritonKernel(QuantKernel):
    """A :class:`QuantKernel` running ``base``'s math as Triton launches.

    ``forward`` / ``forward_with_state`` take an optional ``out_dtype`` (the fused conv asks
    for the autocast dtype, saving a cast); inputs of any float dtype are computed in float32.
    ``grid`` (integer encoding for export) is the eager kernel's.
    """

    fused = True

    def __init__(self, base: QuantKernel):
        self.base = base

    def __repr__(self) -> str:
        return f"Triton({self.base!r})"

    def grid(self, x, *params):
        return self.base.grid(x, *params)

    def forward(self, x, *params, out_dtype: Optional[torch.dtype] = None):
        return self.forward_with_state(x, params, True, out_dtype)[0]

    def forward_with_state(self, x, params, want_output=True, out_dtype=None):
        x = _dense(x)
        state = self._state(x, params)
        if not want_output:
            return None, state
        return self._apply(x, params, state, _out(x, out_dtype)), state

    # subclasses
    def _state(self, x: torch.Tensor, params: Sequence[torch.Tensor]):
        return None

    def _apply(self, x, params, state, y):  # pragma: no cover - abstract
        raise NotImplementedError


class _LIQ(TritonKernel):
    """:class:`.liq.LIQKernel` (AQD eq. 3-7)."""

    def _wn(self, x: torch.Tensor) -> bool:
        b = self.base
        return b.signed and b.weight_norm and x.numel() > 1

    def _state(self, x, params):
        if not self._wn(x):
            return None
        n, p = x.numel(), _programs(x.numel())
        consts = torch.empty(8, dtype=torch.float64, device=x.device)
        part = _scratch(x, "part", p * 5)
        _launch(_k()._liq_wn_stats, p, x, params[0], part, _counter(x.device), consts, n,
                Q=self.base.levels, RESCALE=self.base.rescale, BLOCK=_BLOCK, BLOCK_P=_BLOCK_P)
        return consts

    def _apply(self, x, params, state, y):
        (alpha,) = params
        wn = state is not None
        _launch(_k()._liq_fwd, _programs(x.numel()), x, alpha, state if wn else alpha, y,
                x.numel(), Q=self.base.levels, SIGNED=self.base.signed, WN=wn, BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        (alpha,) = params
        x = _dense(x)
        wn = self._wn(x)
        if wn and state is None:
            state = self._state(x, params)
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        n, p = x.numel(), _programs(x.numel())
        ga = _scalar_grad(x)
        part = _scratch(x, "part", p * 4)
        coef = _scratch(x, "coef", 3) if wn else part
        _launch(_k()._liq_bwd, p, x, g, alpha, state if wn else alpha, gx, part,
                _counter(x.device), ga, coef, n, Q=self.base.levels, SIGNED=self.base.signed,
                WN=wn, RESCALE=self.base.rescale, NEED_A=bool(needs_grad[1]), BLOCK=_BLOCK,
                BLOCK_P=_BLOCK_P)
        if wn and needs_grad[0]:
            _launch(_k()._liq_wn_gx, p, x, gx, coef, n, RESCALE=self.base.rescale, BLOCK=_BLOCK)
        return (gx if needs_grad[0] else None), (_as_param(ga, alpha) if needs_grad[1] else None)


class _LSQ(TritonKernel):
    """:class:`.uniform.LSQKernel` (LSQ eq. 1, 3 with the gradient scale of Sec. 2.2)."""

    def _apply(self, x, params, state, y):
        _launch(_k()._lsq_fwd, _programs(x.numel()), x, params[0], y, x.numel(),
                QN=self.base.qn, QP=self.base.qp, BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        (s,) = params
        x = _dense(x)
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        n, p = x.numel(), _programs(x.numel())
        n_grad = n  # N of the gradient scale 1/sqrt(N Qp), as LSQKernel.grad_scale
        if self.base.per_sample and x.dim() > 1 and x.shape[0] > 0:
            n_grad //= x.shape[0]
        gs = _scalar_grad(x)
        part = _scratch(x, "part", p * 2)
        _launch(_k()._lsq_bwd, p, x, g, s, gx, part, _counter(x.device), gs, n, max(n_grad, 1),
                QN=self.base.qn, QP=self.base.qp, NEED_S=bool(needs_grad[1]), BLOCK=_BLOCK,
                BLOCK_P=_BLOCK_P)
        return (gx if needs_grad[0] else None), (_as_param(gs, s) if needs_grad[1] else None)


class _DoReFaActivation(TritonKernel):
    """:class:`.uniform.DoReFaActivationKernel` (DoReFa Sec. 2.5)."""

    def _apply(self, x, params, state, y):
        _launch(_k()._dorefa_a_fwd, _programs(x.numel()), x, y, x.numel(), Q=self.base.levels,
                BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        x = _dense(x)
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        _launch(_k()._dorefa_a_bwd, _programs(x.numel()), x, g, gx, x.numel(), BLOCK=_BLOCK)
        return (gx,)


class _DoReFaWeight(TritonKernel):
    """:class:`.uniform.DoReFaWeightKernel` (DoReFa Sec. 2.3); state ``(tanh W, [m])``."""

    def _state(self, x, params):
        t = torch.tanh(x.float())
        consts = torch.empty(1, dtype=torch.float64, device=x.device)
        p = _programs(x.numel())
        part = _scratch(x, "part", p)
        _launch(_k()._dorefa_w_stats, p, t, part, _counter(x.device), consts, x.numel(),
                BLOCK=_BLOCK, BLOCK_P=_BLOCK_P)
        return t, consts

    def _apply(self, x, params, state, y):
        t, consts = state
        _launch(_k()._dorefa_w_fwd, _programs(x.numel()), t, consts, y, x.numel(),
                Q=self.base.levels, BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        x = _dense(x)
        t = torch.tanh(x.float()) if state is None else state[0]
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        n, p = x.numel(), _programs(x.numel())
        part = _scratch(x, "part", p * 3)
        coef = _scratch(x, "coef", 3)
        _launch(_k()._dorefa_w_bwd_reduce, p, t, g, part, _counter(x.device), coef, n,
                BLOCK=_BLOCK, BLOCK_P=_BLOCK_P)
        _launch(_k()._dorefa_w_bwd, p, t, g, coef, gx, n, BLOCK=_BLOCK)
        return (gx,)


class _Ternary(TritonKernel):
    """:class:`.uniform.TernaryKernel` (TWN Sec. 2); straight-through backward."""

    def _state(self, x, params):
        n, p = x.numel(), _programs(x.numel())
        consts = torch.empty(2, dtype=torch.float64, device=x.device)
        part = _scratch(x, "part", p * 2)
        cnt = _counter(x.device)
        _launch(_k()._twn_delta, p, x, part, cnt, consts, n, BLOCK=_BLOCK, BLOCK_P=_BLOCK_P)
        _launch(_k()._twn_alpha, p, x, part, cnt, consts, n, BLOCK=_BLOCK, BLOCK_P=_BLOCK_P)
        return consts

    def _apply(self, x, params, state, y):
        _launch(_k()._twn_fwd, _programs(x.numel()), x, state, y, x.numel(), BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        return (grad_y if needs_grad[0] else None,)


class _Sign(TritonKernel):
    """:class:`.binary.SignKernel` (BNN clipped STE / Bi-Real ApproxSign)."""

    def _apply(self, x, params, state, y):
        _launch(_k()._sign_fwd, _programs(x.numel()), x, y, x.numel(), BLOCK=_BLOCK)
        return y

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        x = _dense(x)
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        _launch(_k()._sign_bwd, _programs(x.numel()), x, g, gx, x.numel(),
                APPROX=self.base.grad == "approx", BLOCK=_BLOCK)
        return (gx,)


class _ScaledSign(TritonKernel):
    """:class:`.binary.ScaledSignKernel` (XNOR / BWN paper gradient, Bi-Real magnitude)."""

    @staticmethod
    def _rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """``(x with output channels outermost in memory, rows, row length)``."""
        if x.dim() < 2:
            return _dense(x), 1, x.numel()
        x = _dense(x)
        row = x.numel() // x.shape[0]
        if x.stride(0) != row:
            x = x.contiguous()
        return x, x.shape[0], row

    def forward_with_state(self, x, params, want_output=True, out_dtype=None):
        if not want_output:
            return None, None
        x, rows, row = self._rows(x)
        y = _out(x, out_dtype)
        _launch(_k()._scaled_sign_fwd, rows, x, y, row, BLOCK=_ROW_BLOCK)
        return y, None

    def backward(self, x, params, grad_y, needs_grad, state=None, overwrite_grad=False) -> Grads:
        if not needs_grad[0]:
            return (None,)
        x, rows, row = self._rows(x)
        g = _like(grad_y, x)
        gx = _grad_buffer(g, grad_y, x, overwrite_grad)
        _launch(_k()._scaled_sign_bwd, rows, x, g, gx, row,
                MAGNITUDE=self.base.grad == "magnitude", BLOCK=_ROW_BLOCK)
        return (gx,)


_FAMILIES = (
    (LIQKernel, _LIQ),
    (LSQKernel, _LSQ),
    (DoReFaActivationKernel, _DoReFaActivation),
    (DoReFaWeightKernel, _DoReFaWeight),
    (TernaryKernel, _Ternary),
    (SignKernel, _Sign),
    (ScaledSignKernel, _ScaledSign),
)
