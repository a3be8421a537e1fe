"""Triton kernels of the fused fake quantizers (imported only where Triton is installed).

Each kernel repeats, element by element, the arithmetic of the eager kernel it replaces
(:mod:`.liq`, :mod:`.uniform`, :mod:`.binary`; the formulas and their citations are there),
with these conventions, which :mod:`.triton_ops` relies on:

* Elementwise math runs in float32 whatever the storage dtype (bf16/fp16 inputs are widened
  on load, outputs narrowed on store: the rounding grid is float32). Every scalar that the
  eager CPU path computes in Python double arithmetic from float32 values (``q / alpha``,
  ``alpha * 2 / q``, ...) is computed here in float64 and rounded to float32 once, as the
  CPU's ``tensor * python_float`` does. Launchers disable FMA contraction
  (``enable_fp_fusion=False``) so ``a * b + c`` rounds twice, as the eager ops do.
* ``_rne`` rounds half to even exactly as ``torch.round`` for ``|v| < 2**22`` (every caller
  clamps first to at most 255).
* Masks mirror ``hardtanh_backward`` (what :func:`.functional.masked_grad` calls): the
  gradient is zeroed where ``v <= lo`` or ``v >= hi`` (strict interval), or ``v < lo`` /
  ``v > hi`` for inclusive bounds; NaN passes, as there.
* Per-tensor sums (parameter gradients, statistics) are reduced deterministically: each
  program writes its partial sums (float32 in-block tree sums, stored as float64) to a
  scratch row, takes a ticket from an atomic counter, and the program holding the last
  ticket adds the rows in a fixed order in float64, finishes the formula and resets the
  counter (the "last block" pattern: one launch, no atomics on data, same bits every run).
  The counter is a per-device int32 that starts at 0 and is left at 0.
* ``tanh`` (DoReFa weights) is not computed here: Triton's interpreter has no libdevice and
  a hand-written tanh would differ from ``torch.tanh`` by some ulp; the launcher passes
  ``torch.tanh(W)`` in.
"""
from __future__ import annotations

import triton
import triton.language as tl

# 1.5 * 2**23: v + M - M rounds v to an integer, half to even, in float32 (|v| < 2**22).
_RNE_MAGIC = 12582912.0


@triton.jit
def _rne(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _strict_pass(g, v, lo, hi):
    """``g`` where ``lo < v < hi`` else 0 (hardtanh_backward with bounds lo, hi)."""
    return tl.where((v <= lo) | (v >= hi), 0.0, g)


@triton.jit
def _sign_pm1(x):
    """+1 where the sign bit of ``x + 0`` is clear (so sign(-0.0) = +1), else -1."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(b < 0, -1.0, 1.0)


@triton.jit
def _ticket(cnt_ptr):
    """Atomic ticket after this program's partial stores (barrier, then acq_rel add)."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel")


@triton.jit
def _col_sum(part_ptr, col, NCOL: tl.constexpr, nprog, BLOCK_P: tl.constexpr):
    """Sum of column ``col`` of the (nprog, NCOL) float64 partials, fixed order."""
    acc = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, nprog, BLOCK_P):
        i = start + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + i * NCOL + col, mask=i < nprog, other=0.0, volatile=True)
    return tl.sum(acc, 0)


@triton.jit
def _col_max(part_ptr, col, NCOL: tl.constexpr, nprog, BLOCK_P: tl.constexpr):
    acc = tl.full([BLOCK_P], float("-inf"), tl.float64)
    for start in range(0, nprog, BLOCK_P):
        i = start + tl.arange(0, BLOCK_P)
        v = tl.load(part_ptr + i * NCOL + col, mask=i < nprog, other=float("-inf"), volatile=True)
        acc = tl.maximum(acc, v)
    return tl.max(acc, 0)


# ---- LIQ (paper 002 eq. 3-7; see liq.LIQKernel) ----------------------------------------------
@triton.jit
def _liq_consts(alpha_ptr, consts_ptr, Q: tl.constexpr, SIGNED: tl.constexpr, WN: tl.constexpr):
    """(mu, scale, shift, step, offset) as float32 scalars: s = (x - mu) * scale + shift,
    y = R * step + offset (offset 0 for activations)."""
    if WN:
        mu = tl.load(consts_ptr + 0).to(tl.float32)
        scale = tl.load(consts_ptr + 3).to(tl.float32)
        step = tl.load(consts_ptr + 5).to(tl.float32)
        off = tl.load(consts_ptr + 6).to(tl.float32)
        shift = tl.cast(Q / 2.0, tl.float32)
    else:
        a32 = tl.maximum(tl.load(alpha_ptr).to(tl.float32), 1e-8)
        a = a32.to(tl.float64)
        q64 = tl.cast(Q, tl.float64)
        mu = tl.cast(0.0, tl.float32)
        if SIGNED:
            scale = ((q64 / 2.0) / a).to(tl.float32)
            shift = tl.cast(Q / 2.0, tl.float32)
            step = (a * (2.0 / q64)).to(tl.float32)
            off = (-a).to(tl.float32)
        else:
            scale = (q64 / a).to(tl.float32)
            shift = tl.cast(0.0, tl.float32)
            step = (a / q64).to(tl.float32)
            off = tl.cast(0.0, tl.float32)
    return mu, scale, shift, step, off


@triton.jit
def _liq_code(x, mu, scale, shift, Q: tl.constexpr, SIGNED: tl.constexpr, WN: tl.constexpr):
    """clip(s, 0, q) with s the pre-rounding code, eager op order."""
    if WN:
        s = (x - mu) * scale + shift
    elif SIGNED:
        s = x * scale + shift
    else:
        s = x * scale
    return tl.clamp(s, 0.0, Q * 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _liq_fwd(x_ptr, alpha_ptr, consts_ptr, y_ptr, n, Q: tl.constexpr, SIGNED: tl.constexpr,
             WN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mu, scale, shift, step, off = _liq_consts(alpha_ptr, consts_ptr, Q, SIGNED, WN)
    r = _rne(_liq_code(x, mu, scale, shift, Q, SIGNED, WN))
    y = r * step
    if SIGNED:
        y = y + off
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _liq_wn_stats(x_ptr, alpha_ptr, part_ptr, cnt_ptr, consts_ptr, n, Q: tl.constexpr,
                  RESCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Weight standardisation statistics and the LIQ constants (consts row, float64):
    [mu (float32 value), sigma, alpha, scale, -, step, offset].

    mu = float32 mean; var = sum((x - mu)^2) / (n - 1) around that float32 mu (the eager
    centred dot product), combined from per-program (count, sum, local mean m_b,
    sum(x - m_b), sum((x - m_b)^2)) with sum((x-c)^2) = M2_b + 2 (m_b - c) D_b + n_b (m_b - c)^2.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    nb = tl.sum(m.to(tl.float32), 0)
    sb = tl.sum(x, 0)
    mb = sb / nb
    d = tl.where(m, x - mb, 0.0)
    row = part_ptr + pid * 5
    tl.store(row + 0, nb.to(tl.float64))
    tl.store(row + 1, sb.to(tl.float64))
    tl.store(row + 2, mb.to(tl.float64))
    tl.store(row + 3, tl.sum(d, 0).to(tl.float64))
    tl.store(row + 4, tl.sum(d * d, 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        nf = tl.cast(n, tl.float64)
        mu = (_col_sum(part_ptr, 1, 5, nprog, BLOCK_P) / nf).to(tl.float32).to(tl.float64)
        acc = tl.zeros([BLOCK_P], tl.float64)
        for start in range(0, nprog, BLOCK_P):
            i = start + tl.arange(0, BLOCK_P)
            ok = i < nprog
            n_i = tl.load(part_ptr + i * 5 + 0, mask=ok, other=0.0, volatile=True)
            m_i = tl.load(part_ptr + i * 5 + 2, mask=ok, other=0.0, volatile=True)
            d_i = tl.load(part_ptr + i * 5 + 3, mask=ok, other=0.0, volatile=True)
            q_i = tl.load(part_ptr + i * 5 + 4, mask=ok, other=0.0, volatile=True)
            c = m_i - mu
            acc += q_i + 2.0 * c * d_i + n_i * c * c
        var = tl.sum(acc, 0) / (nf - 1.0)
        sigma = tl.sqrt(var + 1e-12)
        a = tl.maximum(tl.load(alpha_ptr).to(tl.float32), 1e-8).to(tl.float64)
        q64 = tl.cast(Q, tl.float64)
        tl.store(consts_ptr + 0, mu)
        tl.store(consts_ptr + 1, sigma)
        tl.store(consts_ptr + 2, a)
        tl.store(consts_ptr + 3, ((q64 / 2.0) / (a * sigma)).to(tl.float32).to(tl.float64))
        if RESCALE:
            tl.store(consts_ptr + 5, (a * sigma * (2.0 / q64)).to(tl.float32).to(tl.float64))
            tl.store(consts_ptr + 6, (mu - a * sigma).to(tl.float32).to(tl.float64))
        else:
            tl.store(consts_ptr + 5, (a * (2.0 / q64)).to(tl.float32).to(tl.float64))
            tl.store(consts_ptr + 6, (-a).to(tl.float32).to(tl.float64))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _liq_bwd(x_ptr, g_ptr, alpha_ptr, consts_ptr, gx_ptr, part_ptr, cnt_ptr, ga_ptr, coef_ptr,
             n, Q: tl.constexpr, SIGNED: tl.constexpr, WN: tl.constexpr, RESCALE: tl.constexpr,
             NEED_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """h = g 1{0 < s < q} into gx; partial sums [sum g, sum g R, sum h, sum h clip(s)]; the
    last program writes dL/dalpha (eq. 6/7, as liq.LIQKernel.backward) and, with weight
    normalisation, the coefficients (c_h, k1, k0) of gx = c_h h + k1 x + k0."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mu, scale, shift, step, off = _liq_consts(alpha_ptr, consts_ptr, Q, SIGNED, WN)
    c = _liq_code(x, mu, scale, shift, Q, SIGNED, WN)
    r = _rne(c)
    h = _strict_pass(g, c, 0.0, Q * 1.0)
    tl.store(gx_ptr + offs, h.to(gx_ptr.dtype.element_ty), mask=m)
    row = part_ptr + pid * 4
    tl.store(row + 0, tl.sum(g, 0).to(tl.float64))
    tl.store(row + 1, tl.sum(g * r, 0).to(tl.float64))
    tl.store(row + 2, tl.sum(h, 0).to(tl.float64))
    tl.store(row + 3, tl.sum(h * c, 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        q64 = tl.cast(Q, tl.float64)
        sum_gr = _col_sum(part_ptr, 1, 4, nprog, BLOCK_P)
        sum_hc = _col_sum(part_ptr, 3, 4, nprog, BLOCK_P)
        if SIGNED:
            sum_g = _col_sum(part_ptr, 0, 4, nprog, BLOCK_P)
            sum_h = _col_sum(part_ptr, 2, 4, nprog, BLOCK_P)
            sum_gG = sum_gr * (2.0 / q64) - sum_g  # G = 2R/q - 1
            sum_ht = sum_hc * (2.0 / q64) - sum_h  # t = u / alpha inside
            ga = sum_gG - sum_ht
            if WN:
                sigma = tl.load(consts_ptr + 1)
                a = tl.load(consts_ptr + 2)
                mu64 = tl.load(consts_ptr + 0)
                if RESCALE:
                    ga = ga * sigma
                    c_h = tl.cast(1.0, tl.float64)
                else:
                    c_h = 1.0 / sigma
                nf = tl.cast(n, tl.float64)
                k1 = -c_h * (sum_ht * a)
                k0 = -c_h * sum_h
                if RESCALE:
                    k1 = k1 + a * sum_gG
                    k0 = k0 + sum_g
                k1 = k1 / ((nf - 1.0) * sigma)
                k0 = k0 / nf
                k0 = k0 - mu64 * k1
                tl.store(coef_ptr + 0, c_h)
                tl.store(coef_ptr + 1, k1)
                tl.store(coef_ptr + 2, k0)
        else:
            ga = (sum_gr - sum_hc) / q64  # eq. 7 summed: <g, R> - <h, clip(s)>, over q
        if NEED_A:
            tl.store(ga_ptr, ga.to(ga_ptr.dtype.element_ty))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _liq_wn_gx(x_ptr, gx_ptr, coef_ptr, n, RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    """gx = c_h h + k1 x + k0 in place over h (the standardisation's chain rule)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h = tl.load(gx_ptr + offs, mask=m, other=0.0).to(tl.float32)
    k1 = tl.load(coef_ptr + 1).to(tl.float32)
    k0 = tl.load(coef_ptr + 2).to(tl.float32)
    if not RESCALE:
        h = h * tl.load(coef_ptr + 0).to(tl.float32)
    gx = (h + x * k1) + k0
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


# ---- LSQ (Esser et al. 2020 eq. 1, 3; see uniform.LSQKernel) ----------------------------------
@triton.jit
def _lsq_consts(s_ptr, QN: tl.constexpr):
    s32 = tl.maximum(tl.load(s_ptr).to(tl.float32), 1e-8)
    s = s32.to(tl.float64)
    rs = (1.0 / s).to(tl.float32)
    off = (s * (-QN * 1.0)).to(tl.float32)
    return s32, rs, off


@triton.jit
def _lsq_fwd(x_ptr, s_ptr, y_ptr, n, QN: tl.constexpr, QP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s, rs, off = _lsq_consts(s_ptr, QN)
    r = _rne(tl.clamp(x * rs, -QN * 1.0, QP * 1.0, propagate_nan=tl.PropagateNan.ALL))
    if QN != 0:
        y = (r + QN * 1.0) * s + off
    else:
        y = r * s
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _lsq_bwd(x_ptr, g_ptr, s_ptr, gx_ptr, part_ptr, cnt_ptr, gs_ptr, n, n_grad,
             QN: tl.constexpr, QP: tl.constexpr, NEED_S: tl.constexpr, BLOCK: tl.constexpr,
             BLOCK_P: tl.constexpr):
    """gx = g 1{-Qn < v < Qp}; dL/ds = (<g, round(v)> - <gx, v>) / sqrt(n_grad Qp)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s, rs, off = _lsq_consts(s_ptr, QN)
    v = tl.clamp(x * rs, -QN * 1.0, QP * 1.0, propagate_nan=tl.PropagateNan.ALL)
    gx = _strict_pass(g, v, -QN * 1.0, QP * 1.0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
    if NEED_S:
        row = part_ptr + pid * 2
        tl.store(row + 0, tl.sum(g * _rne(v), 0).to(tl.float64))
        tl.store(row + 1, tl.sum(gx * v, 0).to(tl.float64))
        nprog = tl.num_programs(0)
        if _ticket(cnt_ptr) == nprog - 1:
            scale = 1.0 / tl.sqrt(tl.cast(n_grad, tl.float64) * QP)  # gradient scale, Sec. 2.2
            gsv = (_col_sum(part_ptr, 0, 2, nprog, BLOCK_P) - _col_sum(part_ptr, 1, 2, nprog, BLOCK_P)) * scale
            tl.store(gs_ptr, gsv.to(gs_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr, 0)


# ---- DoReFa (Zhou et al. 2016 Sec. 2.3, 2.5; see uniform.DoReFa*Kernel) ------------------------
@triton.jit
def _dorefa_a_fwd(x_ptr, y_ptr, n, Q: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    step = (1.0 / tl.cast(Q, tl.float64)).to(tl.float32)
    r = _rne(tl.clamp(x, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL) * (Q * 1.0))
    tl.store(y_ptr + offs, (r * step).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dorefa_a_bwd(x_ptr, g_ptr, gx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gx = tl.where((x < 0.0) | (x > 1.0), 0.0, g)  # 1{0 <= x <= 1}
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dorefa_w_stats(t_ptr, part_ptr, cnt_ptr, consts_ptr, n, BLOCK: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """consts[0] = max(max|tanh W|, 1e-8) (t = tanh W is the input)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.max(tl.abs(t), 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        mx = _col_max(part_ptr, 0, 1, nprog, BLOCK_P).to(tl.float32)
        tl.store(consts_ptr, tl.maximum(mx, 1e-8).to(tl.float64))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _dorefa_w_fwd(t_ptr, consts_ptr, y_ptr, n, Q: tl.constexpr, BLOCK: tl.constexpr):
    """codes = round((t / (2m) + 1/2) q); y = codes * (2/q) - 1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    t = tl.load(t_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    mm = tl.load(consts_ptr).to(tl.float32)
    codes = _rne((tl.math.div_rn(t, 2.0 * mm) + 0.5) * (Q * 1.0))
    step = (2.0 / tl.cast(Q, tl.float64)).to(tl.float32)
    tl.store(y_ptr + offs, (codes * step + (-1.0)).to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _dorefa_w_bwd_reduce(t_ptr, g_ptr, part_ptr, cnt_ptr, coef_ptr, n, BLOCK: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """coef = [m, #ties (>= 1), sum(g t) / m] with m = max(max|t|, 1e-8) and ties the
    elements with |t| == m (per program: local max, its count, sum g t)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    t = tl.load(t_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    a = tl.abs(t)
    mb = tl.max(a, 0)
    row = part_ptr + pid * 3
    tl.store(row + 0, mb.to(tl.float64))
    tl.store(row + 1, tl.sum(tl.where(msk & (a == mb), 1.0, 0.0), 0).to(tl.float64))
    tl.store(row + 2, tl.sum(g * t, 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        mc = tl.maximum(_col_max(part_ptr, 0, 3, nprog, BLOCK_P).to(tl.float32), 1e-8)
        cnt = tl.zeros([BLOCK_P], tl.float64)
        for start in range(0, nprog, BLOCK_P):
            i = start + tl.arange(0, BLOCK_P)
            ok = i < nprog
            m_i = tl.load(part_ptr + i * 3 + 0, mask=ok, other=-1.0, volatile=True)
            c_i = tl.load(part_ptr + i * 3 + 1, mask=ok, other=0.0, volatile=True)
            cnt += tl.where(m_i.to(tl.float32) == mc, c_i, 0.0)
        sgt = _col_sum(part_ptr, 2, 3, nprog, BLOCK_P).to(tl.float32)
        tl.store(coef_ptr + 0, mc.to(tl.float64))
        tl.store(coef_ptr + 1, tl.maximum(tl.sum(cnt, 0), 1.0))
        tl.store(coef_ptr + 2, tl.math.div_rn(sgt, mc).to(tl.float64))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _dorefa_w_bwd(t_ptr, g_ptr, coef_ptr, gx_ptr, n, BLOCK: tl.constexpr):
    """gx = (1 - t^2) / m * (g - sign(t) (1{|t| = m} / #ties) * sum(g t) / m)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    t = tl.load(t_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    mc = tl.load(coef_ptr + 0).to(tl.float32)
    cnt = tl.load(coef_ptr + 1).to(tl.float32)
    c = tl.load(coef_ptr + 2).to(tl.float32)
    ties = tl.math.div_rn(tl.where(tl.abs(t) == mc, 1.0, 0.0), cnt)
    sgn = tl.where(t > 0.0, 1.0, tl.where(t < 0.0, -1.0, 0.0))
    corr = (sgn * ties) * c
    gx = tl.math.div_rn(1.0 - t * t, mc) * (g - corr)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=msk)


# ---- TWN (Li & Liu 2016 Sec. 2; see uniform.TernaryKernel) -----------------------------------
@triton.jit
def _twn_delta(w_ptr, part_ptr, cnt_ptr, consts_ptr, n, BLOCK: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """consts[0] = Delta = 0.7 * mean|W| (float32 arithmetic as the eager kernel)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(tl.abs(w), 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        mean = (_col_sum(part_ptr, 0, 1, nprog, BLOCK_P) / tl.cast(n, tl.float64)).to(tl.float32)
        tl.store(consts_ptr + 0, (0.7 * mean).to(tl.float64))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _twn_alpha(w_ptr, part_ptr, cnt_ptr, consts_ptr, n, BLOCK: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """consts[1] = alpha = sum_{|W| > Delta} |W| / max(#{|W| > Delta}, 1)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    delta = tl.load(consts_ptr + 0).to(tl.float32)
    a = tl.abs(w)
    keep = a > delta  # padding lanes hold 0 and Delta >= 0: never kept
    row = part_ptr + pid * 2
    tl.store(row + 0, tl.sum(tl.where(keep, a, 0.0), 0).to(tl.float64))
    tl.store(row + 1, tl.sum(keep.to(tl.float32), 0).to(tl.float64))
    nprog = tl.num_programs(0)
    if _ticket(cnt_ptr) == nprog - 1:
        s = _col_sum(part_ptr, 0, 2, nprog, BLOCK_P).to(tl.float32)
        k = tl.maximum(_col_sum(part_ptr, 1, 2, nprog, BLOCK_P), 1.0).to(tl.float32)
        tl.store(consts_ptr + 1, tl.math.div_rn(s, k).to(tl.float64))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _twn_fwd(w_ptr, consts_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    w = tl.load(w_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    delta = tl.load(consts_ptr + 0).to(tl.float32)
    alpha = tl.load(consts_ptr + 1).to(tl.float32)
    codes = tl.where(w > delta, 2.0, tl.where(w < -delta, 0.0, 1.0))
    tl.store(y_ptr + offs, (codes * alpha + (-alpha)).to(y_ptr.dtype.element_ty), mask=msk)


# ---- sign: BNN clipped STE, Bi-Real ApproxSign (see binary.SignKernel) -------------------------
@triton.jit
def _sign_fwd(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _sign_pm1(x).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sign_bwd(x_ptr, g_ptr, gx_ptr, n, APPROX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if APPROX:  # max(0, 2 - 2|x|)
        d = tl.maximum(tl.abs(x) * -2.0 + 2.0, 0.0, propagate_nan=tl.PropagateNan.ALL)
        gx = g * d
    else:  # 1{|x| <= 1}
        gx = tl.where((x < -1.0) | (x > 1.0), 0.0, g)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


# ---- scaled sign: XNOR / BWN / Bi-Real weights (see binary.ScaledSignKernel) -----------------
@triton.jit
def _row_mean_abs(x_ptr, base, row, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, row, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(x_ptr + base + i, mask=i < row, other=0.0).to(tl.float32))
    return tl.math.div_rn(tl.sum(acc, 0), tl.cast(row, tl.float32))


@triton.jit
def _scaled_sign_fwd(w_ptr, y_ptr, row, BLOCK: tl.constexpr):
    """One program per output channel: alpha = mean|W_c|, y = copysign(alpha, W + 0)."""
    base = tl.program_id(0).to(tl.int64) * row
    alpha = _row_mean_abs(w_ptr, base, row, BLOCK)
    for start in range(0, row, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < row
        w = tl.load(w_ptr + base + i, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + i, (_sign_pm1(w) * alpha).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scaled_sign_bwd(w_ptr, g_ptr, gx_ptr, row, MAGNITUDE: tl.constexpr,
                     BLOCK: tl.constexpr):
    """magnitude: gx = g 1{|W| < 1} alpha; paper: gx = g (alpha 1{|W| <= 1} + 1/n)."""
    base = tl.program_id(0).to(tl.int64) * row
    alpha = _row_mean_abs(w_ptr, base, row, BLOCK)
    for start in range(0, row, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < row
        w = tl.load(w_ptr + base + i, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + i, mask=m, other=0.0).to(tl.float32)
        if MAGNITUDE:
            gx = _strict_pass(g, w, -1.0, 1.0) * alpha
        else:
            inv_n = (1.0 / tl.cast(row, tl.float64)).to(tl.float32)  # n = elements per filter
            gx = g * (tl.where((w < -1.0) | (w > 1.0), 0.0, alpha) + inv_n)
        tl.store(gx_ptr + base + i, gx.to(gx_ptr.dtype.element_ty), mask=m)
