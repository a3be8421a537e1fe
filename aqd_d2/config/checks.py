"""The error type and small checks shared by every config section."""
from __future__ import annotations

from typing import Any, Iterable

from detectron2.config import CfgNode as CN

__all__ = ["ConfigError", "check_choice", "get_key", "check_range"]


class ConfigError(ValueError):
    """A config value aqd_d2 cannot use; the message names the key and what is allowed."""


def get_key(cfg: CN, key: str) -> Any:
    """The value of a dotted ``key`` such as ``"MODEL.QUANT.W_BITS"``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_choice(cfg: CN, key: str, allowed: Iterable) -> None:
    """Raise :class:`ConfigError` unless ``cfg.<key>`` is one of ``allowed``."""
    allowed = set(allowed)
    value = get_key(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {sorted(allowed)}")


def check_range(cfg: CN, key: str, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``lo <= cfg.<key> <= hi`` (``<`` where open; None = no bound)."""
    value = get_key(cfg, key)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r}: must be a number") from None
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{key} = {value!r}: must be in {lb}{'-inf' if lo is None else lo}, "
                          f"{'inf' if hi is None else hi}{rb}")
