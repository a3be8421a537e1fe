"""Training loops (one optimisation step per call of ``run_step``) chosen by ``AQD.TRAIN_LOOP``.

aqd_d2's Trainer replaces detectron2's ``SimpleTrainer`` by the loop the config names, built
as ``Loop(cfg, model, data_loader, optimizer)``. ``"AQDTrainLoop"`` (the default) is detectron2's SimpleTrainer step;
detectors that need more than one optimiser per step (AutoBiDet's complexity-estimator GAN)
register their own loop, normally a subclass of :class:`AQDTrainLoop`.
"""
from __future__ import annotations

from typing import Iterator, Optional

from detectron2.engine import SimpleTrainer, TrainerBase
from detectron2.utils.registry import Registry

__all__ = ["TRAIN_LOOP_REGISTRY", "AQDTrainLoop", "build_train_loop"]

TRAIN_LOOP_REGISTRY = Registry("AQD_TRAIN_LOOP")
TRAIN_LOOP_REGISTRY.__doc__ = "Training loops, looked up by cfg.AQD.TRAIN_LOOP."


@TRAIN_LOOP_REGISTRY.register()
class AQDTrainLoop(SimpleTrainer):
    """detectron2's SimpleTrainer step, built from the config.

    Args:
        cfg: the config (loops read their own keys from it).
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        data_iter: an iterator over ``data_loader`` already started (the Trainer passes the
            one of the SimpleTrainer it replaces, so loader workers are not started twice).
    """

    def __init__(self, cfg, model, data_loader, optimizer, data_iter: Optional[Iterator] = None):
        # SimpleTrainer.__init__ would start a second iterator (and its worker processes); set
        # the same attributes it sets instead.
        TrainerBase.__init__(self)
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter = data_iter if data_iter is not None else iter(data_loader)
        self.optimizer = optimizer
        self.cfg = cfg


def build_train_loop(cfg, model, data_loader, optimizer, data_iter: Optional[Iterator] = None
                     ) -> SimpleTrainer:
    """The loop named by ``cfg.AQD.TRAIN_LOOP`` (arguments as for :class:`AQDTrainLoop`)."""
    name = cfg.AQD.TRAIN_LOOP
    if name not in TRAIN_LOOP_REGISTRY:
        from aqd_d2.config import ConfigError

        raise ConfigError(f"AQD.TRAIN_LOOP = {name!r} is not a registered training loop; known: "
                          f"{sorted(k for k, _ in TRAIN_LOOP_REGISTRY)}")
    return TRAIN_LOOP_REGISTRY.get(name)(cfg, model, data_loader, optimizer, data_iter=data_iter)
