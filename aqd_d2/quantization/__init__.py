"""Pure-PyTorch quantizers (no detectron2 import here or below).

Importing this package registers every method: ``fp``, ``liq`` (AQD), ``lsq``, ``dorefa``,
``twn`` (k-bit / ternary, :mod:`.uniform`, :mod:`.liq`) and ``bnn``, ``xnor``, ``bwn``,
``bireal`` (1-bit, :mod:`.binary`). Build one with ``build_quantizer(method, bits, role)``.
:func:`quant_conv2d` / :func:`quant_linear` are the memory-lean fused layer ops.
"""
from .base import Quantizer, clear_weight_caches, validate_bits
from .registry import available_quantizers, build_quantizer, get_quantizer_class, register_quantizer
from .functional import approx_sign, binary_sign, fake_quantize, round_ste, sign_ste
from . import liq, uniform, binary  # noqa: F401  (registration)
from .liq import LearnedIntervalQuantizer
from .uniform import (
    DoReFaQuantizer,
    FullPrecision,
    LearnedStepSizeQuantizer,
    TernaryWeightQuantizer,
)
from .binary import (
    BinaryQuantizer,
    BinaryWeightQuantizer,
    BiRealQuantizer,
    XNORQuantizer,
    xnor_activation_scale,
)
from .fused import quant_conv2d, quant_linear

__all__ = [
    "Quantizer",
    "validate_bits",
    "clear_weight_caches",
    "available_quantizers",
    "build_quantizer",
    "get_quantizer_class",
    "register_quantizer",
    "approx_sign",
    "binary_sign",
    "fake_quantize",
    "round_ste",
    "sign_ste",
    "LearnedIntervalQuantizer",
    "FullPrecision",
    "LearnedStepSizeQuantizer",
    "DoReFaQuantizer",
    "TernaryWeightQuantizer",
    "BinaryQuantizer",
    "XNORQuantizer",
    "BinaryWeightQuantizer",
    "BiRealQuantizer",
    "xnor_activation_scale",
    "quant_conv2d",
    "quant_linear",
]
