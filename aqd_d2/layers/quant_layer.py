"""What every quantized layer of aqd_d2 shares: its two quantizers and how they are applied.

A quantized layer computes ``op(Q_x(x), Q_w(W))`` where ``Q_w`` (``weight_quantizer``) and
``Q_x`` (``input_quantizer``) are :class:`aqd_d2.quantization.Quantizer` submodules, so their
state (learned intervals, step sizes, the ``enabled`` flag) lives in parameters and buffers
of the layer and is checkpointed and replicated by DDP like any other state.

Either quantizer may be ``None``: that side of the layer stays full precision (e.g.
binary-weight networks keep float activations). A quantizer whose ``enabled`` buffer is
False is the identity; everything that depends on the quantizer (padding value, XNOR
activation scale) then falls back to the float behaviour, so a layer with both quantizers
disabled computes exactly what the float layer computes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from aqd_d2.quantization import Quantizer

__all__ = ["QuantLayerMixin"]


class QuantLayerMixin:
    """Mixin for layers holding a ``weight_quantizer`` and an ``input_quantizer``.

    Must come before the ``nn.Module`` base in the MRO; :meth:`_set_quantizers` is called
    at the end of the layer's ``__init__``.
    """

    weight_quantizer: Optional[Quantizer]
    input_quantizer: Optional[Quantizer]

    def _set_quantizers(
        self, weight_quantizer: Optional[Quantizer], input_quantizer: Optional[Quantizer]
    ) -> None:
        for q, role, arg in (
            (weight_quantizer, "weight", "weight_quantizer"),
            (input_quantizer, "activation", "input_quantizer"),
        ):
            if q is None:
                continue
            if not isinstance(q, nn.Module):
                raise TypeError(f"{arg} must be an nn.Module quantizer or None, got {type(q)}")
            if getattr(q, "role", role) != role:
                raise ValueError(f"{arg} must have role {role!r}, got role {q.role!r}")
        # Assigning None to a fresh name just records "no quantizer": no state_dict entry.
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    # ---- helpers used by forward ----------------------------------------------------------
    @staticmethod
    def _active(q: Optional[nn.Module]) -> bool:
        """True for a present, enabled quantizer. aqd_d2 quantizers answer from a host copy
        of their ``enabled`` buffer (:attr:`Quantizer.is_enabled`), so a training step on
        a GPU does not wait for the device here."""
        if q is None:
            return False
        if isinstance(q, Quantizer):
            return q.is_enabled
        return bool(getattr(q, "enabled", True))

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(W)``: the fake-quantized weight (the float weight if no/disabled quantizer)."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_x(x)``. Empty inputs (e.g. an ROI head with no proposals) pass unchanged, so
        a quantizer never computes statistics of an empty tensor."""
        if self.input_quantizer is None or x.numel() == 0:
            return x
        return self.input_quantizer(x)

    @property
    def input_padding_value(self) -> float:
        """Value used to pad the quantized input: the input quantizer's ``padding_value``
        while it is enabled (-1 for binary activations, whose grid has no 0), else 0."""
        if not self._active(self.input_quantizer):
            return 0.0
        return float(getattr(self.input_quantizer, "padding_value", 0.0))

    @property
    def scales_activations(self) -> bool:
        """True when the enabled input quantizer asks for XNOR's activation scale K."""
        return self._active(self.input_quantizer) and bool(
            getattr(self.input_quantizer, "scale_activations", False)
        )

    def fused_ready(self) -> bool:
        """True when every enabled quantizer exposes a ``kernel`` (the interface of
        ``aqd_d2.quantization.fused``); quantizers that only implement ``quantize`` (custom or
        identity ones) run through the plain composition ``op(Q_x(x), Q_w(W))`` instead. Both
        paths give the same values; the fused one saves less memory for backward."""
        return all(
            not self._active(q) or getattr(q, "kernel", None) is not None
            for q in (self.weight_quantizer, self.input_quantizer)
        )

    def _layer_flags(self) -> Tuple[bool, bool]:
        """``(scales_activations, fused_ready())`` in one pass (each quantizer's flags read
        once: the forward's per-call host work)."""
        iq, wq = self.input_quantizer, self.weight_quantizer
        x_on = self._active(iq)
        scale = x_on and bool(getattr(iq, "scale_activations", False))
        ready = (not x_on or getattr(iq, "kernel", None) is not None) and (
            not self._active(wq) or getattr(wq, "kernel", None) is not None)
        return scale, ready

    def quantizers(self) -> Iterator[Tuple[str, Quantizer]]:
        """Yield ``("weight"|"activation", quantizer)`` for each quantizer present."""
        if self.weight_quantizer is not None:
            yield "weight", self.weight_quantizer
        if self.input_quantizer is not None:
            yield "activation", self.input_quantizer

    @staticmethod
    def _describe(q: Optional[nn.Module]) -> str:
        if q is None:
            return "float"
        return f"{getattr(q, 'method', type(q).__name__)}/{getattr(q, 'bits', '?')}b"

    def precision_repr(self) -> str:
        """E.g. ``"w=liq/4b, a=liq/4b"``; ``float`` marks an unquantized side."""
        return f"w={self._describe(self.weight_quantizer)}, a={self._describe(self.input_quantizer)}"
