"""Training dataset mappers chosen by name (``INPUT.TRAIN_MAPPER``).

detectron2's ``DefaultTrainer.build_train_loader`` always uses ``DatasetMapper``; detectors
that need their own augmentation (SSD's photometric distortion / expand / random crop)
register a mapper class here, and aqd_d2's Trainer builds the loader with the one the config
names. Every registered mapper is ``@configurable`` (built as ``Mapper(cfg, is_train=True)``).

Both loaders wrap their mapper in :class:`~aqd_d2.data.checked_mapper.CheckedMapper` (bad
input named or skipped, ``AQD.BAD_INPUT.*``); the train loader is the exact-resume
:class:`~aqd_d2.data.resumable_loader.ResumableTrainLoader` when ``AQD.EXACT_RESUME``.
"""
from __future__ import annotations

from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.utils.registry import Registry

from .checked_mapper import CheckedMapper, SkipMarkedLoader
from .resumable_loader import resumable_loader_from_config

__all__ = ["TRAIN_MAPPER_REGISTRY", "build_train_mapper", "build_aqd_train_loader",
           "build_aqd_test_loader"]

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
    """The train loader with the configured mapper, wrapped by the bad-input check.

    Returns:
        a :class:`~aqd_d2.data.resumable_loader.ResumableTrainLoader` if
        ``cfg.AQD.EXACT_RESUME``, else detectron2's ``build_detection_train_loader``.
    """
    mapper = CheckedMapper.from_config(cfg, build_train_mapper(cfg), is_train=True)
    if cfg.AQD.EXACT_RESUME:
        return resumable_loader_from_config(cfg, mapper)
    return build_detection_train_loader(cfg, mapper=mapper)


def build_aqd_test_loader(cfg, dataset_name: str):
    """detectron2's test loader with ``DatasetMapper(cfg, False)`` wrapped by the bad-input
    check; images skipped under ``AQD.BAD_INPUT.POLICY "skip"`` never reach the model."""
    mapper = CheckedMapper.from_config(cfg, DatasetMapper(cfg, False), is_train=False)
    return SkipMarkedLoader(build_detection_test_loader(cfg, dataset_name, mapper=mapper))
