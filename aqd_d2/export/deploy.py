"""Turn a fake-quantized model into an inference model that computes with real low-bit kernels.

:func:`convert_for_inference` replaces, layer by layer (after :func:`aqd_d2.convert.quantize_model`
and training, or after :func:`load_for_inference` read a packed file):

* **binary conv / linear** (1-bit weight *and* 1-bit input, sign-padded with -1, no XNOR
  activation scale K, groups 1) -> :class:`~aqd_d2.export.binary_conv.BinaryConv2dInference`
  / :class:`BinaryLinearInference`: bit-packed weights and the XNOR-popcount C++ kernel
  (``binary_conv2d``; its exact PyTorch fallback where the extension is unavailable). A linear
  layer runs as a 1x1 binary conv over its rows.
* **k-bit conv / linear** (2..8-bit weight with an integer encoding and 2..7-bit input whose
  grid contains 0, groups 1) -> :class:`Int8ConvInference`: the input is encoded to its
  integer codes by the layer's own input quantizer (``encode``, bit-identical to its fake
  quantization), im2col'ed on int8 NHWC data, and multiplied with the int8 weight codes by
  ``torch._int_mm`` (PyTorch's int8 x int8 -> int32 CPU GEMM). Choice (measured, see
  tools/bench_deploy.py): ``torch.ao.nn.quantized.Conv2d`` (fbgemm) is about as fast but
  re-quantizes its *output* to 8 bits, which loses precision the fake-quantized model does not
  lose; ``_int_mm`` keeps the exact int32 accumulator. Any affine weight grid
  ``w = step * code + offset`` works: the GEMM gets one extra all-ones weight column giving the
  receptive-field sum ``S`` of the input codes, and ``y = s_x (step (A - 2^(k-1)) ... )``
  (see :meth:`Int8ConvInference.forward`). Where ``torch._int_mm`` is missing (old torch) or
  the layer does not qualify, the layer falls back to float (below).
* **anything else quantized** (binary-weight / float-activation BWN layers, XNOR with its
  activation scale K, 8-bit inputs, grouped convs): stays a ``QConv2d`` / ``QLinear`` whose
  weight is replaced by its fake-quantized value once and whose weight quantizer is disabled
  (so the weight is not re-quantized every call; same values).
* **float layers** are kept.

BN folding (``fold_bn=True``): a conv's own eval-mode ``norm`` (``BatchNorm2d``,
detectron2's ``FrozenBatchNorm2d`` / ``NaiveSyncBatchNorm``, ``SyncBatchNorm``) is folded into
the per-channel output scale and bias of binary and int8 layers, and into the weight and bias
of float convs. This is exact in real arithmetic (BN directly follows the conv, nothing in
between); in float32 it changes rounding, typically at the 1e-6 relative level. Norms of other
kinds (GN, multi-level BN, which are separate modules) are kept as modules.

Agreement with the fake-quantized model: the integer parts (popcounts, int32 accumulators)
are exact; the float scaling is evaluated in a different order than the float convolution of
fake-quantized tensors, so outputs agree to float32 rounding (about 1e-6 relative). A rounding
difference can move a value across a quantizer threshold of the next layer; that changes
single activations by one step, so detections agree in practice up to small score/box
differences (tests/export/test_deploy.py checks boxes and scores on the embedded dataset).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from aqd_d2.convert import _replace_references  # the conversion pass's reference rewiring
from aqd_d2.layers import QConv2d, QLinear, QuantLayerMixin

from .binary_conv import BinaryConv2dInference, binary_conv2d, pack_weights
from .packing import _read, load_packed, unpack_bits

__all__ = [
    "BinaryLinearInference", "Int8ConvInference", "DeployReport", "convert_for_inference",
    "load_for_inference", "int8_gemm_available",
]

logger = logging.getLogger(__name__)

Encoding = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes, step, offset


def int8_gemm_available() -> bool:
    """True when ``torch._int_mm`` runs on the CPU here."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0]) == 8
    except RuntimeError:
        return False


# ==== BN folding ==============================================================================
def _bn_affine(norm: Optional[nn.Module]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` with ``norm(y) == y * scale + shift`` per channel, for an eval-mode
    batch norm (computed in float64, returned as float32); None for anything else."""
    if norm is None or not hasattr(norm, "running_mean") or not hasattr(norm, "running_var"):
        return None
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or not norm.track_running_stats):
        return None
    if norm.running_mean is None or type(norm).forward is not _known_bn_forward(norm):
        return None
    var = norm.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + float(norm.eps))
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    if w is not None:
        scale = scale * w.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if b is not None:
        shift = shift + b.detach().double()
    return scale.float(), shift.float()


def _known_bn_forward(norm: nn.Module):
    """The forward of a known BN class (fold only those: a subclass may compute otherwise)."""
    from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm

    for cls in (FrozenBatchNorm2d, NaiveSyncBatchNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.BatchNorm1d):
        if type(norm) is cls:
            return cls.forward
    return None


# ==== binary linear ===========================================================================
class BinaryLinearInference(nn.Module):
    """Inference-only binary linear layer: ``sign(x) @ sign(W)^T * alpha + bias`` on the
    XNOR-popcount kernel, as a 1x1 binary conv over the rows of ``x`` (then optional
    ``activation``).

    Args:
        weight: float ``[O, C]``; only its signs are kept.
        alpha, bias: optional ``O`` values.
        activation: optional module applied after (copied).
    Forward: ``x`` ``(..., C)`` -> ``(..., O)`` float32.
    """

    def __init__(self, weight: torch.Tensor, alpha: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, activation: Optional[nn.Module] = None):
        super().__init__()
        self.conv = BinaryConv2dInference(weight.reshape(weight.shape[0], -1, 1, 1), alpha, bias)
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.activation = copy.deepcopy(activation)

    # analysis (aqd_d2.analysis.model_stats) reads these
    @property
    def weight_words(self) -> torch.Tensor:
        return self.conv.weight_words

    @property
    def out_channels(self) -> int:
        return self.out_features

    @property
    def in_channels(self) -> int:
        return self.in_features

    kernel_size = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = binary_conv2d(x.reshape(-1, self.in_features, 1, 1), self.conv.packed)
        y = y.reshape(*lead, self.out_features)
        return self.activation(y) if self.activation is not None else y


# ==== int8 GEMM conv / linear =================================================================
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


# ==== the conversion ==========================================================================
@dataclass
class DeployReport:
    """What :func:`convert_for_inference` did: ``rows`` of ``(layer name, kind, detail)`` with
    kind one of ``binary``, ``int8``, ``fake-quant weight frozen``, ``float (BN folded)``."""

    rows: List[Tuple[str, str, str]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.rows if r[1] == kind)

    def table(self) -> str:
        from tabulate import tabulate

        return tabulate(self.rows, headers=("layer", "deployed as", "detail"), tablefmt="github")


def _active(q) -> bool:
    return q is not None and bool(getattr(q, "enabled", True))


def _encoding(name: str, layer: QuantLayerMixin, encodings: Optional[Dict[str, Encoding]]):
    """``(codes, step, offset, bits)`` of the layer's quantized weight, or None if float."""
    wq = layer.weight_quantizer
    if encodings is not None and name in encodings:
        codes, step, offset = encodings[name]
        return codes, step, offset, int(wq.bits)
    if not _active(wq) or int(wq.bits) > 8:
        return None
    try:
        codes, step, offset = wq.encode(layer.weight)
    except NotImplementedError:
        return None
    return codes, step, offset, int(wq.bits)


def _geometry(layer: nn.Module):
    padding = layer.padding
    if isinstance(padding, str):
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if padding == "same" and any(t % 2 for t in totals):
            return None
        padding = tuple(t // 2 if padding == "same" else 0 for t in totals)
    return tuple(layer.stride), tuple(padding), tuple(layer.dilation)


def _why_not_binary(layer: nn.Module, bits: int) -> Optional[str]:
    iq = layer.input_quantizer
    if bits != 1 or not _active(iq) or int(iq.bits) != 1:
        return "not 1-bit on both sides"
    if float(getattr(iq, "padding_value", 0.0)) != -1.0:
        return "input quantizer does not pad with -1"
    if getattr(iq, "scale_activations", False):
        return "XNOR activation scale K"
    if isinstance(layer, QConv2d) and (layer.groups != 1 or layer.padding_mode != "zeros" or _geometry(layer) is None):
        return "groups / padding mode"
    return None


def _why_not_int8(layer: nn.Module, bits: int) -> Optional[str]:
    iq = layer.input_quantizer
    if not int8_gemm_available():
        return "torch._int_mm unavailable"
    if not _active(iq) or not 2 <= int(iq.bits) <= 7 or bits > 8:
        return "needs <= 8-bit weights and 2..7-bit inputs"
    if getattr(iq, "scale_activations", False) or float(getattr(iq, "padding_value", 0.0)) != 0.0:
        return "input grid without 0"
    if isinstance(layer, QConv2d) and (layer.groups != 1 or layer.padding_mode != "zeros" or _geometry(layer) is None):
        return "groups / padding mode"
    return None


def _freeze_weight(layer: QuantLayerMixin, enc) -> None:
    """Fallback: write the fake-quantized weight once and disable the weight quantizer."""
    if enc is not None:
        codes, step, offset, _ = enc
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight_quantizer.decode(codes.to(layer.weight.device).view_as(layer.weight),
                                                                      step, offset).to(layer.weight.dtype),
                                        requires_grad=False)
        layer.weight_quantizer.set_enabled(False)


def _convert_layer(name: str, layer: nn.Module, enc, fold_bn: bool, int8: bool):
    """``(new module or None, kind, detail)`` for one quantized layer."""
    bits = enc[3] if enc is not None else 32
    norm = getattr(layer, "norm", None)
    act = getattr(layer, "activation", None)
    bn = _bn_affine(norm) if fold_bn else None
    bias = layer.bias.detach() if layer.bias is not None else None
    if enc is not None and _why_not_binary(layer, bits) is None:
        codes, step, offset, _ = enc
        alpha = (-offset.detach().float()).reshape(-1).expand(layer.weight.shape[0]).clone()
        if not torch.equal(step.detach().float().reshape(-1).expand_as(alpha), 2 * alpha):
            return None, "fake-quant weight frozen", "weight encoding is not a scaled sign"
        signs = codes.to(torch.float32) * 2 - 1
        if isinstance(layer, QLinear):
            if bn is not None or norm is not None:
                return None, "fake-quant weight frozen", "linear with norm"
            return BinaryLinearInference(signs, alpha, bias, act), "binary", "popcount (1x1 conv)"
        if bn is not None:
            b = bias if bias is not None else torch.zeros_like(alpha)
            alpha, bias, norm = alpha * bn[0], b * bn[0] + bn[1], None
        stride, padding, dilation = _geometry(layer)
        mod = BinaryConv2dInference(signs, alpha, bias, stride, padding, dilation, 1, norm, act)
        return mod, "binary", "popcount" + (", BN folded" if bn is not None else "")
    if enc is not None and int8 and _why_not_int8(layer, bits) is None:
        codes, step, offset, _ = enc
        if isinstance(layer, QLinear):
            if norm is not None:
                return None, "fake-quant weight frozen", "linear with norm"
            mod = Int8ConvInference(codes.reshape(layer.weight.shape), step, offset, bits,
                                    layer.input_quantizer, bias, activation=act)
        else:
            stride, padding, dilation = _geometry(layer)
            mod = Int8ConvInference(codes.reshape(layer.weight.shape), step, offset, bits,
                                    layer.input_quantizer, bias, stride, padding, dilation,
                                    bn=bn, norm=norm, activation=act)
        return mod, "int8", f"_int_mm W{bits}/A{int(layer.input_quantizer.bits)}" + (", BN folded" if bn is not None else "")
    reason = "float weight" if enc is None else (_why_not_binary(layer, bits) if bits == 1 else
                                                  (_why_not_int8(layer, bits) if int8 else "int8 off"))
    return None, "fake-quant weight frozen", str(reason)


def _fold_float_conv(conv: nn.Conv2d) -> bool:
    """Fold an eval-mode BN ``conv.norm`` into a float conv's weight and bias."""
    bn = _bn_affine(getattr(conv, "norm", None))
    if bn is None:
        return False
    scale, shift = bn
    with torch.no_grad():
        w = conv.weight.detach() * scale.view(-1, 1, 1, 1).to(conv.weight)
        b = shift.to(conv.weight) + (conv.bias.detach() * scale.to(conv.weight) if conv.bias is not None else 0)
    conv.weight = nn.Parameter(w, requires_grad=False)
    conv.bias = nn.Parameter(b, requires_grad=False)
    conv.norm = None
    return True


@torch.no_grad()
def convert_for_inference(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    int8: bool = True,
    inplace: bool = False,
    encodings: Optional[Dict[str, Encoding]] = None,
) -> Tuple[nn.Module, DeployReport]:
    """Replace quantized layers by real low-bit inference modules (module docstring).

    Args:
        model: a (fake-)quantized model, e.g. built from a config and loaded from a checkpoint.
        fold_bn: fold eval-mode BN into the preceding conv (binary, int8 and float convs).
        int8: run qualifying k-bit layers on the int8 GEMM path (False: frozen fake-quant).
        inplace: convert ``model`` itself (default: a deep copy).
        encodings: ``{layer name: (codes, step, offset)}`` to use instead of encoding the
            layer's weight (what :func:`load_for_inference` passes from a packed file, whose
            layers have their weight quantizers disabled).
    Returns:
        ``(inference model in eval mode, DeployReport)``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    report = DeployReport()
    mapping: Dict[int, nn.Module] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, (QConv2d, QLinear)):
            enc = _encoding(name, m, encodings)
            new, kind, detail = _convert_layer(name, m, enc, fold_bn, int8)
            if new is None:
                _freeze_weight(m, enc)
                if fold_bn and isinstance(m, QConv2d) and _fold_float_conv(m):
                    detail += ", BN folded"
            else:
                mapping[id(m)] = new.eval()
            report.rows.append((name, kind, detail))
        elif isinstance(m, nn.Conv2d) and fold_bn and _fold_float_conv(m):
            report.rows.append((name, "float (BN folded)", ""))
    # every reference: child slots and plain lists (detectron2's FPN runs its convs from the
    # lists ``lateral_convs`` / ``output_convs``, not from the registered attributes)
    _replace_references(model, mapping)
    return model, report


def load_for_inference(model: nn.Module, path: str, **kwargs) -> Tuple[nn.Module, DeployReport]:
    """Load a packed file (:func:`aqd_d2.export.save_packed`) into ``model`` (built from the
    same config) and convert it for inference with the file's integer codes.

    Args:
        model: the (fake-)quantized model of the config; filled in place.
        path: the packed checkpoint.
        **kwargs: passed to :func:`convert_for_inference`.
    Returns:
        ``(inference model, DeployReport)``.
    """
    load_packed(model, path)
    blob = _read(path)
    encodings = {}
    for name, e in blob["packed"].items():
        codes = unpack_bits(e["data"], e["bits"], e["numel"]).view(e["shape"])
        encodings[name] = (codes, e["step"], e["offset"])
    kwargs.setdefault("inplace", True)
    return convert_for_inference(model, encodings=encodings, **kwargs)
