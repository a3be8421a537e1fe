"""k-bit conv / linear inference on int8 codes with an exact int32 accumulator, used by
:func:`aqd_d2.export.deploy.convert_for_inference` for 2..7-bit layers.

Two implementations of the same integer arithmetic (:class:`Int8ConvInference`):

* the fused C++ kernel ``aqd_binary::int8_conv2d`` (``csrc/int8_conv.cpp``, built with the
  binary conv extension by :mod:`._ext_build`): the input is encoded (LSQ, LIQ and DoReFa
  activation quantizers: in the kernel, :func:`fused_encoding`; others: by the quantizer's
  ``encode`` first) and packed into a padded NHWC buffer in one pass and convolved directly (no im2col copy) with AVX-512 VNNI
  ``vpdpbusd`` (u8 input codes x s8 weight codes -> int32), AVX2 ``vpmaddubsw`` or portable
  C++, chosen at run time from the CPU's features; the float epilogue runs on each int32
  tile while it is in cache;
* the PyTorch path: NHWC pad copy + ``as_strided`` im2col + ``torch._int_mm`` (PyTorch's
  int8 x int8 -> int32 CPU GEMM) + float epilogue.

Both give the same int32 accumulators; the only rounding is the final float32 scaling, one
fused multiply-add per term (``torch.addcmul`` rounds once on CPUs with FMA; the C++
epilogue uses FMA explicitly), so the two paths agree bit for bit there.

Environment: ``AQD_INT8_KERNEL`` = ``auto`` (default: the C++ kernel where the extension
loads and the CPU has AVX-512 VNNI or AVX2, its best variant; both were measured faster than
the PyTorch path, AVX2 on an emulated AVX2-only CPU (oneDNN and ATen capped to AVX2: 1.5-2.1x
float vs 0.9-1.6x for ``torch._int_mm``); else the PyTorch path) | ``torch`` | ``cpp`` (require the extension; error if unavailable);
``AQD_INT8_ISA`` = ``generic`` | ``avx2`` | ``avx512vnni`` forces one C++ variant (and the C++
kernel under ``auto``). While the JIT tracer runs (FLOP counting), the PyTorch path is used,
so that its ``aten::_int_mm`` is counted; so it is for tensors on other devices than the CPU.

Why not ``torch.ao.nn.quantized.Conv2d`` (fbgemm)? It is about as fast here (see
tools/bench_deploy.py) but re-quantizes its *output* to 8 bits, a precision loss that the
fake-quantized model does not have.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import List, Optional, Tuple

import torch
from torch import nn

from aqd_d2.layers.integer_eval import int8_constants, int8_epilogue

from ._ext_build import OPS_NAMESPACE, load_extension

__all__ = [
    "INT8_ISA_NAMES", "INT8_KERNEL_CHOICES", "Int8ConvInference", "fused_encoding",
    "int8_available_isas", "int8_gemm_available", "int8_kernel_backend",
]

INT8_ISA_NAMES = ("generic", "avx2", "avx512vnni")  # index = the extension's isa id
INT8_KERNEL_CHOICES = ("auto", "torch", "cpp")
LANES = 16  # output channels per weight vector of the C++ kernel (csrc/int8_conv.h: kLanes)


def int8_gemm_available() -> bool:
    """True when ``torch._int_mm`` runs on the CPU here."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0]) == 8
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _available_isas() -> Tuple[str, ...]:
    if not load_extension():
        return ()
    return tuple(INT8_ISA_NAMES[i] for i in getattr(torch.ops, OPS_NAMESPACE).int8_available_isas())


def int8_available_isas() -> List[str]:
    """The C++ kernel variants this CPU and build run (empty without the extension)."""
    return list(_available_isas())


def _env_choice(var: str, allowed: Tuple[str, ...], default: str) -> str:
    value = os.environ.get(var, "") or default
    if value not in allowed:
        raise ValueError(f"${var}={value!r}: allowed values are {', '.join(allowed)}")
    return value


def int8_kernel_backend() -> Tuple[str, int]:
    """``(backend, isa id)`` that :class:`Int8ConvInference` uses now: ``("torch", -1)`` or
    ``("cpp", id)`` (an index of :data:`INT8_ISA_NAMES`), from ``$AQD_INT8_KERNEL`` and
    ``$AQD_INT8_ISA`` (module docstring).

    Raises:
        ValueError: an environment value outside the allowed ones.
        RuntimeError: ``cpp`` or an ISA was requested and is not available.
    """
    kernel = _env_choice("AQD_INT8_KERNEL", INT8_KERNEL_CHOICES, "auto")
    isa = _env_choice("AQD_INT8_ISA", ("",) + INT8_ISA_NAMES, "")
    if kernel == "torch":
        return "torch", -1
    available = _available_isas()
    if isa:
        if isa not in available:
            raise RuntimeError(f"$AQD_INT8_ISA={isa!r} is not available here (available: "
                               f"{', '.join(available) or 'none, the C++ extension did not load'})")
        return "cpp", INT8_ISA_NAMES.index(isa)
    if kernel == "cpp":
        if not available:
            raise RuntimeError("$AQD_INT8_KERNEL=cpp but the C++ extension did not load")
        return "cpp", INT8_ISA_NAMES.index(available[-1])
    # measured (tools/bench_deploy.py): VNNI 2.5-4.4x float; on an AVX2-only CPU (emulated
    # with oneDNN / ATen capped to AVX2) the AVX2 variant 1.5-2.1x, torch._int_mm 0.9-1.6x
    for best in ("avx512vnni", "avx2"):
        if best in available:
            return "cpp", INT8_ISA_NAMES.index(best)
    return "torch", -1


def fused_encoding(quantizer: nn.Module, x: torch.Tensor) -> Optional[Tuple[List[float], float, int]]:
    """The input quantizer's encoding for the C++ kernel, which then encodes while it packs
    (csrc/int8_conv.h, ``Encoding``): ``[m, lo, hi, add, mode]`` with mode 0
    ``c = round(clamp(x * m, lo, hi)) + add`` and mode 1 ``c = round(clamp(x, lo, hi) * m) + add``,
    the arithmetic of the quantizer's ``encode`` (LSQ: ``m = 1/s``, ``add = Qn``; LIQ
    activations: ``m = q/alpha``; DoReFa activations: ``clip(x, 0, 1) * q``), with the step
    ``s_x`` and zero point ``z`` that ``encode`` returns (``x_q = s_x (c - z)``).

    Args:
        quantizer: the layer's activation quantizer (eval mode).
        x: the input (for its dtype and device only).
    Returns:
        ``(encoding, s_x, z)``, or None for any other quantizer (its own ``encode`` runs first).
    """
    from aqd_d2.quantization.liq import LIQKernel
    from aqd_d2.quantization.uniform import DoReFaActivationKernel, LSQKernel

    k = getattr(quantizer, "kernel", None)
    if type(k) is LSQKernel:
        s, rs, _ = k._consts(x, *quantizer.quant_params())  # Python floats on CPU
        if not isinstance(rs, float):
            return None
        return [rs, float(-k.qn), float(k.qp), float(k.qn), 0.0], s, k.qn
    if type(k) is LIQKernel and not k.signed:
        consts, _ = k._affine(x.reshape(-1)[:1], *quantizer.quant_params())  # s = x * (q / a)
        if not isinstance(consts.a, float):
            return None
        return [k.levels / consts.a, 0.0, float(k.levels), 0.0, 0.0], consts.step, 0
    if type(k) is DoReFaActivationKernel:
        return [float(k.levels), 0.0, 1.0, 0.0, 1.0], 1.0 / k.levels, 0
    return None


class Int8ConvInference(nn.Module):
    """Inference-only k-bit conv (or linear) on int8 codes with an exact int32 accumulator.

    With input codes ``c_x`` (``x_q = s_x * (c_x - z)``, ``z`` an integer zero point) and weight
    codes ``c_w`` (``w_q = s_w * c_w + o_w`` per output channel), the conv of the fake-quantized
    tensors is ``y = s_x * (s_w * A + o'_w * S) + b`` where ``A = conv(c_x - z, c_w - 2^(k-1))``,
    ``o'_w = o_w + s_w 2^(k-1)`` and ``S = conv(c_x - z, 1)``: both come from one int8 GEMM
    (``torch._int_mm``) of the im2col'ed input with ``[c_w - 2^(k-1) | 1]``. Zero padding of
    ``x_q`` is zero padding of ``c_x - z``.

    Args:
        codes: uint8 weight codes ``[O, C, KH, KW]`` (conv) or ``[O, C]`` (linear).
        step, offset: the weight encoding (broadcastable to ``codes``; scalar or per channel).
        bits: weight bits (<= 8).
        input_quantizer: the layer's activation quantizer (deep-copied, eval mode); its
            ``encode`` gives ``c_x``; its grid must contain 0 and have at most 7 bits.
        bias: optional ``O`` values.
        stride, padding, dilation: conv geometry (ignored for linear).
        bn: optional ``(scale, shift)`` folded into the output.
        norm, activation: modules applied after (copied), ``norm`` only if not folded.
    """

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int,
                 input_quantizer: nn.Module, bias: Optional[torch.Tensor] = None,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 bn: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 norm: Optional[nn.Module] = None, activation: Optional[nn.Module] = None):
        super().__init__()
        self.linear = codes.dim() == 2
        o = int(codes.shape[0])
        self.out_channels = o
        self.in_channels = int(codes.shape[1])
        self.kernel_size = (1, 1) if self.linear else tuple(int(k) for k in codes.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.w_bits = int(bits)
        self.a_bits = int(input_quantizer.bits)
        half = 1 << (bits - 1)
        # [K, O+1] int8, K ordered (kh, kw, c) to match the NHWC im2col
        w = codes.to(torch.int16) - half
        w = w.reshape(o, -1) if self.linear else w.permute(0, 2, 3, 1).reshape(o, -1)
        # the constants of the eval-mode integer form of the trained layer (the same function):
        # the all-ones column (receptive-field sum S) only where the grid is not symmetric
        # about 0 (e.g. LIQ's weight grid; LSQ / DoReFa / TWN / binary grids are symmetric)
        wscale, wshift, bias_f, self.has_sum_column = int8_constants(step, offset, bits, o, bias, bn)
        if self.has_sum_column:
            w = torch.cat([w, torch.ones(1, w.shape[1], dtype=torch.int16)], 0)
        self.register_buffer("weight_int8", w.t().contiguous().to(torch.int8))
        # the same weights for the C++ kernel: [OV, KS, 16, 4], channels padded to Cp = 4 *
        # ceil(C / 4), columns to 16 * OV, KS = KH * KW * Cp / 4; and each column's sum
        # (csrc/int8_conv.cpp). Derived from weight_int8 here, hence not saved separately.
        cols, c = w.shape[0], self.in_channels
        taps = self.kernel_size[0] * self.kernel_size[1]
        cp, ov = -(-c // 4) * 4, -(-cols // LANES)
        wp = torch.zeros(ov * LANES, taps, cp, dtype=torch.int16)
        wp[:cols, :, :c] = w.reshape(cols, taps, c)
        wp = wp.reshape(ov, LANES, taps * cp // 4, 4).permute(0, 2, 1, 3).contiguous()
        self.register_buffer("weight_packed", wp.to(torch.int8), persistent=False)
        wsum = torch.zeros(ov * LANES, dtype=torch.int32)
        wsum[:cols] = w.sum(1).to(torch.int32)
        self.register_buffer("weight_sum", wsum, persistent=False)
        self.register_buffer("w_scale", wscale)
        self.register_buffer("w_shift", wshift)
        self.register_buffer("bias", bias_f)
        self.input_quantizer = copy.deepcopy(input_quantizer).eval()
        self.norm = None if bn is not None else copy.deepcopy(norm)
        self.activation = copy.deepcopy(activation)

    def _encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Input codes ``c_x`` (uint8, like ``x``), step ``s_x`` (0-d) and zero point ``z``
        (``x_q = s_x (c_x - z)``)."""
        codes, step, offset = self.input_quantizer.encode(x)
        step = step.reshape(())
        return codes, step, int(torch.round(-offset.reshape(()) / step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: float input ``[N, C, H, W]`` (conv, any memory format) or ``[..., C]`` (linear).
        Returns:
            float32 ``[N, O, OH, OW]`` in channels_last memory (conv) or ``[..., O]`` (linear).
        """
        x = x.detach() if x.dtype == torch.float32 else x.detach().float()
        backend, isa = (("torch", -1) if torch.jit.is_tracing() or x.device.type != "cpu"
                        else int8_kernel_backend())
        fused = fused_encoding(self.input_quantizer, x) if backend == "cpp" and x.numel() else None
        if fused is not None:  # the kernel encodes while it packs
            y = self._forward_cpp(x, *fused, isa)
        else:
            codes, sx, zero = self._encode(x)
            y = (self._forward_cpp(codes, None, float(sx), zero, isa) if backend == "cpp"
                 else self._forward_torch(codes, sx, zero))
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def _forward_cpp(self, x: torch.Tensor, enc: Optional[List[float]], sx: float, zero: int,
                     isa: int) -> torch.Tensor:
        """The fused C++ kernel (``aqd_binary::int8_conv2d``) on uint8 codes (``enc`` None) or
        on the float input with its encoding ``enc`` (:func:`fused_encoding`); ``sx`` is the
        input step (rounded to float32 by the kernel), ``zero`` the zero point."""
        o = self.out_channels
        shift = self.w_shift if self.has_sum_column else None
        args = (enc, zero, sx, self.weight_packed, self.weight_sum, self.w_scale, shift, self.bias, o)
        op = getattr(torch.ops, OPS_NAMESPACE).int8_conv2d
        if self.linear:  # [M, C] = an NHWC image of M x 1 pixels, 1x1 kernel
            lead = x.shape[:-1]
            img = x.reshape(1, -1, 1, self.in_channels).permute(0, 3, 1, 2)
            y = op(img, *args, [1, 1], [1, 1], [0, 0], [1, 1], isa)
            return y.permute(0, 2, 3, 1).reshape(*lead, o)
        return op(x, *args, self.kernel_size, self.stride, self.padding, self.dilation, isa)

    def _forward_torch(self, codes: torch.Tensor, sx: torch.Tensor, zero: int) -> torch.Tensor:
        """NHWC pad + im2col + ``torch._int_mm`` + float epilogue on ``c_x - z`` as int8."""
        if zero == 0:  # codes <= 127 (at most 7 bits): the same bits as int8
            # (a dtype view is free; the JIT tracer used by the FLOP counter cannot record it)
            xi = codes.to(torch.int8) if torch.jit.is_tracing() else codes.view(torch.int8)
        else:
            xi = (codes.to(torch.int16) - zero).to(torch.int8)
        o = self.out_channels
        if self.linear:
            lead = xi.shape[:-1]
            cols = xi.reshape(-1, self.in_channels)
        else:
            n, c, h, w = xi.shape
            kh, kw = self.kernel_size
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            nhwc = xi.permute(0, 2, 3, 1)
            if ph or pw:
                padded = xi.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
                padded[:, ph:ph + h, pw:pw + w] = nhwc
                nhwc = padded
            else:
                nhwc = nhwc.contiguous()
            hp, wp = nhwc.shape[1], nhwc.shape[2]
            if (kh, kw, sh, sw) == (1, 1, 1, 1):
                cols = nhwc.reshape(-1, c)
            else:
                cols = nhwc.as_strided(
                    (n, oh, ow, kh, kw, c),
                    (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1),
                ).reshape(n * oh * ow, kh * kw * c)
        acc = torch._int_mm(cols, self.weight_int8).float()
        y = int8_epilogue(acc, self.w_scale, self.w_shift, self.bias, sx, self.has_sum_column)
        if self.linear:
            return y.reshape(*lead, o)
        return y.view(n, oh, ow, o).permute(0, 3, 1, 2)  # channels_last memory

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return f"{self.in_channels}, {self.out_channels}, {kind}, w_bits={self.w_bits}, a_bits={self.a_bits}"
