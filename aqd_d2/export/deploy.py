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
  quantization) and convolved with the int8 weight codes into an exact int32 accumulator:
  by the fused C++ kernel ``aqd_binary::int8_conv2d`` (encode + padded NHWC pack in one
  pass, direct conv with AVX-512 VNNI, float scaling per cache tile) where the CPU has VNNI,
  else by im2col + ``torch._int_mm`` (PyTorch's int8 x int8 -> int32 CPU GEMM); both are
  bit-identical (:mod:`.int8_gemm`, which also says why not fbgemm's quantized conv). Any affine weight grid ``w = step * code + offset`` works
  (an extra all-ones weight column gives the receptive-field sum for the offset term). Where
  ``torch._int_mm`` is missing (old torch) or the layer does not qualify, the layer falls back
  to the frozen fake-quant form (below). With ``int8="auto"`` each qualifying layer is timed
  on the input it receives from ``example_inputs`` against that fallback and keeps the int8
  path only where it is faster (:mod:`.routing`; small layers can lose to float).
* **anything else quantized** (binary-weight / float-activation BWN layers, XNOR with its
  activation scale K, 8-bit inputs, grouped convs): stays a ``QConv2d`` / ``QLinear`` whose
  weight is replaced by its fake-quantized value once and whose weight quantizer is disabled
  (so the weight is not re-quantized every call; same values).
* **float layers** are kept; ``float_linear``: float ``nn.Linear`` layers through oneDNN
  (:mod:`.float_linear`). ``roi_pooler``: detectron2's ROIAlign(V2) ``ROIPooler`` -> fused
  :class:`~aqd_d2.export.roi_pooler.FastROIPooler` (bit-identical), float and quantized models.

BN folding. The eval-mode batch norm of a binary or int8 layer is folded into its per-channel
output scale and bias with the constants the trained layer's own eval mode uses
(:mod:`aqd_d2.layers.integer_eval`: ``(a, b)`` read off the norm's forward). ``fold_bn=True``
also folds BN into float convs (faster, but float32 rounding then differs from the trained model).
Norms of other kinds (GN, multi-level BN, which are separate modules) are kept as modules.

Agreement with the trained (fake-quantized) model: in eval mode without autograd, a quantized
layer of the trained model computes its *integer form* (:mod:`aqd_d2.layers.integer_eval`):
the integer codes summed exactly, then the same float32 epilogue as the deployed kernel, with
the same constants. Every kernel module made here computes exactly that (the popcount and the
int32 accumulator are exact; the epilogues are the same float32 operations in the same order),
a fallback layer keeps its codes and runs the same integer form, and float layers are kept as
they are (``fold_bn`` and ``float_linear`` off, the default). So every activation code of the
deployed model equals the trained model's, and the detections are bit-identical
(tests/export/test_deployed_equals_trained.py, after a real short training, on the AVX2 and
AVX-512 kernels).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from aqd_d2.convert import replace_module_references
from aqd_d2.layers import QConv2d, QLinear, QuantLayerMixin
from aqd_d2.layers.integer_eval import fold_norm, integer_plan

from .binary_conv import BinaryConv2dInference, binary_conv2d
from .float_linear import convert_float_linears
from .int8_gemm import Int8ConvInference, int8_gemm_available
from .packing import _read, entry_offset, load_packed, unpack_bits
from .roi_pooler import convert_roi_poolers
from .routing import measure_speedup, record_layer_inputs

__all__ = [
    "BinaryLinearInference", "Int8ConvInference", "DeployReport", "convert_for_inference",
    "load_for_inference", "int8_gemm_available",
]

logger = logging.getLogger(__name__)

Encoding = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes, step, offset


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


# ==== the conversion ==========================================================================
@dataclass
class DeployReport:
    """What :func:`convert_for_inference` did: ``rows`` of ``(layer name, kind, detail)`` with
    kind one of ``binary``, ``int8``, ``fake-quant weight frozen``, ``float (BN folded)``,
    ``float (oneDNN)`` / ``float (F.linear)`` (:mod:`.float_linear`), ``fused ROIAlign`` /
    ``ROIPooler kept`` (:mod:`.roi_pooler`)."""

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
    """Fallback: write the fake-quantized weight once (``decode(encode(W))`` equals the weight
    quantizer's output bit for bit), keep the codes as ``layer.integer_encoding`` (the layer's
    eval-mode integer form, :mod:`aqd_d2.layers.integer_eval`, computes with them: the same
    arithmetic as the trained layer) and disable the weight quantizer."""
    if enc is not None:
        codes, step, offset, bits = enc
        codes = codes.to(layer.weight.device).view_as(layer.weight)
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight_quantizer.decode(codes, step, offset).to(layer.weight.dtype),
                                        requires_grad=False)
        layer.integer_encoding = (codes, step, offset, bits)
        layer.weight_quantizer.set_enabled(False)


def _convert_layer(name: str, layer: nn.Module, enc, int8: bool):
    """``(new module or None, kind, detail)`` for one quantized layer. A kernel module computes
    the layer's eval-mode integer form (:func:`aqd_d2.layers.integer_eval.integer_plan`: the
    same codes, the same constants with the same folded norm), so it gives the trained
    layer's outputs bit for bit."""
    bits = enc[3] if enc is not None else 32
    norm = getattr(layer, "norm", None)
    act = getattr(layer, "activation", None)
    plan = integer_plan(layer, enc) if enc is not None else None
    folded = ", BN folded" if plan is not None and plan.norm is None and norm is not None else ""
    if enc is not None and _why_not_binary(layer, bits) is None:
        if plan is None or plan.kind != "binary":
            return None, "fake-quant weight frozen", "weight encoding is not a scaled sign"
        if isinstance(layer, QLinear):
            if norm is not None:
                return None, "fake-quant weight frozen", "linear with norm"
            return BinaryLinearInference(plan.weight, plan.alpha, plan.bias, act), "binary", "popcount (1x1 conv)"
        stride, padding, dilation = _geometry(layer)
        mod = BinaryConv2dInference(plan.weight, plan.alpha, plan.bias, stride, padding, dilation, 1, plan.norm, act)
        return mod, "binary", "popcount" + folded
    if enc is not None and int8 and _why_not_int8(layer, bits) is None and plan is not None and plan.kind == "kbit":
        codes, step, offset, _ = enc
        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, QLinear):
            if norm is not None:
                return None, "fake-quant weight frozen", "linear with norm"
            mod = Int8ConvInference(codes.reshape(layer.weight.shape), step, offset, bits,
                                    layer.input_quantizer, bias, activation=act)
        else:
            stride, padding, dilation = _geometry(layer)
            mod = Int8ConvInference(codes.reshape(layer.weight.shape), step, offset, bits,
                                    layer.input_quantizer, bias, stride, padding, dilation,
                                    bn=fold_norm(layer), norm=norm, activation=act)
        return mod, "int8", f"int8 W{bits}/A{int(layer.input_quantizer.bits)}" + folded
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


def _route_int8(layer: nn.Module, enc, int8_mod: nn.Module, x: torch.Tensor,
                min_speedup: float, detail: str):
    """Keep ``int8_mod`` if it is measured at least ``min_speedup`` times faster than the
    fallback (the layer with its weight frozen: its integer form in a float convolution) on
    input ``x`` (:mod:`.routing`)."""
    fallback = copy.deepcopy(layer).eval()
    _freeze_weight(fallback, enc)
    speedup = measure_speedup(lambda: int8_mod(x), lambda: fallback(x))
    if speedup >= min_speedup:
        return int8_mod, "int8", f"{detail}, measured {speedup:.2f}x"
    return None, "fake-quant weight frozen", f"int8 measured {speedup:.2f}x < {min_speedup:g}x"


@torch.no_grad()
def convert_for_inference(
    model: nn.Module,
    *,
    fold_bn: bool = False,
    int8: Union[bool, str] = True,
    inplace: bool = False,
    encodings: Optional[Dict[str, Encoding]] = None,
    example_inputs: Any = None,
    int8_min_speedup: float = 1.0,
    roi_pooler: bool = True,
    float_linear: Union[bool, str] = False,
) -> Tuple[nn.Module, DeployReport]:
    """Replace quantized layers by real low-bit inference modules (module docstring).

    Args:
        model: a (fake-)quantized model, e.g. built from a config and loaded from a checkpoint.
        fold_bn: also fold eval-mode BN into *float* convs (and into quantized layers without an
            integer form): faster, but it changes float32 rounding, so the deployed model no
            longer gives the trained model's outputs bit for bit. The BN of a quantized layer
            with an integer form is always folded, as that layer's eval mode folds it.
        int8: ``True``: run every qualifying k-bit layer on the int8 GEMM path; ``False``:
            frozen fake-quant; ``"auto"``: per layer, whichever is measured faster on the
            input it receives from ``example_inputs`` (:mod:`.routing`); layers the example
            does not reach keep the int8 path.
        inplace: convert ``model`` itself (default: a deep copy).
        example_inputs: what the model is called with, for ``int8="auto"`` (required there).
        int8_min_speedup: ``int8="auto"`` keeps a layer on int8 when its measured speed-up
            over the fallback is at least this.
        encodings: ``{layer name: (codes, step, offset)}`` to use instead of encoding the
            layer's weight (what :func:`load_for_inference` passes from a packed file, whose
            layers have their weight quantizers disabled).
        roi_pooler: replace detectron2's ROIAlign/ROIAlignV2 ``ROIPooler`` modules by the fused
            :class:`~aqd_d2.export.roi_pooler.FastROIPooler` (same output, bit for bit).
        float_linear: plain float ``nn.Linear`` layers through oneDNN: ``True`` always,
            ``False`` never, ``"auto"`` where measured faster on the input each layer receives
            from ``example_inputs`` (required there; :mod:`.float_linear`).
    Returns:
        ``(inference model in eval mode, DeployReport)``.
    """
    if int8 not in (True, False, "auto"):
        raise ValueError(f"int8 must be True, False or 'auto', got {int8!r}")
    if float_linear not in (True, False, "auto"):
        raise ValueError(f"float_linear must be True, False or 'auto', got {float_linear!r}")
    for key, value in (("int8", int8), ("float_linear", float_linear)):
        if value == "auto" and example_inputs is None:
            raise ValueError(f"{key}='auto' measures each layer on the model's own inputs: pass example_inputs")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    layer_inputs: Dict[str, torch.Tensor] = {}
    if int8 == "auto" or float_linear == "auto":
        layer_inputs = record_layer_inputs(model, example_inputs, [
            n for n, m in model.named_modules()
            if (int8 == "auto" and isinstance(m, (QConv2d, QLinear))) or (float_linear == "auto" and type(m) is nn.Linear)])
    report = DeployReport()
    mapping: Dict[int, nn.Module] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, (QConv2d, QLinear)):
            enc = _encoding(name, m, encodings)
            new, kind, detail = _convert_layer(name, m, enc, bool(int8))
            if kind == "int8" and name in layer_inputs:
                new, kind, detail = _route_int8(m, enc, new.eval(), layer_inputs[name],
                                                int8_min_speedup, detail)
            if new is None:
                _freeze_weight(m, enc)
                if integer_plan(m) is not None:
                    detail += ", integer form"
                elif fold_bn and isinstance(m, QConv2d) and _fold_float_conv(m):
                    detail += ", BN folded"
            else:
                mapping[id(m)] = new.eval()
            report.rows.append((name, kind, detail))
        elif isinstance(m, nn.Conv2d) and fold_bn and _fold_float_conv(m):
            report.rows.append((name, "float (BN folded)", ""))
    # every reference: child slots and plain lists (detectron2's FPN runs its convs from the
    # lists ``lateral_convs`` / ``output_convs``, not from the registered attributes)
    replace_module_references(model, mapping)
    report.rows.extend(convert_float_linears(model, float_linear, layer_inputs))
    if roi_pooler:
        report.rows.extend(convert_roi_poolers(model))
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
        encodings[name] = (codes, e["step"], entry_offset(e))
    kwargs.setdefault("inplace", True)
    return convert_for_inference(model, encodings=encodings, **kwargs)
