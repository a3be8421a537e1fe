"""Fused (Triton) vs eager fake quantization, case by case (shared by the CPU and GPU tests).

:func:`run_cases` builds every quantizer (method x bits x role, LIQ also with and without
weight normalisation / rescale), runs it once eagerly to initialise it, then compares the
fused kernels (``fused_kernels="force"``, or "auto" on CUDA) with the eager ones
(``"off"``) on the same inputs: the output, dL/dx and every parameter gradient, standalone
and inside ``quant_conv2d`` (whose backward hands the forward's state to the kernels).

Bounds (see aqd_d2/quantization/triton_ops.py):
* exact (``torch.equal``) for values that involve no reduction, on CPU. The fused kernels
  compute scalar factors (``q / alpha``, ``alpha * 2 / q``, ``1 / s``) in float64 and round
  once, as the eager CPU path does with Python floats. The eager CUDA path computes them in
  float32 and divides by multiplying with a reciprocal (torch's ``q / t`` is
  ``reciprocal(t) * q``; CUDA division by a scalar multiplies by its reciprocal), so on CUDA
  these factors may differ by one float32 rounding: values are compared within
  ``1e-5`` relative there, and a rounding or clip mask may flip where the eager
  pre-rounding value is within 1e-4 of a tie or of a clip bound;
* a per-tensor sum (parameter gradients; outputs / dL/dx of methods whose formula contains a
  tensor statistic) within ``1e-5 * sum|terms|``: float32 summation in two different orders
  is within ``2 (log2 n + 1) eps32 sum|terms|`` (< 6e-6 for n < 1e6);
* an output that is rounded after such a statistic may differ by one grid step where the
  eager pre-rounding value is within 1e-4 of a tie; nowhere else.

CPU: run in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it at import), e.g.
``TRITON_INTERPRET=1 python -m tests.quantization.triton_equal_cases`` prints JSON.
"""
from __future__ import annotations

import json
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch

from aqd_d2.quantization import build_quantizer, quant_conv2d

Case = Tuple[str, Callable[[torch.device, str], None]]
_REL = 1e-5


def _grads(y, gy, tensors):
    gs = torch.autograd.grad(y, tensors, gy, allow_unused=True)
    return [None if g is None else g.detach().clone() for g in gs]


def _run(q, x, gy, mode):
    q.set_fused_kernels(mode)
    xx = x.detach().clone().requires_grad_(True)
    y = q(xx)
    params = [p for p in q.quant_params()]
    gs = _grads(y, gy, [xx] + params)
    return y.detach(), gs


def _close_sum(a: torch.Tensor, b: torch.Tensor, scale: float, what: str, jump: float = 0.0) -> None:
    """``|a - b| <= 1e-5 * scale + jump`` (``jump``: what flipped clip masks may add)."""
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if not err <= _REL * scale + jump + 1e-30:
        raise AssertionError(f"{what}: |fused - eager| = {err:.3g} > {_REL} * {scale:.3g} + {jump:.3g}")


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{what}: dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    if not torch.equal(a, b):
        bad = (a != b).sum().item()
        diff = (a.double() - b.double()).abs().max().item()
        raise AssertionError(f"{what}: {bad} elements differ (max {diff:.3g})")


def _near_tie(q, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Elements whose eager pre-rounding value is within 1e-4 of a rounding boundary."""
    k = q.kernel
    name = type(k).__name__
    xd = x.detach()
    if name == "LIQKernel":
        _, s = k._affine(xd.float(), q.alpha)
        s = s.clamp(0, k.levels)
        return ((s - s.floor() - 0.5).abs() < 1e-4)
    if name == "TernaryKernel":
        delta = 0.7 * xd.abs().mean()
        return (xd.abs() - delta).abs() < 1e-4 * delta
    if name == "DoReFaWeightKernel":
        t = torch.tanh(xd)
        v = (t / (2 * t.abs().max()) + 0.5) * k.levels
        near = (v - v.floor() - 0.5).abs() < 1e-4
        return near | (t.abs() >= t.abs().max() * (1 - 1e-5))
    return None


def _near_bound(q, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Elements whose eager pre-rounding code is within 1e-4 of a clip bound (LIQ, LSQ)."""
    k = q.kernel
    name = type(k).__name__
    xd = x.detach().float()
    if name == "LIQKernel":
        _, s = k._affine(xd, q.alpha)
        return (s.abs() < 1e-4) | ((s - k.levels).abs() < 1e-4)
    if name == "LSQKernel":
        v = xd / q.step.detach().clamp_min(1e-8)
        return ((v + k.qn).abs() < 1e-4) | ((v - k.qp).abs() < 1e-4)
    return None


def _near_tie_liq_lsq(q, x: torch.Tensor) -> Optional[torch.Tensor]:
    """(CUDA) LSQ elements whose eager pre-rounding value is within 1e-4 of a tie (LIQ's
    are covered by :func:`_near_tie`)."""
    if type(q.kernel).__name__ != "LSQKernel":
        return None
    v = (x.detach().float() / q.step.detach().clamp_min(1e-8)).clamp(-q.kernel.qn, q.kernel.qp)
    return (v - v.floor() - 0.5).abs() < 1e-4


def _stat_dependent(q, x) -> bool:
    """True when the output depends on a per-tensor statistic (reduction order matters),
    or, on CUDA, on a scalar factor computed in float32 by the eager kernels."""
    if x.device.type == "cuda":
        return type(q.kernel).__name__ in ("LIQKernel", "LSQKernel") or _stat_dependent(q, x.cpu())
    name = type(q.kernel).__name__
    if name == "LIQKernel":
        return q.kernel.signed and q.kernel.weight_norm and x.numel() > 1
    return name in ("TernaryKernel", "DoReFaWeightKernel", "ScaledSignKernel")


def _compare_outputs(q, x, ye, yf, what):
    if not _stat_dependent(q, x):
        _equal(yf, ye, what)
        return
    if yf.dtype != ye.dtype:
        raise AssertionError(f"{what}: dtype {yf.dtype} vs {ye.dtype}")
    scale = float(ye.abs().max()) + 1e-12
    off = (yf.double() - ye.double()).abs() > _REL * scale
    near = _near_tie(q, x)
    if near is not None:
        off = off & ~near
    if x.device.type == "cuda" and _near_tie_liq_lsq(q, x) is not None:
        off = off & ~_near_tie_liq_lsq(q, x)
    if off.any():
        raise AssertionError(f"{what}: {int(off.sum())} elements differ away from rounding ties")


def compare_quantizer(q, x: torch.Tensor, gy: torch.Tensor, mode: str, tag: str) -> None:
    """Standalone quantizer: output, dL/dx, parameter gradients."""
    ye, ge = _run(q, x, gy, "off")
    yf, gf = _run(q, x, gy, mode)
    _compare_outputs(q, x, ye, yf, f"{tag} output")
    gsum = float((gy.double().abs() * (1.0 + x.double().abs())).sum())
    levels = float(getattr(q.kernel, "levels", 0) or (getattr(q.kernel, "qn", 0) + getattr(q.kernel, "qp", 0)) or 1)
    if ge[0] is None or gf[0] is None:
        if (ge[0] is None) != (gf[0] is None):
            raise AssertionError(f"{tag} dL/dx: one side is None")
    elif _stat_dependent(q, x) and type(q.kernel).__name__ != "TernaryKernel":
        if ge[0].dtype != gf[0].dtype:
            raise AssertionError(f"{tag} dL/dx dtype {gf[0].dtype} vs {ge[0].dtype}")
        a, b = gf[0], ge[0]
        near = _near_bound(q, x) if x.device.type == "cuda" else None
        if near is not None:  # a clip mask may flip at a bound (see module docstring)
            a, b = a[~near], b[~near]
        _close_sum(a, b, gsum * levels, f"{tag} dL/dx")
    else:
        _equal(gf[0], ge[0], f"{tag} dL/dx")
    for i, (a, b) in enumerate(zip(gf[1:], ge[1:])):
        if a is None or b is None:
            raise AssertionError(f"{tag} param {i} gradient missing")
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{tag} param {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        # on CUDA an element on a clip bound may be in or out (see module docstring); the
        # parameter gradient jumps there by at most |g| * (Qp + Qn) (LIQ: |g| * max(1, std))
        near = _near_bound(q, x) if x.device.type == "cuda" else None
        jump = 0.0
        if near is not None and bool(near.any()):
            jump = float(gy.double().abs()[near].sum()) * levels * max(1.0, float(x.double().std())) if x.numel() > 1 else float(gy.double().abs()[near].sum()) * levels
        _close_sum(a, b, gsum * levels, f"{tag} d/dparam{i}", jump)


def compare_conv(qa, qw, x, w, mode, tag, padding=1, dtype=None, channels_last=False):
    """``quant_conv2d`` with both quantizers fused vs eager (all gradients)."""
    outs = []
    for m in ("off", mode):
        for q in (qa, qw):
            if q is not None:
                q.set_fused_kernels(m)
        xx = x.detach().clone()
        if channels_last:
            xx = xx.contiguous(memory_format=torch.channels_last)
        xx.requires_grad_(True)
        ww = w.detach().clone().requires_grad_(True)
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else torch.autocast(x.device.type, enabled=False)
        with ctx:
            y = quant_conv2d(xx, ww, None, 1, padding, 1, 1, qa, qw)
        params = [xx, ww] + [p for q in (qa, qw) if q is not None for p in q.quant_params()]
        torch.manual_seed(7)
        gy = torch.randn_like(y)
        outs.append((y.detach(), _grads(y, gy, params), gy))
    (ye, ge, gy), (yf, gf, _) = outs
    if channels_last and not yf.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError(f"{tag}: channels_last input gave a {tuple(yf.stride())}-strided output")
    stat = (qa is not None and _stat_dependent(qa, x)) or (qw is not None and _stat_dependent(qw, w))
    tol = 1e-2 if dtype is not None else _REL
    if stat or dtype is not None:
        scale = float(ye.abs().max()) + 1e-12
        if dtype is None and qw is not None and _near_tie(qw, w) is not None and bool(_near_tie(qw, w).any()):
            return  # a tie flip in W moves every output it touches: covered by the standalone case
        err = float((yf.double() - ye.double()).abs().max())
        if err > tol * scale:
            raise AssertionError(f"{tag} conv output: max |fused - eager| {err:.3g} > {tol} * {scale:.3g}")
    else:
        _equal(yf, ye, f"{tag} conv output")
    gsum = float((gy.double().abs()).sum()) * 16
    for i, (a, b) in enumerate(zip(gf, ge)):
        if (a is None) != (b is None):
            raise AssertionError(f"{tag} conv grad {i}: one side is None")
        if a is None:
            continue
        if a.dtype != b.dtype:
            raise AssertionError(f"{tag} conv grad {i}: dtype {a.dtype} vs {b.dtype}")
        scale = max(float(b.double().abs().max()), 1e-12) if i < 2 else gsum
        err = float((a.double() - b.double()).abs().max())
        if err > max(tol, 1e-4) * scale * (1 if i < 2 else 1):
            raise AssertionError(f"{tag} conv grad {i}: max |fused - eager| {err:.3g} (scale {scale:.3g})")


# ---- the cases ------------------------------------------------------------------------------
def _data(device, shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(device)


def _init(q, x):
    q.set_fused_kernels("off")
    q.train()
    q(x)
    return q


def _quantizer_cases() -> List[Tuple[str, str, int, str, dict]]:
    out = []
    for b in range(2, 9):
        out.append((f"liq{b}-w-wn", "liq", b, "weight", {}))
        out.append((f"liq{b}-w-wn-norescale", "liq", b, "weight", {"rescale": False}))
        out.append((f"liq{b}-w-nowd", "liq", b, "weight", {"weight_norm": False}))
        out.append((f"liq{b}-a", "liq", b, "activation", {}))
        out.append((f"lsq{b}-w", "lsq", b, "weight", {}))
        out.append((f"lsq{b}-a", "lsq", b, "activation", {}))
        out.append((f"dorefa{b}-w", "dorefa", b, "weight", {}))
        out.append((f"dorefa{b}-a", "dorefa", b, "activation", {}))
    out.append(("twn2-w", "twn", 2, "weight", {}))
    for m in ("bnn", "xnor", "bireal"):
        out.append((f"{m}1-w", m, 1, "weight", {}))
        out.append((f"{m}1-a", m, 1, "activation", {}))
    out.append(("bwn1-w", "bwn", 1, "weight", {}))
    return out


def case_names() -> List[str]:
    names = [c[0] for c in _quantizer_cases()]
    names += [f"conv-{m}" for m in ("liq", "lsq", "dorefa", "twn", "bnn", "xnor", "bwn", "bireal")]
    names += ["conv-liq-bf16", "conv-bireal-channels_last", "conv-liq-channels_last",
              "xnor-w-long-rows", "liq-w-wn-1-element"]
    return names


def _one(name: str, device: torch.device, mode: str) -> None:
    qcases = {c[0]: c for c in _quantizer_cases()}
    if name in qcases:
        _, method, bits, role, kw = qcases[name]
        q = build_quantizer(method, bits, role, **kw).to(device)
        if role == "weight":
            x = _data(device, (16, 70, 3, 3), 1, 0.05, 0.002)  # 10080 elements: 3 programs
        else:
            x = _data(device, (2, 7, 24, 28), 2, 1.0, 0.3)  # 9408 elements: 3 programs
            if method == "dorefa":
                x = x * 0.6 + 0.3
        _init(q, x)
        gy = _data(device, x.shape, 3)
        compare_quantizer(q, x, gy, mode, name)
        return
    if name == "xnor-w-long-rows":
        q = build_quantizer("xnor", 1, "weight").to(device)
        x = _data(device, (3, 4500), 4, 0.7)  # rows longer than one 2048-chunk
        compare_quantizer(q, x, _data(device, x.shape, 5), mode, name)
        return
    if name == "liq-w-wn-1-element":
        q = _init(build_quantizer("liq", 4, "weight").to(device), _data(device, (1,), 6))
        x = _data(device, (1,), 6)
        compare_quantizer(q, x, _data(device, x.shape, 7), mode, name)
        return
    method = name.split("-")[1]
    bits = {"liq": 4, "lsq": 3, "dorefa": 2, "twn": 2}.get(method, 1)
    qw = build_quantizer(method, bits, "weight").to(device)
    qa = None if method in ("twn", "bwn") else build_quantizer(
        method, bits, "activation").to(device)
    x = _data(device, (2, 6, 9, 11), 8, 1.0, 0.2)
    w = _data(device, (5, 6, 3, 3), 9, 0.2)
    _init(qw, w)
    if qa is not None:
        _init(qa, x)
    if name.endswith("bf16"):
        compare_conv(qa, qw, x, w, mode, name, dtype=torch.bfloat16)
    elif name.endswith("channels_last"):
        compare_conv(qa, qw, x, w, mode, name, channels_last=True)
    else:
        compare_conv(qa, qw, x, w, mode, name)


def run_cases(device: str = "cpu", mode: str = "force", names: Optional[List[str]] = None) -> Dict[str, str]:
    """``{case: ""}`` for a pass, ``{case: message}`` for a failure."""
    dev = torch.device(device)
    results = {}
    for name in names or case_names():
        try:
            _one(name, dev, mode)
            results[name] = ""
        except Exception as e:  # reported per case by the caller
            results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    return results


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps(run_cases(dev, "force" if dev == "cpu" else "auto")))
