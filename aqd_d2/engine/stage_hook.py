"""Stage-wise binarization (paper 004, sec. III-B) as a trainer hook, and the list of aqd_d2
hooks the :class:`~aqd_d2.engine.trainer.Trainer` adds to detectron2's defaults.

aqd_d2's detectors carry the stage schedule themselves
(:class:`aqd_d2.modeling.stage_schedule.StageSchedule`, attached by the registered
``QuantizedDetector`` builder and applied at each training forward with the event storage's
iteration), so any detectron2 trainer binarizes them stage by stage and the Trainer adds no
stage hook. :class:`StageBinarizationHook` applies the same rule from a trainer for converted
models that do not carry it (e.g. built by :func:`aqd_d2.convert.quantize_model` directly):
group i's quantizers are enabled iff the iteration is ``>= ITERS[i]``, set in ``before_train``
(so a resumed run continues in its stage) and at each group's first iteration.
"""
from __future__ import annotations

import logging
from typing import List, Sequence

from detectron2.engine import HookBase
from torch import nn

from aqd_d2.convert import set_quantization_enabled
from aqd_d2.utils import unwrap_model

from .gan_loop import build_loop_state_hooks

__all__ = ["StageBinarizationHook", "build_aqd_hooks", "apply_stage_state"]

logger = logging.getLogger(__name__)


def apply_stage_state(model: nn.Module, groups: Sequence[str], iters: Sequence[int],
                      iteration: int) -> List[List[str]]:
    """Enable group i's quantizers iff ``iteration >= iters[i]``, disable them otherwise.

    Returns:
        per group, the names of the quantized layers that were set.
    Raises:
        ValueError: a group matches no quantized layer.
    """
    model = unwrap_model(model)
    return [set_quantization_enabled(model, iteration >= start, name_regex=regex)
            for regex, start in zip(groups, iters)]


class StageBinarizationHook(HookBase):
    """Switches stage groups of quantized layers on at given iterations (see module doc)."""

    def __init__(self, groups: Sequence[str], iters: Sequence[int]):
        if len(groups) != len(iters):
            raise ValueError(f"{len(groups)} groups but {len(iters)} iterations")
        self.groups = list(groups)
        self.iters = [int(i) for i in iters]

    def _apply(self, iteration: int) -> None:
        names = apply_stage_state(self.trainer.model, self.groups, self.iters, iteration)
        active = [i for i, s in enumerate(self.iters) if iteration >= s]
        logger.info("Stage binarization at iteration %d: groups %s quantized (%d layers), "
                    "%d group(s) still float", iteration, active,
                    sum(len(names[i]) for i in active), len(self.groups) - len(active))

    def before_train(self) -> None:
        self._apply(self.trainer.iter)

    def before_step(self) -> None:
        it = self.trainer.iter
        if it in self.iters and it != self.trainer.start_iter:
            self._apply(it)


def build_aqd_hooks(cfg, trainer) -> List[HookBase]:
    """aqd_d2's training hooks for ``cfg`` (inserted before detectron2's default hooks).

    Stage-wise binarization and filter pruning are not among them: the detector carries
    those schedules (:mod:`aqd_d2.modeling.training_features`). What remains is the state of
    a training loop that has its own optimizers (the GAN loop's, :mod:`aqd_d2.engine.gan_loop`).
    """
    return build_loop_state_hooks(cfg)
