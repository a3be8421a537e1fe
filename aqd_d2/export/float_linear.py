"""Float linear layers through oneDNN for CPU inference: :class:`OneDNNLinear`.

On an AVX-512 CPU, one thread, the first FC of Faster R-CNN's box head (1000 proposals,
12544 -> 1024) takes about 280 ms with ``F.linear`` and about 130 ms with oneDNN's inner
product (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own CPU inference passes
use), on the same dense float32 tensors: no layout conversion of the input or output.
Which one wins depends on the shape and the CPU (small layers such as the 1024 -> 7 class
score can lose), so :func:`convert_float_linears` offers three modes
(``convert_for_inference(float_linear=...)``):

* ``True``: every plain float ``nn.Linear`` runs through oneDNN;
* ``False``: none does (default of ``convert_for_inference``);
* ``"auto"``: each layer is timed on the input it receives from ``example_inputs``
  (:func:`aqd_d2.export.routing.record_layer_inputs`), ``F.linear`` against oneDNN,
  interleaved (:func:`~aqd_d2.export.routing.measure_speedup`), and keeps the faster form;
  it also compares the two outputs and keeps ``F.linear`` if they differ by more than
  :data:`REL_TOLERANCE` of the output's magnitude. Layers the example does not reach stay
  ``F.linear``.

Both forms compute the same product in float32 with a different summation order: on the
box head's FCs the outputs differ by less than 1e-6 relative to the output magnitude
(measured on Faster R-CNN R18-FPN's real inputs, max |difference| / max |output|: 7.6e-7 at
12544 -> 1024, 5e-7 at 1024 -> 1024; the report of each layer lists its measured value). Only exact ``nn.Linear`` modules are converted:
quantized ``QLinear`` layers belong to :mod:`.deploy`'s binary / int8 paths.
Inference only: with gradients required the layer computes ``F.linear``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .routing import measure_speedup

__all__ = ["REL_TOLERANCE", "OneDNNLinear", "convert_float_linears", "onednn_linear_available"]

#: largest accepted max |oneDNN - F.linear| / max(max |F.linear|, 1) in ``"auto"`` mode
REL_TOLERANCE = 1e-5


def onednn_linear_available() -> bool:
    """True when this torch has oneDNN (mkldnn) and its ``_linear_pointwise`` op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return True


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same ``weight`` / ``bias`` parameters, so state dicts load unchanged)
    whose inference forward is oneDNN's inner product on the dense float32 tensors.

    Forward: ``x`` ``(..., in_features)`` -> ``(..., out_features)``; ``F.linear`` when a
    gradient is needed, the input is not float32 on the CPU, or under ``torch.jit`` tracing
    (so traced graphs, e.g. :func:`aqd_d2.analysis.analyze_model`'s FLOP count, see
    ``aten::linear``).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        """A OneDNNLinear sharing ``linear``'s parameters (weights frozen: inference only)."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device="meta", dtype=linear.weight.dtype)
        m.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        m.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        # traced graphs (FLOP counting, TorchScript) see aten::linear
        if grad or torch.jit.is_tracing() or x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(max |b|, 1)`` (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


@torch.no_grad()
def convert_float_linears(model: nn.Module, mode: Union[bool, str],
                          layer_inputs: Optional[Dict[str, torch.Tensor]] = None,
                          repeats: int = 5) -> List[Tuple[str, str, str]]:
    """Route the plain float ``nn.Linear`` layers of ``model`` through oneDNN (in place).

    Args:
        model: any module; only modules whose type is exactly ``nn.Linear`` are candidates.
        mode: ``True`` (all), ``False`` (none) or ``"auto"`` (measured per layer, see the
            module docstring).
        layer_inputs: ``{layer name: recorded input}`` for ``"auto"``
            (:func:`~aqd_d2.export.routing.record_layer_inputs`).
        repeats: timed rounds per layer in ``"auto"`` mode.
    Returns:
        report rows ``(layer name, kind, detail)`` with kind ``"float (oneDNN)"`` or
        ``"float (F.linear)"``.
    Raises:
        ValueError: ``mode`` is not True, False or "auto".
    """
    if mode not in (True, False, "auto"):
        raise ValueError(f"float_linear must be True, False or 'auto', got {mode!r}")
    if mode is False:
        return []
    from aqd_d2.convert import replace_module_references

    available = onednn_linear_available()
    rows, mapping = [], {}
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if not available:
            rows.append((name, "float (F.linear)", "oneDNN unavailable in this torch"))
            continue
        new = OneDNNLinear.from_linear(m).eval()
        detail = "forced (float_linear=True)"
        if mode == "auto":
            x = (layer_inputs or {}).get(name)
            if x is None:
                rows.append((name, "float (F.linear)", "not reached by example_inputs"))
                continue
            ref, got = F.linear(x, m.weight, m.bias), new(x)
            diff = relative_difference(got, ref)
            if diff > REL_TOLERANCE:
                rows.append((name, "float (F.linear)", f"oneDNN differs by {diff:.1e} relative"))
                continue
            speedup = measure_speedup(lambda: new(x), lambda: m(x), repeats=repeats)
            detail = f"measured {speedup:.2f}x over F.linear on {tuple(x.shape)}, max rel. diff {diff:.1e}"
            if speedup < 1.0:
                rows.append((name, "float (F.linear)", detail))
                continue
        mapping[id(m)] = new
        rows.append((name, "float (oneDNN)", detail))
    replace_module_references(model, mapping)
    return rows
