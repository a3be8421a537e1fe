"""Config keys that aqd_d2 adds to detectron2's config, and their validation.

``add_aqd_config(cfg)`` adds every key on the cfg it is given (normally a fresh
``get_cfg()``); detectron2's global defaults are never mutated, so importing aqd_d2 does not
change anybody's ``get_cfg()``. Each key is documented on the line above it. Precision keys
live only under ``MODEL.QUANT``.

``validate_aqd_config(cfg)`` checks types, ranges and allowed names of those keys and raises
:class:`ConfigError` naming the key and the allowed values. Registered builders call it at
build time, so a bad value fails before any training starts.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_aqd_config", "validate_aqd_config", "ConfigError"]


class ConfigError(ValueError):
    """A config value aqd_d2 cannot use; the message names the key and what is allowed."""


def _add_quant_config(cfg: CN) -> None:
    """MODEL.QUANT: the precision policy read by the conversion pass (aqd_d2.convert)."""
    _C = cfg
    _C.MODEL.QUANT = CN()
    # Apply the conversion pass at all. False builds the float detector.
    _C.MODEL.QUANT.ENABLED = False


def _add_engine_config(cfg: CN) -> None:
    """Keys read by aqd_d2.engine (trainer, hooks)."""
    _C = cfg
    _C.AQD = CN()
    # Evaluator for the test datasets: "auto" picks it from the dataset's metadata
    # evaluator_type ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator).
    _C.AQD.EVALUATOR = "auto"


def add_aqd_config(cfg: CN) -> CN:
    """Add every aqd_d2 config key to ``cfg`` (in place) and return it.

    Args:
        cfg: a detectron2 config, normally ``detectron2.config.get_cfg()``.
    Returns:
        the same ``cfg``, now accepting the ``MODEL.QUANT.*`` and ``AQD.*`` keys.
    """
    if "QUANT" in cfg.MODEL and "AQD" in cfg:
        return cfg  # already added
    _add_quant_config(cfg)
    _add_engine_config(cfg)
    return cfg


def _check_choice(cfg: CN, key: str, allowed) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if node not in allowed:
        raise ConfigError(f"{key} = {node!r} is not allowed; choose one of {sorted(allowed)}")


def validate_aqd_config(cfg: CN) -> None:
    """Raise :class:`ConfigError` for any aqd_d2 key with a bad type, range or name."""
    if "AQD" not in cfg or "QUANT" not in cfg.MODEL:
        raise ConfigError(
            "this config lacks aqd_d2's keys: call aqd_d2.add_aqd_config(cfg) before "
            "merging an aqd_d2 yaml file"
        )
    _check_choice(cfg, "AQD.EVALUATOR", {"auto", "coco", "pascal_voc", "none"})
