"""Stage-wise binarization (paper 004, sec. III-B) as a schedule the detector carries.

The model is converted once with every layer of every stage (e.g. the M2 scope of
``configs/Base-YOLOv2.yaml``); the schedule then switches the quantizers of the stage groups
``AQD.STAGE_BINARIZATION.GROUPS`` (name regexes, paper order M0, M1, M2 = reverse depth) on
at ``AQD.STAGE_BINARIZATION.ITERS``: group i is quantized from iteration ``ITERS[i]`` on and
float (quantizers disabled) before. Groups should be disjoint (a later group wins).

The registered ``QuantizedDetector`` builder attaches it, and the detector's forward pre-hook
(:mod:`aqd_d2.modeling.training_features`) applies it before every training forward, with the
iteration of detectron2's event storage: any detectron2 trainer (the stock ``DefaultTrainer``
too) gets the schedule. The state is the quantizers' ``enabled`` buffers, which checkpoints
keep and which are a pure function of the iteration: a resumed run (even from a checkpoint
written by another schedule) continues in the stage its iteration implies, from its first
step. The schedule itself holds only layer names, no tensors and no module references.
"""
from __future__ import annotations

import logging
import re
from typing import List, Sequence, Tuple

from torch import nn

from aqd_d2.config import ConfigError
from aqd_d2.convert import quantized_layers

__all__ = ["StageSchedule", "stage_groups"]

logger = logging.getLogger(__name__)


def stage_groups(model: nn.Module, groups: Sequence[str]) -> List[List[str]]:
    """Per regex of ``groups``, the names of the quantized layers it fully matches.

    Raises:
        ConfigError: a group matches no quantized layer (naming AQD.STAGE_BINARIZATION.GROUPS).
    """
    names = [n for n, _ in quantized_layers(model)]
    out = []
    for i, regex in enumerate(groups):
        hits = [n for n in names if re.fullmatch(regex, n)]
        if not hits:
            raise ConfigError(
                f"AQD.STAGE_BINARIZATION.GROUPS[{i}] = {regex!r} matches no quantized layer "
                f"of the model ({len(names)} quantized layers; is MODEL.QUANT.ENABLED on and "
                "MODEL.QUANT.SCOPE wide enough?)")
        out.append(hits)
    return out


class StageSchedule:
    """Group i's quantizers are enabled iff ``iteration >= iters[i]`` (see module doc).

    Args:
        model: the converted detector (its quantized layer names are resolved now).
        groups: full-match regexes of quantized layer names, one per stage.
        iters: first iteration of each stage.
    Raises:
        ValueError: ``groups`` and ``iters`` differ in length.
        ConfigError: a group matches no quantized layer.
    """

    def __init__(self, model: nn.Module, groups: Sequence[str], iters: Sequence[int]):
        if len(groups) != len(iters):
            raise ValueError(f"{len(groups)} stage-binarization groups but {len(iters)} iterations")
        self.iters = [int(i) for i in iters]
        self.layers = stage_groups(model, groups)
        self.groups: List[Tuple[int, List[str]]] = list(zip(self.iters, self.layers))

    def apply(self, model: nn.Module, iteration: int) -> int:
        """Set every group's quantizers for ``iteration``; logs when anything changed.

        Reads the quantizers' host-side flags (no device access when they are cached) and
        writes only the ones that change.

        Returns:
            the number of quantizers switched.
        """
        switched = 0
        for start, names in self.groups:
            on = iteration >= start
            for name in names:
                for _, q in model.get_submodule(name).quantizers():
                    if q.is_enabled != on:
                        q.set_enabled(on)
                        switched += 1
        if switched:
            active = [i for i, s in enumerate(self.iters) if iteration >= s]
            logger.info("Stage binarization at iteration %d: groups %s quantized (%d layers), "
                        "%d group(s) still float", iteration, active,
                        sum(len(self.layers[i]) for i in active), len(self.groups) - len(active))
        return switched
