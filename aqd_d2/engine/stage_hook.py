"""Stage-wise binarization (paper 004, sec. III-B) as a training hook, and the list of aqd_d2
hooks the :class:`~aqd_d2.engine.trainer.Trainer` adds to detectron2's defaults.

The model is converted once with every layer of every stage (e.g. the M2 scope of
``configs/Base-YOLOv2.yaml``); the hook then switches the quantizers of the stage groups
``AQD.STAGE_BINARIZATION.GROUPS`` (name regexes, paper order M0, M1, M2 = reverse depth) on
at ``AQD.STAGE_BINARIZATION.ITERS``: group i is quantized from iteration ``ITERS[i]`` on and
float (quantizers disabled) before. The state is the quantizers' ``enabled`` buffers, which
checkpoints keep; on (re)start ``before_train`` re-applies the state implied by the
iteration the run starts from, so a resumed run continues in the right stage even from a
checkpoint written by another schedule. Groups should be disjoint (a later group wins).
"""
from __future__ import annotations

import logging
from typing import List, Sequence

from detectron2.engine import HookBase
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aqd_d2.convert import set_quantization_enabled

from .gan_loop import build_loop_state_hooks  # noqa: E402

from .pruning import build_pruning_hook  # SFP / PFEC filter pruning (AQD.PRUNING)

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
    if isinstance(model, DistributedDataParallel):
        model = model.module
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
    """aqd_d2's training hooks for ``cfg`` (inserted before detectron2's default hooks)."""
    hooks: List[HookBase] = []
    s = cfg.AQD.STAGE_BINARIZATION
    if len(s.GROUPS):
        hooks.append(StageBinarizationHook(s.GROUPS, s.ITERS))
    hooks += build_loop_state_hooks(cfg)  # the GAN loop's optimizers (aqd_d2.engine.gan_loop)
    hooks += [h for h in [build_pruning_hook(cfg)] if h is not None]
    return hooks
