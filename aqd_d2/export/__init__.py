"""Deployment formats: bit-packed checkpoints of quantized models (:mod:`.packing`)."""
from .packing import (
    FORMAT,
    VERSION,
    PackedCheckpointError,
    PackedSizeReport,
    load_packed,
    pack_bits,
    packed_size_report,
    save_packed,
    unpack_bits,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "PackedCheckpointError",
    "PackedSizeReport",
    "load_packed",
    "pack_bits",
    "packed_size_report",
    "save_packed",
    "unpack_bits",
]
