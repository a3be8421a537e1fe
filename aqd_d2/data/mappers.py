"""Training dataset mappers chosen by name (``INPUT.TRAIN_MAPPER``).

detectron2's ``DefaultTrainer.build_train_loader`` always uses ``DatasetMapper``; detectors
that need their own augmentation (SSD's photometric distortion / expand / random crop)
register a mapper class here, and aqd_d2's Trainer builds the loader with the one the config
names. Every registered mapper is ``@configurable`` (built as ``Mapper(cfg, is_train=True)``).
"""
from __future__ import annotations

from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.utils.registry import Registry

__all__ = ["TRAIN_MAPPER_REGISTRY", "build_train_mapper", "build_aqd_train_loader"]

TRAIN_MAPPER_REGISTRY = Registry("AQD_TRAIN_MAPPER")
TRAIN_MAPPER_REGISTRY.__doc__ = "Training dataset mappers, looked up by cfg.INPUT.TRAIN_MAPPER."
TRAIN_MAPPER_REGISTRY.register(DatasetMapper)


def build_train_mapper(cfg):
    """The mapper named by ``cfg.INPUT.TRAIN_MAPPER`` (``"DatasetMapper"``: detectron2's)."""
    name = cfg.INPUT.TRAIN_MAPPER
    if name not in TRAIN_MAPPER_REGISTRY:
        from aqd_d2.config import ConfigError

        raise ConfigError(f"INPUT.TRAIN_MAPPER = {name!r} is not a registered mapper; known: "
                          f"{sorted(k for k, _ in TRAIN_MAPPER_REGISTRY)}")
    return TRAIN_MAPPER_REGISTRY.get(name)(cfg, True)


def build_aqd_train_loader(cfg):
    """detectron2's ``build_detection_train_loader`` with the configured mapper."""
    return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))
