"""Deployment: bit-packed checkpoints (:mod:`.packing`, single-blob file :mod:`.container`) and
the real binary convolution (:mod:`.binary_conv`, XNOR-popcount C++ kernel with an exact
PyTorch fallback)."""
from .binary_conv import BinaryConv2dInference, binary_conv2d, kernel_available, pack_weights
from .packing import (
    FORMAT,
    VERSION,
    VERSIONS,
    PackedCheckpointError,
    PackedSizeReport,
    load_packed,
    pack_bits,
    packed_size_report,
    save_packed,
    unpack_bits,
)

__all__ = [
    "BinaryConv2dInference",
    "binary_conv2d",
    "kernel_available",
    "pack_weights",
    "FORMAT",
    "VERSION",
    "VERSIONS",
    "PackedCheckpointError",
    "PackedSizeReport",
    "load_packed",
    "pack_bits",
    "packed_size_report",
    "save_packed",
    "unpack_bits",
]
