"""k-bit conv / linear inference on int8 codes with an exact int32 accumulator
(``torch._int_mm``, PyTorch's int8 x int8 -> int32 CPU GEMM), used by
:func:`aqd_d2.export.deploy.convert_for_inference` for 2..7-bit layers.

Why not ``torch.ao.nn.quantized.Conv2d`` (fbgemm)? It is about as fast here (see
tools/bench_deploy.py) but re-quantizes its *output* to 8 bits, a precision loss that the
fake-quantized model does not have; ``_int_mm`` keeps the exact accumulator and the only
rounding is the final float32 scaling.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["Int8ConvInference", "int8_gemm_available"]

def int8_gemm_available() -> bool:
    """True when ``torch._int_mm`` runs on the CPU here."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0]) == 8
    except RuntimeError:
        return False


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
        step = step.detach().double().reshape(-1).expand(o)
        offset = offset.detach().double().reshape(-1).expand(o)
        wscale, wshift = step, offset + step * half
        # the all-ones column (receptive-field sum S) only where the grid is not symmetric
        # about 0 (e.g. LIQ's weight grid; LSQ / DoReFa / TWN / binary grids are symmetric)
        self.has_sum_column = bool((wshift != 0).any())
        if self.has_sum_column:
            w = torch.cat([w, torch.ones(1, w.shape[1], dtype=torch.int16)], 0)
        self.register_buffer("weight_int8", w.t().contiguous().to(torch.int8))
        bias_d = bias.detach().double() if bias is not None else torch.zeros(o, dtype=torch.float64)
        if bn is not None:  # (s_w A + o'_w S) s_x + b, then * scale + shift
            wscale, wshift = wscale * bn[0].double(), wshift * bn[0].double()
            bias_d = bias_d * bn[0].double() + bn[1].double()
        self.register_buffer("w_scale", wscale.float())
        self.register_buffer("w_shift", wshift.float())
        self.register_buffer("bias", bias_d.float())
        self.input_quantizer = copy.deepcopy(input_quantizer).eval()
        self.norm = None if bn is not None else copy.deepcopy(norm)
        self.activation = copy.deepcopy(activation)

    def _input_codes(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        codes, step, offset = self.input_quantizer.encode(x)
        step = step.reshape(())
        zero = torch.round(-offset.reshape(()) / step)
        if float(zero) == 0:  # codes <= 127 (at most 7 bits): the same bits as int8
            # (a dtype view is free; the JIT tracer used by the FLOP counter cannot record it)
            return (codes.to(torch.int8) if torch.jit.is_tracing() else codes.view(torch.int8)), step
        return (codes.to(torch.int16) - int(zero)).to(torch.int8), step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi, sx = self._input_codes(x.detach() if x.dtype == torch.float32 else x.detach().float())
        o = self.out_channels
        if self.linear:
            lead = x.shape[:-1]
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
        if self.has_sum_column:
            y = torch.addcmul(self.bias, acc[:, :o], self.w_scale * sx)
            y.addcmul_(acc[:, o:], self.w_shift * sx)
        else:
            y = torch.addcmul(self.bias, acc, self.w_scale * sx)
        if self.linear:
            y = y.reshape(*lead, o)
        else:
            y = y.view(n, oh, ow, o).permute(0, 3, 1, 2)  # channels_last memory
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return f"{self.in_channels}, {self.out_channels}, {kind}, w_bits={self.w_bits}, a_bits={self.a_bits}"
