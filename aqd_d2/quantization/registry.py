"""Registry of quantization methods, looked up by name (``"liq"``, ``"bnn"``, ...)."""
from __future__ import annotations

from typing import Callable, Dict, List, Type

from .base import Quantizer

__all__ = ["register_quantizer", "build_quantizer", "available_quantizers", "get_quantizer_class"]

_REGISTRY: Dict[str, Type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[Type[Quantizer]], Type[Quantizer]]:
    """Class decorator: register a :class:`Quantizer` subclass under ``name``."""

    def deco(cls: Type[Quantizer]) -> Type[Quantizer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise KeyError(f"quantizer {name!r} is already registered by {_REGISTRY[name]}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_quantizers() -> List[str]:
    """Sorted names of every registered method."""
    return sorted(_REGISTRY)


def get_quantizer_class(name: str) -> Type[Quantizer]:
    """The class registered under ``name``; unknown names fail with the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown quantization method {name!r}; known methods: {available_quantizers()}"
        ) from None


def build_quantizer(method: str, bits: int, role: str = "weight", **kwargs) -> Quantizer:
    """Instantiate the quantizer ``method`` with ``bits`` bits for ``role``.

    Args:
        method: registered name (see :func:`available_quantizers`).
        bits: bit width; each class validates what it supports.
        role: ``"weight"`` or ``"activation"``.
        kwargs: method-specific options.
    """
    return get_quantizer_class(method)(bits=bits, role=role, **kwargs)
