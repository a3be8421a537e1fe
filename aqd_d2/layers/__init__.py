"""Quantized layers: drop-in replacements of detectron2 / torch layers with the same
parameter names, holding a weight quantizer and an input quantizer
(see :mod:`aqd_d2.quantization`). :func:`aqd_d2.convert.quantize_model` puts them in a model."""
from .qconv import QConv2d
from .qlinear import QLinear
from .quant_layer import QuantLayerMixin

__all__ = ["QConv2d", "QLinear", "QuantLayerMixin"]
