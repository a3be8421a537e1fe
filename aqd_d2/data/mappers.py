"""Training dataset mappers chosen by name (``INPUT.TRAIN_MAPPER``).

detectron2's ``DefaultTrainer.build_train_loader`` always uses ``DatasetMapper``; detectors
that need their own augmentation (SSD's photometric distortion / expand / random crop)
register a mapper class here, and aqd_d2's Trainer builds the loader with the one the config
names. Every registered mapper is ``@configurable`` (built as ``Mapper(cfg, is_train=True)``).

For a project's own trainer: ``build_train_loader`` may return :func:`build_aqd_train_loader`
``(cfg)``, or pass :func:`build_train_mapper` ``(cfg)`` as the mapper of detectron2's
``build_detection_train_loader``; either gives the configured augmentation (or call
``aqd_d2.engine.setup(trainer)``, which rebuilds a stock trainer's loader this way).

Every registered mapper except detectron2's own tags each dict it maps with its registry name
(``d[TRAIN_MAPPER_TAG] = "SSDMapper"``; the registry wraps the class's ``__call__`` when it
is registered). The detector reads the tag on its training batches: a model whose config
names a mapper refuses batches mapped by another one
(:mod:`aqd_d2.modeling.training_features`), so a trainer that maps with detectron2's
``DatasetMapper`` cannot silently train SSD without its augmentation.

Both loaders wrap their mapper in :class:`~aqd_d2.data.checked_mapper.CheckedMapper` (bad
input named or skipped, ``AQD.BAD_INPUT.*``); the train loader is the exact-resume
:class:`~aqd_d2.data.resumable_loader.ResumableTrainLoader` when ``AQD.EXACT_RESUME``.
"""
from __future__ import annotations

import functools

from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.utils.registry import Registry

from .checked_mapper import CheckedMapper, SkipMarkedLoader
from .resumable_loader import resumable_loader_from_config

__all__ = ["TRAIN_MAPPER_REGISTRY", "TRAIN_MAPPER_TAG", "build_train_mapper",
           "build_aqd_train_loader", "build_aqd_test_loader"]

#: key of the registry name that registered mappers add to every dict they map
TRAIN_MAPPER_TAG = "aqd_train_mapper"
#: attribute :func:`build_aqd_train_loader` sets on its loaders: the mapper's registry name
LOADER_MAPPER_ATTR = "aqd_train_mapper"


def _tagging_call(call, name: str):
    @functools.wraps(call)
    def __call__(self, dataset_dict):
        out = call(self, dataset_dict)
        if isinstance(out, dict):
            out[TRAIN_MAPPER_TAG] = name
        return out

    __call__.aqd_tags = name
    return __call__


class _TrainMapperRegistry(Registry):
    """detectron2's Registry; registering a class (not one of detectron2's) makes its
    ``__call__`` tag the dicts it returns with the registry name (see module doc)."""

    def _do_register(self, name, obj) -> None:
        super()._do_register(name, obj)
        call = getattr(obj, "__call__", None)
        if (isinstance(obj, type) and not obj.__module__.startswith("detectron2.")
                and callable(call) and getattr(call, "aqd_tags", None) != name):
            obj.__call__ = _tagging_call(call, name)


TRAIN_MAPPER_REGISTRY = _TrainMapperRegistry("AQD_TRAIN_MAPPER")
TRAIN_MAPPER_REGISTRY.__doc__ = "Training dataset mappers, looked up by cfg.INPUT.TRAIN_MAPPER."
TRAIN_MAPPER_REGISTRY.register(DatasetMapper)


def build_train_mapper(cfg):
    """The mapper named by ``cfg.INPUT.TRAIN_MAPPER`` (``"DatasetMapper"``: detectron2's),
    for training; pass it to detectron2's ``build_detection_train_loader(cfg, mapper=...)``
    in a project's own ``build_train_loader``."""
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
        ``cfg.AQD.EXACT_RESUME``, else detectron2's ``build_detection_train_loader``; its
        attribute ``aqd_train_mapper`` is ``cfg.INPUT.TRAIN_MAPPER``.
    """
    mapper = CheckedMapper.from_config(cfg, build_train_mapper(cfg), is_train=True)
    if cfg.AQD.EXACT_RESUME:
        loader = resumable_loader_from_config(cfg, mapper)
    else:
        loader = build_detection_train_loader(cfg, mapper=mapper)
    try:
        setattr(loader, LOADER_MAPPER_ATTR, cfg.INPUT.TRAIN_MAPPER)
    except AttributeError:  # a loader class with __slots__: aqd_d2.engine.setup rebuilds it
        pass
    return loader


def build_aqd_test_loader(cfg, dataset_name: str):
    """detectron2's test loader with ``DatasetMapper(cfg, False)`` wrapped by the bad-input
    check; images skipped under ``AQD.BAD_INPUT.POLICY "skip"`` never reach the model."""
    mapper = CheckedMapper.from_config(cfg, DatasetMapper(cfg, False), is_train=False)
    return SkipMarkedLoader(build_detection_test_loader(cfg, dataset_name, mapper=mapper))
