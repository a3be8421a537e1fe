"""What a layer stores and at which precision: the one storage rule of every aqd_d2 tool
(:func:`~aqd_d2.analysis.model_stats.analyze_model`, ``tools/analyze_model.py``,
:func:`~aqd_d2.analysis.equivalent_flops.model_size_bytes`, ``tools/equivalent_flops.py``).

Rule (BiDet's accounting, paper 000 Table 2: BNN 22.06 MB < Xnor-Net 22.16 MB for the same
network, i.e. the per-channel scale is stored; sec. 4.1 keeps the first and last layers
real-valued):

* A parameter is stored at 32 bits (float32 ``element_size``), except the weight of a layer
  whose weight quantizer is active (or whose weight was decoded from codes, see
  :func:`layer_bits`): ``numel * bits`` bits.
* A quantized weight also stores its **scale** when the scale is computed from the weight
  itself: XNOR-Net / BWN / Bi-Real ``mean|W|`` per output channel (``C_out`` floats), TWN's
  per-tensor ``alpha`` (1 float). A weight whose grid needs no stored value does not: BNN's
  ``+-1`` and DoReFa's fixed ``k/(2^b-1)`` grid. LIQ / LSQ step sizes are learned parameters
  of the quantizer and are counted as such (32 bits each), not again here. The test is
  behavioural, so it holds for any quantizer: the encoding's ``step``
  (:meth:`~aqd_d2.quantization.base.Quantizer.encode`) is a stored scale when it changes if
  the weight is scaled by 2.
* Deployed binary convs (``weight_words``) store their per-channel ``alpha`` buffer unless it
  is absent or all ones (BNN); deployed int8 layers store ``w_bits`` per weight.
* Buffers (BN running statistics, quantizer flags) are not parameters and are not counted;
  norms (BN affine), biases and every float layer are float32.

MB in every report is 2**20 bytes (paper 000's float SSD300-VGG16: 26.29 M parameters x 4 B =
100.28 MB).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["FLOAT_BITS", "MB", "layer_bits", "layer_storage", "stored_scale_count",
           "is_compute_layer", "is_norm_layer", "on_grid", "parameter_storage_bytes"]

FLOAT_BITS = 32
MB = float(2 ** 20)


def _active_bits(q: Optional[nn.Module]) -> int:
    if q is None or not bool(getattr(q, "enabled", True)):
        return FLOAT_BITS
    return int(getattr(q, "bits", FLOAT_BITS))


def on_grid(weight: Optional[torch.Tensor], bits: int) -> bool:
    """True when every output channel of ``weight`` takes at most ``2**bits`` distinct values
    (a weight decoded from ``bits``-bit codes, whose quantizer was then disabled)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or bits > 8:
        return False
    rows = weight.detach().reshape(weight.shape[0], -1).sort(dim=1).values
    distinct = (rows.diff(dim=1) != 0).sum(dim=1) + 1
    return bool((distinct <= 2 ** bits).all())


def layer_bits(module: nn.Module) -> Tuple[int, int]:
    """``(weight bits, input bits)`` of a layer: its enabled quantizers' bits, 1/1 for a
    deployed binary conv (``weight_words`` buffer), the ``w_bits``/``a_bits`` attributes of
    deployed k-bit modules, else 32/32 (float)."""
    if hasattr(module, "w_bits") and hasattr(module, "a_bits"):
        return int(module.w_bits), int(module.a_bits)
    if isinstance(getattr(module, "weight_words", None), torch.Tensor):
        return 1, 1
    if hasattr(module, "weight_quantizer") or hasattr(module, "input_quantizer"):
        wq = getattr(module, "weight_quantizer", None)
        wb = _active_bits(wq)
        if wb >= FLOAT_BITS and wq is not None and on_grid(getattr(module, "weight", None), int(wq.bits)):
            wb = int(wq.bits)  # weight already quantized and frozen (load_packed, deploy)
        return wb, _active_bits(getattr(module, "input_quantizer", None))
    return FLOAT_BITS, FLOAT_BITS


def is_compute_layer(m: nn.Module) -> bool:
    """conv / transposed conv / linear, or a deployed layer that replaces one."""
    return (isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
            or isinstance(getattr(m, "weight_words", None), torch.Tensor) or hasattr(m, "w_bits"))


def is_norm_layer(m: nn.Module) -> bool:
    """A normalisation layer: torch's batch / instance norms (incl. SyncBN and detectron2's
    NaiveSyncBatchNorm), GroupNorm, LayerNorm, LocalResponseNorm, detectron2's
    FrozenBatchNorm2d."""
    from detectron2.layers import FrozenBatchNorm2d

    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                          nn.LocalResponseNorm, FrozenBatchNorm2d))


@torch.no_grad()
def stored_scale_count(module: nn.Module) -> int:
    """Number of float scale values a quantized layer stores with its weight (module doc).

    Args:
        module: a layer (fake-quantized ``QConv2d``/``QLinear``, deployed, or float).
    Returns:
        ``C_out`` for per-channel scales computed from W (XNOR-Net, BWN, Bi-Real), 1 for a
        per-tensor one (TWN), 0 for a float weight or a grid without a stored value (BNN,
        DoReFa) or with learned steps (LIQ, LSQ: counted as quantizer parameters).
    """
    if isinstance(getattr(module, "weight_words", None), torch.Tensor):  # deployed binary
        holder = getattr(module, "conv", module)
        alpha = getattr(holder, "alpha", None)
        if not isinstance(alpha, torch.Tensor) or bool((alpha == 1).all()):
            return 0  # no scale, or BNN's +-1 deployed with alpha = 1
        return int(alpha.numel())
    if hasattr(module, "w_bits"):  # deployed int8: the grid's scale is part of the layer
        return 0
    q = getattr(module, "weight_quantizer", None)
    w = getattr(module, "weight", None)
    if q is None or not isinstance(w, torch.Tensor) or layer_bits(module)[0] >= FLOAT_BITS:
        return 0
    try:
        _, step, _ = q.encode(w.detach().float())
        _, step2, _ = q.encode(2.0 * w.detach().float())
    except NotImplementedError:  # a quantizer without an integer encoding: no scale known
        return 0
    if step.shape == step2.shape and torch.allclose(step, step2, rtol=1e-6, atol=0.0):
        return 0
    return int(step.numel())


def _deployed_weight(m: nn.Module) -> Tuple[int, Optional[torch.Tensor]]:
    """Deployed modules keep weight (and bias) as buffers: (weight elements, bias buffer)."""
    n_w = 0
    if hasattr(m, "weight_words"):
        n_w = m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    elif isinstance(getattr(m, "weight_int8", None), torch.Tensor):
        n_w = m.weight_int8.shape[0] * m.out_channels
    if not n_w:
        return 0, None
    bias = getattr(m, "bias", None)
    if bias is None and hasattr(m, "conv"):
        bias = getattr(m.conv, "bias", None)
    if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
        return n_w, bias
    return n_w, None


def layer_storage(m: nn.Module, params: Iterable[torch.Tensor]) -> Tuple[int, float]:
    """``(parameters, bytes)`` of a conv / linear layer by the rule of the module docstring.

    Args:
        m: the layer (fake-quantized, deployed or float).
        params: the parameters to book on it (its own: weight, bias, quantizer parameters;
            not those of a norm inside it, which is float and counted by the norm).
    Returns:
        the parameter count (deployed layers: their weight / bias buffers included) and the
        bytes at real bit widths, scales included.
    """
    wb = layer_bits(m)[0]
    weight = getattr(m, "weight", None)
    n, nbytes = 0, 0.0
    for p in params:
        n += p.numel()
        nbytes += p.numel() * wb / 8.0 if (p is weight and wb < FLOAT_BITS) else p.numel() * p.element_size()
    n_w, bias = _deployed_weight(m)
    if n_w:
        n += n_w
        nbytes += n_w * wb / 8.0
        if bias is not None:
            n += bias.numel()
            nbytes += bias.numel() * 4.0
    if wb < FLOAT_BITS:
        nbytes += stored_scale_count(m) * 4.0
    return n, nbytes


def top_level(names: List[str]) -> List[str]:
    """``names`` without those inside another listed module (deployed layers' inner convs,
    BNs of a multi-level norm)."""
    out: List[str] = []
    for n in names:
        if not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def parameter_storage_bytes(model: nn.Module) -> float:
    """Bytes of every parameter of ``model`` by the storage rule, without tracing it (so also
    the parameters of training-only branches, which
    :func:`~aqd_d2.analysis.model_stats.analyze_model` leaves out)."""
    modules = dict(model.named_modules())
    compute = top_level([n for n, m in modules.items() if is_compute_layer(m)])
    norms = [n for n, m in modules.items() if is_norm_layer(m)]
    norm_ids = {id(p) for n in norms for p in modules[n].parameters()}
    seen: set = set()
    total = 0.0
    for name in compute:
        own = [p for p in modules[name].parameters() if id(p) not in norm_ids and id(p) not in seen]
        seen.update(id(p) for p in own)
        total += layer_storage(modules[name], own)[1]
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) not in seen:
            total += p.numel() * p.element_size()
    return total
