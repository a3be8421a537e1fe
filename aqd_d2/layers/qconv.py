"""QConv2d: detectron2's ``Conv2d`` (optional norm + activation) with quantized weight/input.

Forward, for input ``x`` of shape (N, C_in, H, W)::

    xq  = Q_x(x)                                # input_quantizer (identity if None/disabled)
    xq  = F.pad(xq, pad, value=padding_value)   # only if padding_value != 0 (see below)
    y   = conv2d(xq, Q_w(W), stride, dilation, groups)
    y   = y * K + b    if the input quantizer asks for XNOR's scale K, else y + b
    y   = activation(norm(y))

Padding. A zero-padded conv adds the value 0 at the border, but 0 is not a binary value:
binary activations live in {-1, +1} and bitwise kernels encode -1 as bit 0, so a real
binary kernel pads with -1. To make the float simulation equal the deployed kernel, the
quantized input is padded explicitly with the input quantizer's ``padding_value`` (-1 for
binary activation methods) and the conv then runs with padding 0. Methods whose grid
contains 0 (padding_value 0) use the conv's own zero padding, which is the same thing.
Non-"zeros" ``padding_mode`` (reflect, replicate, circular) copies in-grid values and is
applied the same explicit way.

Computation. When every enabled quantizer exposes a ``kernel`` (aqd_d2's methods do), the
conv runs as ``aqd_d2.quantization.quant_conv2d``: the same values, as one autograd node that
saves only ``x``, ``W`` and the quantizer parameters for backward (the quantized operands are
recomputed), instead of keeping both ``x`` and ``Q_x(x)`` alive. Other quantizers (anything
implementing only ``quantize``) and non-"zeros" padding modes use the plain composition.

Eval mode without autograd: a qualifying layer sums the integer codes exactly and applies its
scales (and its batch norm, folded) afterwards, as the deployed kernels do, so the deployed
model gives the trained model's detections (:mod:`aqd_d2.layers.integer_eval`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from aqd_d2.quantization import Quantizer

from aqd_d2.quantization import quant_conv2d, xnor_activation_scale

from .integer_eval import integer_forward
from .quant_layer import QuantLayerMixin

__all__ = ["QConv2d"]


class QConv2d(QuantLayerMixin, Conv2d):
    """A ``detectron2.layers.Conv2d`` whose weight and input are quantized.

    Parameter and buffer names are those of ``Conv2d`` (``weight``, ``bias``, ``norm.*``), so
    a float checkpoint loads into it; the quantizers add ``weight_quantizer.*`` and
    ``input_quantizer.*`` entries.

    Args:
        *args, **kwargs: as for ``detectron2.layers.Conv2d`` (``torch.nn.Conv2d`` arguments
            plus ``norm`` and ``activation``).
        weight_quantizer: quantizer with role "weight", or None for float weights.
        input_quantizer: quantizer with role "activation", or None for float inputs.
    """

    def __init__(
        self,
        *args,
        weight_quantizer: Optional[Quantizer] = None,
        input_quantizer: Optional[Quantizer] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._set_quantizers(weight_quantizer, input_quantizer)

    # ---- construction from a float layer ---------------------------------------------------
    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weight_quantizer: Optional[Quantizer],
        input_quantizer: Optional[Quantizer],
    ) -> "QConv2d":
        """Build a QConv2d computing ``module``'s conv with quantized weight and input.

        The new layer *shares* ``module``'s ``weight`` / ``bias`` Parameters and its ``norm``
        and ``activation`` objects (nothing is copied; an optimizer built later sees the same
        tensors). The quantizers are moved to the weight's device; train/eval mode is kept.

        Args:
            module: a ``torch.nn.Conv2d`` or ``detectron2.layers.Conv2d``.
            weight_quantizer, input_quantizer: as for ``__init__``.
        Returns:
            the new QConv2d.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QConv2d.from_float expects an nn.Conv2d, got {type(module)}")
        device = module.weight.device
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            norm=getattr(module, "norm", None),
            activation=getattr(module, "activation", None),
            device="meta",  # no throw-away allocation: the parameters are shared below
            weight_quantizer=None if weight_quantizer is None else weight_quantizer.to(device),
            input_quantizer=None if input_quantizer is None else input_quantizer.to(device),
        )
        q.weight = module.weight
        q.bias = module.bias
        q.train(module.training)
        return q

    # ---- forward ---------------------------------------------------------------------------
    def _explicit_padding(self) -> Tuple[int, int, int, int]:
        """The conv's padding as ``(left, right, top, bottom)`` for ``F.pad``.

        String paddings follow torch: "valid" is 0, "same" pads ``dilation*(k-1)`` in total
        per dim with the extra pixel on the right/bottom.
        """
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            pads = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            return (left, right, top, bottom)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def _activation_scale(self, x: torch.Tensor, pad: Tuple[int, int, int, int]) -> torch.Tensor:
        return xnor_activation_scale(x, self.kernel_size, self.stride, pad, self.dilation)

    def _quant_conv(self, x: torch.Tensor, bias: Optional[torch.Tensor],
                    ready: Optional[bool] = None) -> torch.Tensor:
        """``conv2d(pad(Q_x(x), padding_value), Q_w(W)) + bias`` (see module docstring).
        ``ready``: :meth:`fused_ready` if the caller knows it."""
        pad = self._explicit_padding()
        if self.padding_mode == "zeros" and (self.fused_ready() if ready is None else ready):
            return quant_conv2d(x, self.weight, bias, self.stride, pad, self.dilation, self.groups,
                         input_quantizer=self.input_quantizer, weight_quantizer=self.weight_quantizer)
        xq = self.quantize_input(x)
        padding: Union[str, Tuple[int, int]] = self.padding
        pad_value = self.input_padding_value
        if any(pad) and (pad_value != 0.0 or self.padding_mode != "zeros"):
            if self.padding_mode == "zeros":
                xq = F.pad(xq, pad, mode="constant", value=pad_value)
            else:
                xq = F.pad(xq, pad, mode=self.padding_mode)
            padding = 0
        return F.conv2d(xq, self.quantized_weight(), bias, self.stride, padding, self.dilation,
                        self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C_in, H, W). Returns: (N, C_out, H_out, W_out)."""
        if not self.training:  # eval without autograd: the deployed kernels' arithmetic
            out = integer_forward(self, x)
            if out is not None:
                return out
        scale, ready = self._layer_flags()
        if scale:
            out = self._quant_conv(x, None, ready) * self._activation_scale(x, self._explicit_padding())
            if self.bias is not None:
                out = out + self.bias.view(1, -1, 1, 1)
        else:
            out = self._quant_conv(x, self.bias, ready)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.precision_repr()}"
