"""The conversion pass: the only place where float layers become quantized layers.

``quantize_model(model, QuantPolicy.from_config(cfg))`` decides a precision for every
``nn.Conv2d`` / ``detectron2.layers.Conv2d`` / ``nn.Linear`` and swaps the chosen ones for
:class:`~aqd_d2.layers.QConv2d` / :class:`~aqd_d2.layers.QLinear`, which share the float
layer's parameters: state_dict keys stay unchanged (plus ``*_quantizer.*`` entries) and float
checkpoints load. Decision for the layer named ``name``, first applicable rule wins:

1. the *last* ``MODEL.QUANT.OVERRIDES`` entry whose regex fully matches ``name``;
2. its component (longest matching ``COMPONENT_PREFIXES`` prefix, else "other") is not in
   ``SCOPE``: float;
3. the first layer (``KEEP_FIRST_FP``) or a last layer (``KEEP_LAST_FP``, ``LAST_LAYERS``):
   ``FIRST_LAST_BITS`` with ``FIRST_LAST_METHOD`` (default: the same methods). A side whose
   global bits are 32 stays float, i.e. this rule never lowers a layer's precision;
4. ``W_METHOD``/``W_BITS`` for the weight, ``A_METHOD``/``A_BITS`` for the layer input.

32 bits means "float": that side gets no quantizer, and a layer float on both sides is not
swapped. Other conv types (ConvTranspose2d, Conv1d/3d, subclasses of the supported types,
which may have their own forward) are never swapped; they get a report line saying why.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tabulate import tabulate
from torch import nn
from torch.nn.modules.conv import _ConvNd

from aqd_d2.config import ConfigError
from aqd_d2.layers import QuantLayerMixin
from aqd_d2.quant_policy import (  # noqa: F401  (re-exported: the policy is part of this API)
    _SWAPS,
    BINARY_METHODS,
    FLOAT_BITS,
    LayerPrecision,
    Override,
    QuantPolicy,
)

__all__ = [
    "QuantPolicy", "LayerPrecision", "Override", "LayerDecision", "ConversionReport",
    "quantize_model", "set_quantization_enabled", "quantized_layers", "FLOAT_BITS",
    "BINARY_METHODS", "replace_module_references",
]

logger = logging.getLogger(__name__)


# ==== report ==================================================================================
@dataclass(frozen=True)
class LayerDecision:
    """The pass's decision for one layer: ``precision`` None means it stays float;
    ``component`` is "other" when no COMPONENT_PREFIXES entry matched; ``reason`` names the
    rule that decided (or why the layer type is not converted)."""

    name: str
    layer_type: str
    component: str
    precision: Optional[LayerPrecision]
    reason: str

    @property
    def quantized(self) -> bool:
        return self.precision is not None


@dataclass
class ConversionReport:
    """Per-layer outcome of :func:`quantize_model`, in module registration order."""

    layers: List[LayerDecision] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerDecision:
        for d in self.layers:
            if d.name == name:
                return d
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.layers)

    def quantized_names(self) -> List[str]:
        return [d.name for d in self.layers if d.quantized]

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{component: {"quantized": n, "float": m}}`` over all reported layers."""
        out: Dict[str, Dict[str, int]] = {}
        for d in self.layers:
            c = out.setdefault(d.component, {"quantized": 0, "float": 0})
            c["quantized" if d.quantized else "float"] += 1
        return out

    def table(self) -> str:
        """Text table (module | type | component | weight | input | reason) + a count line."""
        rows = [
            (d.name, d.layer_type, d.component,
             d.precision.describe("weight") if d.quantized else "float",
             d.precision.describe("activation") if d.quantized else "float", d.reason)
            for d in self.layers
        ]
        body = tabulate(rows, headers=["module", "type", "component", "weight", "input", "reason"])
        counts = "; ".join(f"{c}: {v['quantized']} quantized, {v['float']} float"
                           for c, v in self.counts().items())
        return f"{body}\n{counts}"

    __str__ = table


# ==== the pass ================================================================================
def _component(name: str, policy: QuantPolicy) -> str:
    """The component whose prefix is the longest prefix of ``name`` ("other" if none)."""
    best, best_len = "other", -1
    for component, prefix in policy.component_prefixes:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = component, len(prefix)
    return best


def _candidates(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Optional[str]]]:
    """``(name, module, why_not)`` for each conv/linear-like layer; why_not None = convertible."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            yield name, m, "already quantized"
        elif type(m) in _SWAPS:
            yield name, m, None
        elif isinstance(m, (_ConvNd, nn.Linear)):
            yield name, m, f"type {type(m).__name__} is not converted"


def _first_layers(entries, policy: QuantPolicy) -> List[str]:
    """Names of "the first layer": FIRST_LAYER's matches, or else the first Conv2d (in
    registration order) of the "backbone" component, or else of the whole model. (Order over
    the whole model is not enough: detectron2's FPN registers its lateral/output convs
    before ``bottom_up``.)"""
    convs = [(n, c) for n, m, why, c in entries if why is None and isinstance(m, nn.Conv2d)]
    if policy.first_layer:
        names = [n for n, _ in convs if re.fullmatch(policy.first_layer, n)]
        if not names:
            raise ConfigError(f"MODEL.QUANT.FIRST_LAYER = {policy.first_layer!r} matches no conv")
        return names
    backbone = [n for n, c in convs if c == "backbone"]
    return backbone[:1] or [n for n, _ in convs[:1]]


def _decide(model: nn.Module, policy: QuantPolicy) -> List[Tuple[LayerDecision, nn.Module]]:
    entries = [(n, m, why, _component(n, policy)) for n, m, why in _candidates(model)]
    first = set(_first_layers(entries, policy)) if policy.keep_first_fp else set()
    last = [re.compile(p) for p in policy.last_layers] if policy.keep_last_fp else []
    override_hits = [0] * len(policy.overrides)
    out = []
    for name, m, why, comp in entries:
        if why is not None:
            out.append((LayerDecision(name, type(m).__name__, comp, None, why), m))
            continue
        matched = [i for i, o in enumerate(policy.overrides) if re.fullmatch(o.pattern, name)]
        for i in matched:
            override_hits[i] += 1
        if matched:
            o = policy.overrides[matched[-1]]
            precision, reason = o.precision, f"override {o.pattern!r}"
        elif comp not in policy.scope:
            precision, reason = None, f"component {comp!r} not in SCOPE"
        elif name in first:
            precision, reason = policy.first_last_precision(), "first layer (KEEP_FIRST_FP)"
        elif any(r.fullmatch(name) for r in last):
            precision, reason = policy.first_last_precision(), "last layer (KEEP_LAST_FP)"
        else:
            precision, reason = policy.default_precision(), "policy"
        if precision is not None and precision.is_float:
            precision = None
        out.append((LayerDecision(name, type(m).__name__, comp, precision, reason), m))
    present = {d.component for d, _ in out}
    for c in policy.scope:
        if c not in present:
            raise ConfigError(
                f"MODEL.QUANT.SCOPE contains {c!r} but no conv/linear layer of this "
                f"{type(model).__name__} belongs to it (MODEL.QUANT.COMPONENT_PREFIXES: "
                f"{[f'{a}:{b}' for a, b in policy.component_prefixes]})"
            )
    for o, n in zip(policy.overrides, override_hits):
        if n == 0:
            raise ConfigError(f"MODEL.QUANT.OVERRIDES entry {o.text!r} matches no conv/linear layer")
    return out


def _swap_refs(v: Any, mapping: Dict[int, nn.Module]) -> Tuple[Any, bool]:
    """``(v with swapped modules replaced, changed?)`` for plain (nested) lists / tuples /
    dicts; other containers are left alone."""
    if isinstance(v, nn.Module):
        new = mapping.get(id(v), v)
        return new, new is not v
    if type(v) in (list, tuple):
        items = [_swap_refs(x, mapping) for x in v]
        if any(c for _, c in items):
            return type(v)(x for x, _ in items), True
    elif type(v) is dict:
        items = {k: _swap_refs(x, mapping) for k, x in v.items()}
        if any(c for _, c in items.values()):
            return {k: x for k, (x, _) in items.items()}, True
    return v, False


def replace_module_references(model: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Point every reference to a swapped module at its replacement: the child slot under
    every parent (a shared module is replaced everywhere) and plain python containers stored
    as module attributes (detectron2's FPN keeps its convs in lists ``lateral_convs`` /
    ``output_convs`` besides registering them; missing those would leave float convs in use)."""
    for mod in list(model.modules()):
        for key, child in list(mod._modules.items()):
            if child is not None and id(child) in mapping:
                mod._modules[key] = mapping[id(child)]
        for key, v in list(vars(mod).items()):
            if key in ("_modules", "_parameters", "_buffers") or type(v) not in (list, tuple, dict):
                continue
            new, changed = _swap_refs(v, mapping)
            if changed:
                object.__setattr__(mod, key, new)


def _check_binary_after_relu(model: nn.Module, decisions) -> None:
    """Refuse a 1-bit activation on ``fc2``, ``fc3``, ... of detectron2's FastRCNNConvFCHead:
    their input is a ReLU output, whose sign is +1 everywhere, so every box would get the
    same features (aqd_d2.modeling.box_head)."""
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

    modules = dict(model.named_modules())
    for d, _ in decisions:
        if not d.quantized or d.precision.a_bits != 1 or "." not in d.name:
            continue
        parent, child = d.name.rsplit(".", 1)
        if (type(modules.get(parent)) is FastRCNNConvFCHead and child.startswith("fc")
                and child[2:].isdigit() and int(child[2:]) >= 2):
            raise ConfigError(
                f"{d.name} would binarize its input ({d.precision.a_method}/1), but detectron2's "
                f"FastRCNNConvFCHead feeds it a ReLU output, which is +1 everywhere after sign: "
                f"every box would get the same features. Set MODEL.ROI_BOX_HEAD.NAME "
                f"'BiRealFCHead' (BN + shortcut, no ReLU before binary FCs), or keep the box head "
                f"out of MODEL.QUANT.SCOPE")


def quantize_model(model: nn.Module, policy: QuantPolicy) -> ConversionReport:
    """Swap ``model``'s conv/linear layers for quantized ones as ``policy`` says (in place).

    Every decision, and the model-dependent validation (each SCOPE component, FIRST_LAYER
    and each override must match a layer), is made before anything is swapped, so on error
    the model is unchanged. Forward hooks of a swapped layer move to its replacement.

    Args:
        model: any ``nn.Module``, normally a detectron2 meta-architecture.
        policy: e.g. ``QuantPolicy.from_config(cfg)``.
    Returns:
        a :class:`ConversionReport` with one line per conv/linear-like layer.
    Raises:
        ConfigError: naming the MODEL.QUANT key that matches nothing.
    """
    decisions = _decide(model, policy)
    _check_binary_after_relu(model, decisions)
    mapping: Dict[int, nn.Module] = {}
    for d, m in decisions:
        if d.quantized and id(m) not in mapping:
            wq, aq = policy.build_quantizers(d.precision)
            new = _SWAPS[type(m)].from_float(m, wq, aq)
            new._forward_pre_hooks.update(m._forward_pre_hooks)
            new._forward_hooks.update(m._forward_hooks)
            mapping[id(m)] = new
    replace_module_references(model, mapping)
    report = ConversionReport([d for d, _ in decisions])
    if policy.keep_last_fp and "head" in policy.scope and not any(
        d.reason.startswith("last layer") for d in report.layers
    ):
        logger.warning("MODEL.QUANT.KEEP_LAST_FP is set but no layer matched LAST_LAYERS")
    return report


def quantized_layers(model: nn.Module) -> Iterator[Tuple[str, QuantLayerMixin]]:
    """Yield ``(name, layer)`` for every quantized layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            yield name, m


def set_quantization_enabled(
    model: nn.Module, enabled: bool, name_regex: Optional[str] = None, role: Optional[str] = None
) -> List[str]:
    """Set the ``enabled`` buffer of the quantizers of matching quantized layers.

    A disabled quantizer is the identity (and a conv then pads with 0 again), so e.g.
    stage-wise binarization (paper 004) can switch stages on one by one. The flags are
    buffers, so checkpoints keep them.

    Args:
        model: a converted model.
        enabled: the new state.
        name_regex: only layers whose name fully matches (``re.fullmatch``); None = all.
        role: "weight" or "activation" to set only that quantizer; None = both.
    Returns:
        names of the layers that were set.
    Raises:
        ValueError: bad role, or ``name_regex`` matches no quantized layer.
    """
    if role not in (None, "weight", "activation"):
        raise ValueError(f"role must be None, 'weight' or 'activation', got {role!r}")
    names = []
    for name, layer in quantized_layers(model):
        if name_regex is not None and not re.fullmatch(name_regex, name):
            continue
        for r, q in layer.quantizers():
            if role is None or r == role:
                q.set_enabled(enabled)
        names.append(name)
    if name_regex is not None and not names:
        raise ValueError(f"name_regex {name_regex!r} matches no quantized layer")
    return names
