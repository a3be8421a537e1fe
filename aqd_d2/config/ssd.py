"""SSD300 (paper 000): MODEL.SSD.*, MODEL.VGG.*, the SSD data mapper (INPUT.SSD.*).
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range  # noqa: F401


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
