"""QLinear: ``torch.nn.Linear`` with quantized weight and input (+ optional norm/activation).

Forward, for input ``x`` of shape (..., in_features)::

    y = linear(Q_x(x), Q_w(W))
    y = y * K + b   with K = mean(|x|, last dim) if the input quantizer asks for XNOR's
                    activation scale (the fully connected case of XNOR-Net), else y + b
    y = activation(norm(y))

``norm`` and ``activation`` mirror ``detectron2.layers.Conv2d`` so both quantized layers
carry the same extras; they are None when converted from a plain ``nn.Linear``.

Eval mode without autograd: a qualifying layer computes in integer form, as the deployed
kernels do (:mod:`aqd_d2.layers.integer_eval`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from aqd_d2.quantization import Quantizer

from aqd_d2.quantization import quant_linear

from .integer_eval import integer_forward
from .quant_layer import QuantLayerMixin

__all__ = ["QLinear"]


class QLinear(QuantLayerMixin, nn.Linear):
    """An ``nn.Linear`` whose weight and input are quantized.

    Parameter names are ``weight`` and ``bias`` (plus ``norm.*``), so a float checkpoint
    loads into it.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        norm: optional normalization applied to the output (e.g. ``nn.BatchNorm1d``).
        activation: optional callable applied after ``norm``.
        weight_quantizer: quantizer with role "weight", or None for float weights.
        input_quantizer: quantizer with role "activation", or None for float inputs.
        device, dtype: as for ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        weight_quantizer: Optional[Quantizer] = None,
        input_quantizer: Optional[Quantizer] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm = norm
        self.activation = activation
        self._set_quantizers(weight_quantizer, input_quantizer)

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_quantizer: Optional[Quantizer],
        input_quantizer: Optional[Quantizer],
    ) -> "QLinear":
        """Build a QLinear computing ``module`` with quantized weight and input.

        Shares ``module``'s ``weight`` / ``bias`` Parameters (and ``norm`` / ``activation``
        attributes if it has them); moves the quantizers to the weight's device; keeps
        train/eval mode.

        Args:
            module: an ``nn.Linear``.
            weight_quantizer, input_quantizer: as for ``__init__``.
        Returns:
            the new QLinear.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QLinear.from_float expects an nn.Linear, got {type(module)}")
        device = module.weight.device
        q = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            norm=getattr(module, "norm", None),
            activation=getattr(module, "activation", None),
            weight_quantizer=None if weight_quantizer is None else weight_quantizer.to(device),
            input_quantizer=None if input_quantizer is None else input_quantizer.to(device),
            device="meta",  # parameters are shared below
        )
        q.weight = module.weight
        q.bias = module.bias
        q.train(module.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (..., in_features). Returns: (..., out_features)."""
        if not self.training:  # eval without autograd: the deployed kernels' arithmetic
            out = integer_forward(self, x)
            if out is not None:
                return out
        scale, ready = self._layer_flags()
        bias = None if scale else self.bias
        if ready:
            out = quant_linear(x, self.weight, bias, input_quantizer=self.input_quantizer,
                        weight_quantizer=self.weight_quantizer)
        else:
            out = F.linear(self.quantize_input(x), self.quantized_weight(), bias)
        if scale:
            out = out * x.abs().mean(dim=-1, keepdim=True)
            if self.bias is not None:
                out = out + self.bias
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.precision_repr()}"
