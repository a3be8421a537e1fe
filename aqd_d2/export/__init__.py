"""Deployment: bit-packed checkpoints (:mod:`.packing`, single-blob file :mod:`.container`) and
the real binary convolution (:mod:`.binary_conv`, XNOR-popcount C++ kernel with an exact
PyTorch fallback), and fast float ROI heads for inference (:mod:`.roi_pooler`: fused
multi-level ROIAlign; :mod:`.float_linear`: float linear layers through oneDNN)."""
from .binary_conv import BinaryConv2dInference, binary_conv2d, kernel_available, pack_weights
from .float_linear import OneDNNLinear, convert_float_linears
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
from .roi_pooler import FastROIPooler, convert_roi_poolers, roi_align_multilevel

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
    "OneDNNLinear",
    "convert_float_linears",
    "FastROIPooler",
    "convert_roi_poolers",
    "roi_align_multilevel",
]
