"""Real binary convolution for CPU inference: XNOR-popcount on bit-packed operands.

What it computes (the training side's semantics, ``aqd_d2.quantization.binary``)::

    y = F.conv2d(F.pad(sign(x), [pw, pw, ph, ph], value=-1), sign(W), stride=s, dilation=d)
    y = y * alpha.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)     # each term optional

with ``sign(v) = +1 for v >= 0 else -1`` (sign(0) = +1; NaN counts as -1, as ``x >= 0``
says) and padding with -1, the value binary activation quantizers pad with. The integer
part is exact; the scaling is one float32 multiply and one float32 add, so both paths below
give the same float32 bits as that formula evaluated by torch.

Two implementations, selected automatically:

* the C++ extension (``csrc/``, built by :mod:`._ext_build`): the input is binarized and
  bit-packed in one pass (64 channels per ``uint64`` word, NHWC-style, padding pixels stored
  as all-zero words = -1), then a direct convolution computes ``dot = K - 2 popcount(x ^ w)``
  tile by tile (several output pixels x 16 output channels) with OpenMP over output rows and
  channel blocks, and writes ``dot * alpha + bias``. The variant for the CPU's instruction
  set (AVX-512 VPOPCNTDQ, AVX2, POPCNT, portable) is chosen at run time;
* a pure-PyTorch fallback (the formula above on +-1 floats, exact because every partial sum
  is an integer below 2**24), used when the extension cannot be built or loaded, or when
  ``AQD_BINARY_KERNEL=torch`` is set.

Environment: ``AQD_BINARY_KERNEL`` = ``auto`` (default) | ``torch`` (force the fallback) |
``cpp`` (require the extension, error if unavailable); ``AQD_BINARY_ISA`` = ``generic`` |
``popcnt`` | ``avx2`` | ``avx512`` forces one kernel variant (default: the best one).

Memory format: the output has the input's (NCHW in -> NCHW out, channels_last in ->
channels_last out). Inference only: no autograd.
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._ext_build import OPS_NAMESPACE, load_extension

__all__ = [
    "ISA_NAMES",
    "BinaryConv2dInference",
    "PackedBinaryWeight",
    "available_isas",
    "binary_conv2d",
    "kernel_available",
    "kernel_backend",
    "pack_input",
    "pack_weights",
]

IntPair = Union[int, Tuple[int, int]]
ISA_NAMES = ("generic", "popcnt", "avx2", "avx512")  # index = the extension's isa id
OUT_BLOCK = 16  # output channels per weight block (csrc/binary_conv.h: kOutBlock)
WORD_BITS = 64

# Bit j of an int64 word, as a signed value (bit 63 is -2**63): summing distinct bits of a
# word in int64 is exact and equals their bitwise OR.
_BIT_VALUES = torch.tensor([1 << j for j in range(63)] + [-(1 << 63)], dtype=torch.int64)


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


# ---- packed weights ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PackedBinaryWeight:
    """Sign bits of a conv weight, packed for the kernel, with its per-channel scale and bias.

    Attributes:
        words: int64 (read as uint64) tensor ``[OB, KH, KW, CW, 16]``, ``OB = ceil(O/16)``,
            ``CW = ceil(C/64)``: bit ``c % 64`` of ``words[o // 16, kh, kw, c // 64, o % 16]``
            is 1 where ``W[o, c, kh, kw] >= 0`` (+1), 0 where it is -1. Channel tail bits and
            the padding output channels of the last block are 0.
        out_channels, in_channels: O and C.
        kernel_size: ``(KH, KW)``.
        alpha: float32 ``[O]`` per-output-channel scale, or None (1).
        bias: float32 ``[O]``, or None.
    """

    words: torch.Tensor
    out_channels: int
    in_channels: int
    kernel_size: Tuple[int, int]
    alpha: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @functools.cached_property
    def signs(self) -> torch.Tensor:
        """The +-1 float32 weight ``[O, C, KH, KW]`` (unpacked once, then cached)."""
        o, c = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        cw = self.words.shape[3]
        words = self.words.permute(0, 4, 1, 2, 3).reshape(-1, kh, kw, cw)[:o]
        bits = (words.unsqueeze(-1) >> torch.arange(WORD_BITS)) & 1  # arithmetic shift: ok
        bits = bits.reshape(o, kh, kw, cw * WORD_BITS)[..., :c].permute(0, 3, 1, 2)
        return (bits * 2 - 1).to(torch.float32).contiguous()


def pack_weights(
    weight: torch.Tensor,
    alpha: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> PackedBinaryWeight:
    """Pack ``sign(weight)`` (sign(0) = +1) for :func:`binary_conv2d`.

    Args:
        weight: float ``[O, C, KH, KW]``; only its signs are kept.
        alpha: optional per-output-channel scale, ``O`` values (any shape with O elements).
        bias: optional per-output-channel bias, ``O`` values.
    Returns:
        :class:`PackedBinaryWeight` (CPU tensors).
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [O, C, KH, KW], got shape {tuple(weight.shape)}")
    o, c, kh, kw = (int(s) for s in weight.shape)
    if min(o, c, kh, kw) < 1:
        raise ValueError(f"weight has an empty dimension: {tuple(weight.shape)}")
    cw = -(-c // WORD_BITS)
    ob = -(-o // OUT_BLOCK)
    bits = (weight.detach().cpu() >= 0).permute(0, 2, 3, 1).to(torch.int64)  # [O, KH, KW, C]
    bits = F.pad(bits, (0, cw * WORD_BITS - c)).view(o, kh, kw, cw, WORD_BITS)
    words = torch.zeros(ob * OUT_BLOCK, kh, kw, cw, dtype=torch.int64)
    words[:o] = (bits * _BIT_VALUES).sum(-1)
    words = words.view(ob, OUT_BLOCK, kh, kw, cw).permute(0, 2, 3, 4, 1).contiguous()

    def per_channel(t: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t.detach().cpu().to(torch.float32).reshape(-1)
        if t.numel() == 1 and o != 1:
            t = t.expand(o)
        if t.numel() != o:
            raise ValueError(f"{name} must have {o} values (one per output channel), got {t.numel()}")
        return t.contiguous()

    return PackedBinaryWeight(
        words, o, c, (kh, kw), per_channel(alpha, "alpha"), per_channel(bias, "bias")
    )


# ---- backend selection -------------------------------------------------------------------------
def kernel_available() -> bool:
    """True when the C++ extension is built and loaded (builds it on the first call, about
    20 s). Independent of ``AQD_BINARY_KERNEL``."""
    return load_extension()


@functools.lru_cache(maxsize=None)
def _available_isa_ids() -> Tuple[int, ...]:
    """The extension's ids of the variants this CPU runs (fixed for the process). Asked with
    the JIT tracer suspended: while it traces (fvcore's FLOP count of a deployed model, with
    ``AQD_BINARY_ISA`` set) it cannot record an op that returns a list of ints."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return tuple(getattr(torch.ops, OPS_NAMESPACE).available_isas())
    finally:
        torch._C._set_tracing_state(state)


def available_isas() -> List[str]:
    """Kernel variants this CPU can run (empty when the extension is unavailable)."""
    if not kernel_available():
        return []
    return [ISA_NAMES[i] for i in _available_isa_ids()]


def _isa_id(isa: Optional[str]) -> int:
    isa = isa or os.environ.get("AQD_BINARY_ISA", "") or None
    if isa is None:
        return -1
    if isa not in ISA_NAMES:
        raise ValueError(f"unknown kernel variant {isa!r}; choose from {ISA_NAMES}")
    if isa not in available_isas():
        raise RuntimeError(f"kernel variant {isa!r} is not available here ({available_isas()})")
    return ISA_NAMES.index(isa)


def _use_extension(backend: Optional[str]) -> bool:
    backend = backend or os.environ.get("AQD_BINARY_KERNEL", "auto") or "auto"
    if backend == "torch":
        return False
    if backend == "cpp":
        if not kernel_available():
            from ._ext_build import extension_error

            raise RuntimeError(
                f"the binary conv extension is required but unavailable: {extension_error()}")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    return kernel_available()


def kernel_backend(backend: Optional[str] = None) -> str:
    """Which implementation :func:`binary_conv2d` uses: ``"torch"`` or ``"cpp-<isa>"``."""
    if not _use_extension(backend):
        return "torch"
    isa = _isa_id(None)
    return "cpp-" + (available_isas()[-1] if isa < 0 else ISA_NAMES[isa])


# ---- convolution -------------------------------------------------------------------------------
def _float_input(x: torch.Tensor, packed: PackedBinaryWeight) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != packed.in_channels:
        raise ValueError(f"input has {x.shape[1]} channels, the weight expects {packed.in_channels}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError("binary_conv2d runs on the CPU")
    x = x.detach()
    if x.dtype == torch.float64:  # a tiny negative double would round to -0.0 (= +1)
        return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)
    return x.to(torch.float32)  # exact from half / bfloat16: every sign is kept


def binary_conv2d(
    x: torch.Tensor,
    packed: PackedBinaryWeight,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: Optional[str] = None,
    isa: Optional[str] = None,
) -> torch.Tensor:
    """``conv2d(pad(sign(x), -1), sign(W)) * alpha + bias`` (module docstring), float32.

    Args:
        x: float ``[N, C, H, W]`` (NCHW or channels_last; other float dtypes are read as
            float32 with every sign kept).
        packed: from :func:`pack_weights`.
        stride, padding, dilation: ints or ``(h, w)`` pairs, as for ``F.conv2d``; padding
            inserts -1.
        groups: only 1 is supported.
        backend: ``"auto"`` / ``"cpp"`` / ``"torch"``; default ``$AQD_BINARY_KERNEL`` or auto.
        isa: force a kernel variant (:data:`ISA_NAMES`); default ``$AQD_BINARY_ISA`` or best.
    Returns:
        float32 ``[N, O, OH, OW]`` in ``x``'s memory format.
    """
    if groups != 1:
        raise NotImplementedError(f"binary_conv2d supports groups=1 only, got groups={groups}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"bad stride/padding/dilation: {stride}, {padding}, {dilation}")
    x = _float_input(x, packed)
    if _use_extension(backend):
        return getattr(torch.ops, OPS_NAMESPACE).conv2d(
            x, packed.words, packed.alpha, packed.bias, packed.out_channels, packed.in_channels,
            list(packed.kernel_size), [sh, sw], [ph, pw], [dh, dw], _isa_id(isa),
        )
    return _binary_conv2d_torch(x, packed, (sh, sw), (ph, pw), (dh, dw))


def _binary_conv2d_torch(x, packed, stride, padding, dilation) -> torch.Tensor:
    """The fallback: the reference formula on +-1 float32 tensors."""
    one = torch.ones((), dtype=x.dtype)
    xs = torch.where(x >= 0, one, -one)
    if padding != (0, 0):
        xs = F.pad(xs, [padding[1], padding[1], padding[0], padding[0]], value=-1.0)
    # NNPACK's Winograd/FFT convolutions are not exact on integers; the default direct and
    # im2col+GEMM convolutions are (every partial sum is an integer < 2**24).
    with torch.backends.nnpack.flags(enabled=False):
        y = F.conv2d(xs, packed.signs, None, stride, 0, dilation)
    if packed.alpha is not None:
        y = y * packed.alpha.view(1, -1, 1, 1)
    if packed.bias is not None:
        y = y + packed.bias.view(1, -1, 1, 1)
    # x's memory format, as the C++ kernel (F.conv2d may pick channels_last for a 1x1 weight
    # whose strides are ambiguous; a float layer after this one would then round differently)
    from aqd_d2.layers.integer_eval import kernel_memory_format

    return y.contiguous(memory_format=kernel_memory_format(x))


def pack_input(x: torch.Tensor, padding: IntPair = 0, *, isa: Optional[str] = None) -> torch.Tensor:
    """The kernel's packed input (for tests and tools): int64 ``[N, H + 2ph, W + 2pw, CW]``,
    bit ``c % 64`` of word ``c // 64`` = ``x[n, c, h, w] >= 0``; padding pixels are 0 words.
    Needs the extension."""
    if not kernel_available():
        raise RuntimeError("pack_input needs the C++ extension")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a 4-D floating tensor")
    return getattr(torch.ops, OPS_NAMESPACE).pack_input(
        x.detach().to(torch.float32), list(_pair(padding, "padding")), _isa_id(isa)
    )


# ---- module ------------------------------------------------------------------------------------
class BinaryConv2dInference(nn.Module):
    """Inference-only binary conv: bit-packed weight + :func:`binary_conv2d`, then the
    optional ``norm`` and ``activation`` (as ``detectron2.layers.Conv2d`` applies them).

    State (buffers, so ``state_dict`` round-trips): ``weight_words`` (int64, the packed sign
    bits), ``alpha`` and ``bias`` (float32 ``[O]`` or absent).

    Args:
        weight: float ``[O, C, KH, KW]``; only its signs are kept.
        alpha: optional per-output-channel scale (``O`` values).
        bias: optional bias (``O`` values).
        stride, padding, dilation: as for ``nn.Conv2d``; padding inserts -1.
        groups: must be 1.
        norm, activation: optional modules applied to the conv output (copied).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        alpha: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        norm: Optional[nn.Module] = None,
        activation: Optional[nn.Module] = None,
    ):
        super().__init__()
        if groups != 1:
            raise NotImplementedError(f"BinaryConv2dInference supports groups=1 only, got {groups}")
        packed = pack_weights(weight, alpha, bias)
        self.in_channels = packed.in_channels
        self.out_channels = packed.out_channels
        self.kernel_size = packed.kernel_size
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.register_buffer("weight_words", packed.words)
        self.register_buffer("alpha", packed.alpha)
        self.register_buffer("bias", packed.bias)
        self.norm = copy.deepcopy(norm)
        self.activation = copy.deepcopy(activation)
        self._refresh_packed()

    @classmethod
    def from_qconv(cls, layer: nn.Module) -> "BinaryConv2dInference":
        """Build from a binarized conv layer (aqd_d2's ``QConv2d``): its weight quantizer must
        be a 1-bit one with an integer encoding (codes = sign bits, ``offset = -alpha``), its
        input quantizer a 1-bit one that pads with -1. XNOR's activation scale K is not
        supported. The layer's bias, stride, padding, dilation, norm and activation are used.
        """
        wq = getattr(layer, "weight_quantizer", None)
        iq = getattr(layer, "input_quantizer", None)
        for q, role in ((wq, "weight"), (iq, "input")):
            if q is None or not bool(getattr(q, "enabled", True)) or int(getattr(q, "bits", 0)) != 1:
                raise ValueError(
                    f"{type(layer).__name__}: the {role} quantizer must be an enabled 1-bit one")
        if float(getattr(iq, "padding_value", 0.0)) != -1.0:
            raise ValueError("the input quantizer must pad with -1 (a binary activation quantizer)")
        if getattr(iq, "scale_activations", False):
            raise NotImplementedError("XNOR-Net's activation scale K is not supported")
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise NotImplementedError(f"padding_mode {layer.padding_mode!r} is not supported")
        padding = layer.padding
        if isinstance(padding, str):  # torch's "valid" / "same"; "same" must split evenly
            totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            if padding == "same" and any(t % 2 for t in totals):
                raise NotImplementedError("padding='same' with an uneven split is not supported")
            padding = tuple(t // 2 if padding == "same" else 0 for t in totals)
        codes, step, offset = wq.encode(layer.weight)
        o = layer.weight.shape[0]
        alpha = (-offset.detach().to(torch.float32)).reshape(-1)
        if not torch.equal(step.detach().to(torch.float32).reshape(-1), 2 * alpha):
            raise ValueError("the weight encoding is not a (scaled) sign: step != -2 * offset")
        alpha = None if bool((alpha == 1).all()) else alpha.expand(o)
        return cls(
            codes.to(torch.float32) * 2 - 1, alpha, getattr(layer, "bias", None),
            layer.stride, padding, layer.dilation, layer.groups,
            getattr(layer, "norm", None), getattr(layer, "activation", None),
        )

    def _refresh_packed(self) -> None:
        """Rebuild the packed view of the buffers (after init, ``_apply`` and loading)."""
        def f32(t):
            return None if t is None else t.to(torch.float32)

        self._packed = PackedBinaryWeight(
            self.weight_words, self.out_channels, self.in_channels, self.kernel_size,
            f32(self.alpha), f32(self.bias),
        )

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh_packed()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_packed()

    @property
    def packed(self) -> PackedBinaryWeight:
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = binary_conv2d(x, self._packed, self.stride, self.padding, self.dilation)
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding} (value -1), dilation={self.dilation}, "
            f"alpha={self.alpha is not None}, bias={self.bias is not None}"
        )
