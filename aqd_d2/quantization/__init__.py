"""Pure-PyTorch quantizers (no detectron2 import here or below)."""
from .base import Quantizer
from .registry import available_quantizers, build_quantizer, get_quantizer_class, register_quantizer

__all__ = [
    "Quantizer",
    "available_quantizers",
    "build_quantizer",
    "get_quantizer_class",
    "register_quantizer",
]
