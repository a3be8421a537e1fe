"""Config keys that aqd_d2 adds to detectron2's config, and their validation.

``add_aqd_config(cfg)`` adds every key on the cfg it is given (normally a fresh
``get_cfg()``); detectron2's global defaults are never mutated, so importing aqd_d2 does not
change anybody's ``get_cfg()``. Each key is documented on the line above it. Precision keys
live only under ``MODEL.QUANT``.

``validate_aqd_config(cfg)`` checks types, ranges and allowed names of those keys and raises
:class:`ConfigError` naming the key and the allowed values. Registered builders call it at
build time, so a bad value fails before any training starts.

One module per section (``add_config`` + ``validate``), listed in ``SECTIONS`` in the order
keys are added.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from . import bidet, centernet_yolo, datasets, detectors, engine, quant, rcnn, reliability, ssd
from . import bidet_ssd  # MODEL.BIDET.SSD_* (after bidet, which creates MODEL.BIDET)
from . import pruning  # AQD.PRUNING, MODEL.SHUFFLENETV2, MODEL.LIGHT_HEAD
from . import pretrain  # MODEL.CLS, AQD.PRETRAIN (backbone pretraining, issue 17)
from .checks import ConfigError, check_choice, check_range, get_key

__all__ = ["add_aqd_config", "validate_aqd_config", "ConfigError", "check_choice", "check_range",
           "get_key", "SECTIONS"]

# quant first: other sections may read MODEL.QUANT; engine creates the AQD node.
SECTIONS = (quant, engine, datasets, detectors, centernet_yolo, ssd, bidet, bidet_ssd, rcnn,
            reliability, pruning, pretrain)


def add_aqd_config(cfg: CN) -> CN:
    """Add every aqd_d2 config key to ``cfg`` (in place) and return it.

    Args:
        cfg: a detectron2 config, normally ``detectron2.config.get_cfg()``.
    Returns:
        the same ``cfg``, now accepting the ``MODEL.QUANT.*`` and ``AQD.*`` keys.
    """
    if "QUANT" in cfg.MODEL and "AQD" in cfg:
        return cfg  # already added
    for section in SECTIONS:
        section.add_config(cfg)
    return cfg


def validate_aqd_config(cfg: CN) -> None:
    """Raise :class:`ConfigError` for any aqd_d2 key with a bad type, range or name."""
    if "AQD" not in cfg or "QUANT" not in cfg.MODEL:
        raise ConfigError(
            "this config lacks aqd_d2's keys: call aqd_d2.add_aqd_config(cfg) before "
            "merging an aqd_d2 yaml file"
        )
    for section in SECTIONS:
        section.validate(cfg)
