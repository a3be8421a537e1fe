"""The quantizer interface every method of aqd_d2 implements (pure PyTorch).

A quantizer is an ``nn.Module`` mapping a float tensor to its *fake-quantized* value: a
float tensor of the same shape whose entries take at most ``2**bits`` distinct values (per
scale group), with a straight-through style backward. All state (learned intervals, step
sizes, running scales, the on/off flag, the "initialised from data" flag) lives in
parameters and buffers, so checkpoints and DDP carry it.

Contract for subclasses:

* ``quantize(x)`` returns the fake-quantized tensor (called only while enabled).
* ``encode(x)`` returns ``(codes, step, offset)`` with integer ``codes`` in
  ``[0, 2**bits - 1]`` (``uint8``) and ``step`` / ``offset`` float tensors broadcastable
  to ``x`` such that ``codes * step + offset`` equals ``quantize(x)`` (bit-packed export
  stores exactly these three things; ``decode`` is their inverse).
* ``padding_value``: the value the layer must use to pad the *quantized* input of a conv.
  Zero for methods whose grid contains 0; binary activation methods pad with -1, because
  0 is not a binary value (the bit-packed kernels store padding as bit 0 = -1).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Base class of all quantizers.

    Args:
        bits: bit width k (1 for binary methods, 32 for full precision).
        role: ``"weight"`` or ``"activation"``; methods may differ per role.

    Buffers:
        enabled (bool scalar): when False, ``forward`` is the identity. Flipped by
            :meth:`set_enabled` (stage-wise binarization and teacher warm-up use it) and
            saved in checkpoints.
    """

    #: registry name of the method, set by the registry decorator
    method: str = "base"
    #: roles this method supports
    roles: Tuple[str, ...] = ("weight", "activation")

    def __init__(self, bits: int, role: str = "weight"):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"quantizer role must be 'weight' or 'activation', got {role!r}")
        if role not in self.roles:
            raise ValueError(
                f"quantizer {self.method!r} cannot quantize {role}s (supports {self.roles})"
            )
        self.bits = int(bits)
        self.role = role
        self.register_buffer("enabled", torch.tensor(True))

    # ---- state -------------------------------------------------------------------------
    def set_enabled(self, flag: bool) -> None:
        """Switch quantization on (True) or make this quantizer the identity (False)."""
        self.enabled.fill_(bool(flag))

    @property
    def is_enabled(self) -> bool:
        return bool(self.enabled)

    @property
    def is_binary(self) -> bool:
        return self.bits == 1

    @property
    def num_levels(self) -> int:
        """Number of distinct output values per scale group (2**bits)."""
        return 2 ** self.bits

    @property
    def padding_value(self) -> float:
        return 0.0

    # ---- computation -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"quantizer {self.method!r} has no integer encoding")

    @staticmethod
    def decode(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``codes * step + offset`` as float32."""
        return codes.to(step.dtype) * step + offset

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, role={self.role}"
