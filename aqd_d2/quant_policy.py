"""The precision policy read from ``MODEL.QUANT``: what the conversion pass applies.

:class:`QuantPolicy` holds the parsed and validated ``MODEL.QUANT`` keys (methods, bits,
scope, component prefixes, first/last-layer rules, per-module overrides, quantizer options);
:mod:`aqd_d2.convert` applies it to a model. Every bad value fails here, at build time, with
a :class:`~aqd_d2.config.ConfigError` naming the key.
"""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from detectron2.config import CfgNode
from detectron2.layers import Conv2d
from torch import nn

from aqd_d2.config import ConfigError
from aqd_d2.config.quant import DEFAULT_COMPONENT_PREFIXES as _CFG_PREFIXES
from aqd_d2.config.quant import DEFAULT_LAST_LAYERS as _CFG_LAST_LAYERS
from aqd_d2.config.quant import DEFAULT_SCOPE as _CFG_SCOPE
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import Quantizer, available_quantizers, build_quantizer, get_quantizer_class

__all__ = ["QuantPolicy", "LayerPrecision", "Override", "FLOAT_BITS", "BINARY_METHODS"]


FLOAT_BITS = 32
#: methods that only exist at 1 bit
BINARY_METHODS = frozenset({"bnn", "xnor", "bwn", "bireal"})
#: defaults: those of the config (aqd_d2/config/quant.py), prefixes as (component, prefix) pairs
DEFAULT_SCOPE = _CFG_SCOPE
DEFAULT_COMPONENT_PREFIXES = tuple(tuple(p.split(":", 1)) for p in _CFG_PREFIXES)
DEFAULT_LAST_LAYERS = _CFG_LAST_LAYERS
_SWAPS = {nn.Conv2d: QConv2d, Conv2d: QConv2d, nn.Linear: QLinear}


# ==== policy ==================================================================================
@dataclass(frozen=True)
class LayerPrecision:
    """Methods and bits of one layer's weight and input (32 bits = that side is float)."""

    w_method: str
    w_bits: int
    a_method: str
    a_bits: int

    @property
    def is_float(self) -> bool:
        return self.w_bits >= FLOAT_BITS and self.a_bits >= FLOAT_BITS

    def describe(self, role: str) -> str:
        """``"liq/4"`` for the given role ("weight"/"activation"), ``"float"`` at 32 bits."""
        m, b = (self.w_method, self.w_bits) if role == "weight" else (self.a_method, self.a_bits)
        return "float" if b >= FLOAT_BITS else f"{m}/{b}"


@dataclass(frozen=True)
class Override:
    """One parsed ``MODEL.QUANT.OVERRIDES`` entry ``"regex:w_method:w_bits:a_method:a_bits"``
    (empty fields take the global value; the regex may itself contain ':')."""

    text: str
    pattern: str
    precision: LayerPrecision

    @classmethod
    def parse(cls, text: str, default: LayerPrecision, key: str) -> "Override":
        parts = text.rsplit(":", 4)
        if len(parts) != 5 or not parts[0]:
            raise ConfigError(
                f"{key} = {text!r}: expected 'regex:w_method:w_bits:a_method:a_bits' "
                "(empty fields keep the global value), e.g. 'head\\..*:liq:2:liq:2'"
            )
        pattern, wm, wb, am, ab = parts
        try:
            re.compile(pattern)
            wb_i = int(wb) if wb else default.w_bits
            ab_i = int(ab) if ab else default.a_bits
        except (re.error, ValueError) as e:
            raise ConfigError(f"{key} = {text!r}: {e}") from None
        p = LayerPrecision(wm or default.w_method, wb_i, am or default.a_method, ab_i)
        return cls(text, pattern, p)


def _parse_kwargs(entries: Sequence[str], key: str) -> Dict[str, Any]:
    """``["name=value", ...]`` -> dict; values via ``ast.literal_eval``, else kept as str."""
    out = {}
    for e in entries:
        name, sep, value = str(e).partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"{key} entry {e!r}: expected 'name=value'")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = value.strip()
    return out


def _is_binary_method(method: str) -> bool:
    """Binary (1-bit only) method: a known binary name, or a registered class whose
    ``allowed_bits`` is (1,)."""
    if method in BINARY_METHODS:
        return True
    if method in available_quantizers():
        return tuple(getattr(get_quantizer_class(method), "allowed_bits", ())) == (1,)
    return False


def _accepts(method: str, kwarg: str) -> bool:
    return kwarg in inspect.signature(get_quantizer_class(method).__init__).parameters


@dataclass
class QuantPolicy:
    """The precision policy, one field per ``MODEL.QUANT`` key (see aqd_d2/config/quant.py for each).

    Construction validates values that do not need the model (bits, method names, binary
    methods at 1 bit, regexes); :func:`quantize_model` checks what needs it.
    """

    w_method: str = "liq"
    w_bits: int = 4
    a_method: str = "liq"
    a_bits: int = 4
    scope: Tuple[str, ...] = DEFAULT_SCOPE
    component_prefixes: Tuple[Union[str, Tuple[str, str]], ...] = DEFAULT_COMPONENT_PREFIXES
    keep_first_fp: bool = True
    first_layer: str = ""
    keep_last_fp: bool = True
    last_layers: Tuple[str, ...] = DEFAULT_LAST_LAYERS
    first_last_bits: int = FLOAT_BITS
    first_last_method: str = ""
    overrides: Tuple[Union[str, Override], ...] = ()
    w_norm: bool = True
    w_kwargs: Dict[str, Any] = field(default_factory=dict)
    a_kwargs: Dict[str, Any] = field(default_factory=dict)
    fused_kernels: str = "auto"  # MODEL.QUANT.FUSED_KERNELS, set on every quantizer built
    integer_eval: str = "auto"  # MODEL.QUANT.INTEGER_EVAL, set on every quantizer built
    check_methods: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Strings are accepted as in the config: "component:prefix" and override strings.
        prefixes = []
        for e in self.component_prefixes:
            comp, sep, prefix = str(e).partition(":") if isinstance(e, str) else (e[0], ":", e[1])
            if not sep or not comp or not prefix:
                raise ConfigError(
                    f"MODEL.QUANT.COMPONENT_PREFIXES entry {e!r}: expected 'component:prefix', "
                    "e.g. 'fpn:backbone.fpn_lateral'"
                )
            prefixes.append((comp, prefix))
        self.component_prefixes = tuple(prefixes)
        self.overrides = tuple(
            o if isinstance(o, Override)
            else Override.parse(o, self.default_precision(), f"MODEL.QUANT.OVERRIDES[{i}]")
            for i, o in enumerate(self.overrides)
        )
        self.scope, self.last_layers = tuple(self.scope), tuple(self.last_layers)
        self.validate()

    @classmethod
    def from_config(cls, cfg: CfgNode, check_methods: bool = True) -> "QuantPolicy":
        """Read and validate ``cfg.MODEL.QUANT``.

        Args:
            cfg: a config on which :func:`aqd_d2.add_aqd_config` was called.
            check_methods: also check that the methods are registered and build with the
                given bits/role/options (False skips that, e.g. for a disabled policy).
        Returns:
            the policy.
        Raises:
            ConfigError: naming the offending key.
        """
        q = cfg.MODEL.QUANT
        return cls(
            w_method=q.W_METHOD, w_bits=int(q.W_BITS), a_method=q.A_METHOD, a_bits=int(q.A_BITS),
            scope=tuple(q.SCOPE), component_prefixes=tuple(q.COMPONENT_PREFIXES),
            keep_first_fp=bool(q.KEEP_FIRST_FP), first_layer=q.FIRST_LAYER,
            keep_last_fp=bool(q.KEEP_LAST_FP), last_layers=tuple(q.LAST_LAYERS),
            first_last_bits=int(q.FIRST_LAST_BITS), first_last_method=q.FIRST_LAST_METHOD,
            overrides=tuple(q.OVERRIDES), w_norm=bool(q.W_NORM),
            w_kwargs=_parse_kwargs(q.W_KWARGS, "MODEL.QUANT.W_KWARGS"),
            a_kwargs=_parse_kwargs(q.A_KWARGS, "MODEL.QUANT.A_KWARGS"),
            fused_kernels=str(q.get("FUSED_KERNELS", "auto")),
            integer_eval=str(q.get("INTEGER_EVAL", "auto")),
            check_methods=check_methods,
        )

    # ---- precisions -------------------------------------------------------------------------
    def default_precision(self) -> LayerPrecision:
        return LayerPrecision(self.w_method, self.w_bits, self.a_method, self.a_bits)

    def first_last_precision(self) -> LayerPrecision:
        b = self.first_last_bits
        wb = FLOAT_BITS if self.w_bits >= FLOAT_BITS else b
        ab = FLOAT_BITS if self.a_bits >= FLOAT_BITS else b
        return LayerPrecision(
            self.first_last_method or self.w_method, wb, self.first_last_method or self.a_method, ab
        )

    def _kwargs(self, method: str, role: str) -> Dict[str, Any]:
        """Options passed to the quantizer: only those its constructor names (W_NORM goes to
        methods with a ``weight_norm`` argument, e.g. LIQ)."""
        kw = dict(self.w_kwargs if role == "weight" else self.a_kwargs)
        if role == "weight":
            kw.setdefault("weight_norm", self.w_norm)
        return {k: v for k, v in kw.items() if _accepts(method, k)}

    def build_quantizers(self, p: LayerPrecision) -> Tuple[Optional[Quantizer], Optional[Quantizer]]:
        """``(weight_quantizer, input_quantizer)`` for precision ``p`` (None for a float side)."""
        wq = aq = None
        if p.w_bits < FLOAT_BITS:
            wq = build_quantizer(p.w_method, p.w_bits, "weight", **self._kwargs(p.w_method, "weight"))
        if p.a_bits < FLOAT_BITS:
            aq = build_quantizer(p.a_method, p.a_bits, "activation", **self._kwargs(p.a_method, "activation"))
        for q in (wq, aq):
            if q is not None:
                q.set_fused_kernels(self.fused_kernels)
                q.set_integer_eval(self.integer_eval)
        return wq, aq

    # ---- validation --------------------------------------------------------------------------
    def _check_side(self, where: str, method: str, bits: int, role: str, keys: Tuple[str, str]) -> None:
        km, kb = keys
        if bits == FLOAT_BITS:
            return
        if not 1 <= bits <= 8:
            raise ConfigError(f"{where}{kb} = {bits}: bits must be in 1..8, or 32 for float")
        if _is_binary_method(method) and bits != 1:
            raise ConfigError(f"{where}{km} = {method!r} is a binary method: {kb} must be 1, got {bits}")
        if not self.check_methods:
            return
        known = available_quantizers()
        if method not in known:
            raise ConfigError(f"{where}{km} = {method!r} is not a known quantization method; known: {known}")
        try:
            build_quantizer(method, bits, role, **self._kwargs(method, role))
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where}{km} = {method!r} with {kb} = {bits} ({role}s): {e}") from None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the MODEL.QUANT key of any bad value."""
        k = "MODEL.QUANT."
        self._check_side(k, self.w_method, self.w_bits, "weight", ("W_METHOD", "W_BITS"))
        self._check_side(k, self.a_method, self.a_bits, "activation", ("A_METHOD", "A_BITS"))
        if self.first_last_bits != FLOAT_BITS and (self.keep_first_fp or self.keep_last_fp):
            p = self.first_last_precision()
            for m, b, role in ((p.w_method, p.w_bits, "weight"), (p.a_method, p.a_bits, "activation")):
                if _is_binary_method(m) and b != FLOAT_BITS:
                    raise ConfigError(
                        f"MODEL.QUANT.FIRST_LAST_BITS = {b} with binary method {m!r}: set "
                        "MODEL.QUANT.FIRST_LAST_METHOD to a multi-bit method (e.g. 'dorefa')"
                    )
                self._check_side(k, m, b, role, ("FIRST_LAST_METHOD", "FIRST_LAST_BITS"))
        for i, o in enumerate(self.overrides):
            p, where = o.precision, f"MODEL.QUANT.OVERRIDES[{i}] ({o.text!r}): "
            self._check_side(where, p.w_method, p.w_bits, "weight", ("w_method", "w_bits"))
            self._check_side(where, p.a_method, p.a_bits, "activation", ("a_method", "a_bits"))
        components = {c for c, _ in self.component_prefixes}
        bad = [s for s in self.scope if s not in components]
        if bad:
            raise ConfigError(
                f"MODEL.QUANT.SCOPE = {list(self.scope)}: {bad} not defined by "
                f"MODEL.QUANT.COMPONENT_PREFIXES (components: {sorted(components)})"
            )
        for key, pats in (("LAST_LAYERS", self.last_layers), ("FIRST_LAYER", [self.first_layer])):
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"MODEL.QUANT.{key} pattern {pat!r}: {e}") from None
        if self.check_methods:
            for role, kw in (("weight", self.w_kwargs), ("activation", self.a_kwargs)):
                methods = {self.w_method if role == "weight" else self.a_method}
                methods |= {o.precision.w_method if role == "weight" else o.precision.a_method
                            for o in self.overrides}
                for name in kw:
                    if not any(m in available_quantizers() and _accepts(m, name) for m in methods):
                        raise ConfigError(
                            f"MODEL.QUANT.{'W' if role == 'weight' else 'A'}_KWARGS: option "
                            f"{name!r} is accepted by none of the methods in use {sorted(methods)}"
                        )
