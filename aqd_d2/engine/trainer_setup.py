"""``aqd_d2.engine.setup(trainer)``: what a detectron2 ``DefaultTrainer`` needs to train an
aqd_d2 config as aqd_d2's :class:`~aqd_d2.engine.trainer.Trainer` does.

aqd_d2's detectors carry their schedules (stage-wise binarization, filter pruning), so a
stock trainer already applies those. Three features belong to the trainer, and a detector
whose config needs one refuses to train without it
(:class:`~aqd_d2.modeling.training_features.TrainerSetupError` on its first step):

* ``SOLVER.OPTIMIZER`` Adam / AdamW (DefaultTrainer builds SGD): the optimizer is rebuilt by
  :func:`aqd_d2.engine.optimizer.build_optimizer`, and the LR scheduler on it by the trainer's
  own ``build_lr_scheduler``; hooks holding the old ones are pointed at the new ones;
* ``INPUT.TRAIN_MAPPER`` (e.g. SSD's ``SSDMapper``; DefaultTrainer maps with
  ``DatasetMapper``): the train loader is rebuilt by
  :func:`aqd_d2.data.mappers.build_aqd_train_loader` (also PreciseBN's);
* ``AQD.TRAIN_LOOP`` (AutoBiDet's ``BiDetGANLoop``): the trainer's ``SimpleTrainer`` is
  replaced by the registered loop (same model, loader and optimizer), whose own state (the GAN
  optimizers) is checkpointed through a hook. A plain ``SimpleTrainer`` is replaced by
  ``AQDTrainLoop`` (its step plus the ``AQD.NONFINITE`` policy) even when the config needs
  nothing more; a loop of another class is left alone unless the config needs another one.

Use it from a project's own trainer::

    class MyTrainer(DefaultTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            aqd_d2.engine.setup(self)

    trainer = MyTrainer(cfg)          # or: trainer = DefaultTrainer(cfg); setup(trainer)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()

Call it before ``resume_or_load`` (a resume loads the optimizer / scheduler / loop states into
the objects it finds) and before ``train``. What a project builds itself is kept when it
already fits: an optimizer of the configured kind (only marked), a loader built by
:func:`~aqd_d2.data.mappers.build_aqd_train_loader`, or any loader with
``data_loader=False`` (e.g. one whose mapper is :func:`~aqd_d2.data.mappers.build_train_mapper`
``(cfg)``; the detector checks the mapper on the batches themselves). On aqd_d2's own
``Trainer`` it changes nothing. Not provided: exact resume (the per-step seeding, loader
position and Python state that aqd_d2's Trainer checkpoints); it changes no training, only
whether a restarted run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import logging
from typing import List

from detectron2.engine import SimpleTrainer, hooks

from aqd_d2.config import ConfigError
from aqd_d2.data.mappers import LOADER_MAPPER_ATTR, build_aqd_train_loader
from aqd_d2.modeling.training_features import mark_trainer_setup

from .gan_loop import LoopStateHook
from .optimizer import build_optimizer, optimizer_matches
from .train_loop import TRAIN_LOOP_REGISTRY, _SIMPLE_TRAINER_ITER_IS_LAZY, AQDTrainLoop

__all__ = ["setup"]

logger = logging.getLogger(__name__)


def _check_trainer(trainer) -> None:
    if not (hasattr(trainer, "_trainer") and hasattr(trainer, "cfg")
            and hasattr(trainer, "build_lr_scheduler")):
        raise TypeError("aqd_d2.engine.setup expects a detectron2 DefaultTrainer (or a subclass), "
                        f"got {type(trainer).__name__}")
    if getattr(trainer, "storage", None) is not None or trainer.start_iter != 0 or trainer.iter != 0:
        raise RuntimeError("aqd_d2.engine.setup(trainer) must be called right after the trainer "
                           "is constructed, before resume_or_load(resume=True) and train()")


def _setup_optimizer(trainer, cfg) -> List[str]:
    name = cfg.SOLVER.OPTIMIZER
    old = trainer.optimizer
    if optimizer_matches(old, name):
        mark_trainer_setup(trainer.model, "SOLVER.OPTIMIZER", name)
        return []
    new = build_optimizer(cfg, trainer.model)  # marks the model
    old_scheduler = getattr(trainer, "scheduler", None)
    trainer._trainer.optimizer = new
    trainer.scheduler = trainer.build_lr_scheduler(cfg, new)
    for h in trainer._hooks:  # e.g. an LRScheduler hook built with explicit objects
        if getattr(h, "_optimizer", None) is old:
            h._optimizer = new
        if old_scheduler is not None and getattr(h, "_scheduler", None) is old_scheduler:
            h._scheduler = trainer.scheduler
    return [f"optimizer {type(old).__name__} -> {type(new).__name__} (SOLVER.OPTIMIZER "
            f"{name!r}), LR scheduler rebuilt on it"]


def _replace_loader(loop, loader) -> None:
    if hasattr(loop, "reset_data_loader"):  # detectron2 main's SimpleTrainer, AQDTrainLoop
        loop.reset_data_loader(lambda: loader)
    else:  # detectron2 v0.6's SimpleTrainer: a started iterator attribute
        loop.data_loader = loader
        loop._data_loader_iter = iter(loader)


def _setup_loader(trainer, cfg) -> List[str]:
    name = cfg.INPUT.TRAIN_MAPPER
    if name == "DatasetMapper":
        return []
    done = []
    if getattr(trainer.data_loader, LOADER_MAPPER_ATTR, None) != name:
        _replace_loader(trainer._trainer, build_aqd_train_loader(cfg))
        done.append(f"train loader rebuilt with INPUT.TRAIN_MAPPER {name!r}")
    for h in trainer._hooks:
        if isinstance(h, hooks.PreciseBN) and not getattr(h, "_disabled", True) \
                and getattr(h._data_loader, LOADER_MAPPER_ATTR, None) != name:
            c = cfg.clone()
            c.defrost()
            c.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer.build_hooks
            h._data_loader, h._data_iter = build_aqd_train_loader(c), None
            done.append("PreciseBN's loader rebuilt with it")
    return done


def _handed_over_iterator(loop):
    """The started data iterator of ``loop`` (None when it starts lazily and has not)."""
    if isinstance(loop, AQDTrainLoop):
        return loop._aqd_data_iter
    if _SIMPLE_TRAINER_ITER_IS_LAZY:
        return getattr(loop, "_data_loader_iter_obj", None)
    return loop._data_loader_iter


def _setup_loop(trainer, cfg) -> List[str]:
    name = cfg.AQD.TRAIN_LOOP
    if name not in TRAIN_LOOP_REGISTRY:
        raise ConfigError(f"AQD.TRAIN_LOOP = {name!r} is not a registered training loop; known: "
                          f"{sorted(k for k, _ in TRAIN_LOOP_REGISTRY)}")
    cls = TRAIN_LOOP_REGISTRY.get(name)
    t = trainer._trainer
    done = []
    if type(t) is not cls and (type(t) is SimpleTrainer or name != "AQDTrainLoop"):
        if cfg.SOLVER.AMP.ENABLED:
            if name != "AQDTrainLoop":
                raise ValueError(f"SOLVER.AMP.ENABLED cannot be combined with AQD.TRAIN_LOOP = "
                                 f"{name!r}")
        else:
            trainer._trainer = cls(cfg, t.model, t.data_loader, t.optimizer,
                                   data_iter=_handed_over_iterator(t))
            done.append(f"training loop {type(t).__name__} -> {name} (AQD.TRAIN_LOOP)")
    if name == "BiDetGANLoop":
        mark_trainer_setup(trainer.model, "AQD.TRAIN_LOOP", name)
    if name != "AQDTrainLoop" and not any(isinstance(h, LoopStateHook) for h in trainer._hooks):
        trainer.register_hooks([LoopStateHook()])  # the loop's own optimizers in checkpoints
    return done


def setup(trainer, *, data_loader: bool = True) -> List[str]:
    """Give ``trainer`` the optimizer, train loader and training loop its config needs
    (see module doc); a no-op for what is already there.

    Args:
        trainer: a detectron2 ``DefaultTrainer`` (or subclass), just constructed.
        data_loader: rebuild the train loader when its mapper is not the configured one
            (False: keep the project's own loader).
    Returns:
        one line per change made (also logged).
    Raises:
        TypeError: not a DefaultTrainer; RuntimeError: called after resume or training began;
        ValueError: AMP with a training loop other than the plain step.
    """
    _check_trainer(trainer)
    cfg = trainer.cfg
    done = _setup_optimizer(trainer, cfg)
    if data_loader:
        done += _setup_loader(trainer, cfg)
    done += _setup_loop(trainer, cfg)
    for line in done:
        logger.info("aqd_d2.engine.setup: %s", line)
    return done
