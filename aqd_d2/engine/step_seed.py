"""Per-iteration RNG seeding, so that a resumed run draws the same random numbers.

A run killed at iteration k and resumed from its checkpoint restarts every process' global
RNGs from ``SEED`` (detectron2's ``default_setup``), not from the states they had at k, so
any randomness in the model or loss (R-CNN proposal/ROI sampling, dropout, random
initialisations done lazily) differs from the uninterrupted run. :class:`StepSeedHook`
reseeds Python's, NumPy's and torch's global RNGs (CPU and CUDA) before every iteration from
``(seed, rank, iteration)``; the seed is saved with the trainer state, so runs with
``SEED -1`` resume exactly too. Enabled by ``AQD.EXACT_RESUME`` (with the resumable loader).
"""
from __future__ import annotations

import random
from typing import Dict

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.resumable_loader import position_seed

__all__ = ["StepSeedHook"]


class StepSeedHook(HookBase):
    """Reseeds the global RNGs before each iteration from ``(seed, rank, iteration)``.

    Args:
        seed: shared by all ranks (each rank still gets its own stream).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self) -> None:
        # attempt 2**20: a stream the data loader never uses (its attempts count bad images)
        s = position_seed(self.seed, comm.get_rank(), int(self.trainer.iter), attempt=1 << 20)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also every CUDA device's generator

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.seed = int(state_dict["seed"])
