"""Bit packing (:func:`pack_bits` / :func:`unpack_bits`). ``n`` codes of ``k`` bits
(1 <= k <= 8) form a stream of ``n*k`` bits: code ``i`` contributes its bits LSB first at
stream positions ``i*k .. i*k+k-1``. The stream is cut into bytes, bit ``j`` of a byte being
stream position ``8*b + j`` (little-endian bit order), and zero-padded to a whole byte, so
the packed size is ``ceil(n*k/8)`` bytes. Unpacking needs ``k`` and ``n`` and is the exact
inverse.
"""
from __future__ import annotations

import math

import torch

__all__ = ["pack_bits", "unpack_bits"]


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of ``bits`` bits each into bytes (layout in the module docstring).

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits - 1]``; read flattened.
        bits: 1..8.
    Returns:
        1-D ``uint8`` tensor of ``ceil(codes.numel() * bits / 8)`` bytes (on the CPU).
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits")
    flat = flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n*bits,) LSB first
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for j in range(8):
        out |= stream[:, j] << j
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: 1-D ``uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes.
        bits: 1..8, as used for packing.
        numel: number of codes.
    Returns:
        1-D ``uint8`` tensor of ``numel`` codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != math.ceil(numel * bits / 8):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {numel} codes of {bits} bits "
            f"(expected {math.ceil(numel * bits / 8)})"
        )
    stream = ((packed.cpu().unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    b = stream[: numel * bits].view(numel, bits)
    codes = torch.zeros(numel, dtype=torch.uint8)
    for j in range(bits):
        codes |= b[:, j] << j
    return codes
