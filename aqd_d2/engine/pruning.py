"""Filter pruning as training hooks: soft filter pruning (SFP) and PFEC (appendix 001 B.2).

BiDet applies its IB / SOP techniques to detectors pruned by two structured methods
(paper 000 Table 4, appendix 001 Tables 1-2):

* **SFP** (He et al. 2018, "Soft Filter Pruning", Alg. 1): at the end of every epoch, in each
  selected conv layer i, rank the filters by their Lp norm (``||F_j||_p`` over the
  filter's ``C x k x k`` weights; p = 2 in the paper's experiments) and set the
  ``floor(N_i * P_i)`` filters with the smallest norm to zero. The zeroed filters stay in the
  model and keep being updated, so they can regrow before the next pruning step. Pruning also
  happens before training starts and after the last step (the model then has exactly the
  pruned filters at zero, from which a compact model is obtained).
* **PFEC** (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): rank the
  filters of each selected layer by ``s_j = sum |K_j|`` (L1 norm of the filter), prune the
  ``floor(N_i * P_i)`` smallest once, then fine-tune. The paper removes the filters (and the
  matching input channels of the next layer). During training they are **masked
  permanently**: their weights (and bias, and the affine of the attached norm layer with
  ``PRUNE_NORM``) are zero at every forward, so the pruned channels output exactly 0, as a
  removed channel would. After training, :func:`aqd_d2.pruning.compact.remove_pruned_channels`
  with ``AQD.PRUNING.CONSUMERS`` removes them physically (hard pruning; same outputs, fewer
  parameters and MACs).

State: the masks (per layer, bool over output filters, True = kept) and the last pruning
iteration are the hook's ``state_dict`` which detectron2's ``DefaultTrainer`` checkpoints with
the trainer (``trainer.state_dict()["hooks"]["FilterPruningHook"]``) and restores on
``resume_or_load(resume=True)``.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence

import torch
from detectron2.engine import HookBase
from torch import nn

from aqd_d2.pruning import (
    apply_filter_masks,
    coupled_masks,
    lowest_norm_mask,
    num_pruned_filters,
    select_prunable_layers,
)

__all__ = ["FilterPruningHook", "build_pruning_hook"]

logger = logging.getLogger(__name__)


class FilterPruningHook(HookBase):
    """SFP or PFEC filter pruning during training (see module docstring).

    Args:
        method: "sfp" (soft: re-ranked every ``interval`` iterations, pruned filters keep
            training) or "pfec" (pruned once at ``start_iter``, then masked permanently).
        rate: pruning rate (see :func:`num_pruned_filters`).
        layers, exclude: regexes selecting the conv layers (module names).
        p: filter norm, 1 or 2.
        interval: SFP iterations between pruning steps (> 0).
        start_iter: first pruning iteration (completed iterations).
        prune_norm: also zero the attached norm's affine of pruned channels.
        rate_means: "pruned" or "kept" (see :func:`num_pruned_filters`).
        coupled: "regex=>replacement" rules: a pruned layer matching regex also masks the conv
            ``re.sub(regex, replacement, name)`` with the same mask (see :func:`coupled_masks`).
    """

    def __init__(self, method: str, rate: float, layers: Sequence[str], exclude: Sequence[str] = (),
                 p: int = 2, interval: int = 1, start_iter: int = 0, prune_norm: bool = True,
                 rate_means: str = "pruned", coupled: Sequence[str] = ()):
        if method not in ("sfp", "pfec"):
            raise ValueError(f"AQD.PRUNING.METHOD = {method!r}: use 'sfp' or 'pfec'")
        if method == "sfp" and interval <= 0:
            raise ValueError(f"SFP pruning interval must be positive, got {interval}")
        self.method = method
        self.rate = float(rate)
        self.rate_means = rate_means
        self.layers = list(layers)
        self.exclude = list(exclude)
        self.p = int(p)
        self.interval = int(interval)
        self.start_iter = int(start_iter)
        self.prune_norm = bool(prune_norm)
        self.coupled = list(coupled)
        self.masks: Dict[str, torch.Tensor] = {}
        self.last_prune_iter = -1  # completed iterations at the last pruning step; -1 = never

    # ---- pruning --------------------------------------------------------------------------
    def prune(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        """Rank the selected layers' filters now, zero the lowest-norm ones, record the masks.

        Args:
            model: the detector.
            iteration: completed training iterations (recorded as ``last_prune_iter``).
        Returns:
            the new masks (conv name -> (N,) bool, True = kept).
        """
        masks = {}
        for name, conv in select_prunable_layers(model, self.layers, self.exclude):
            n = num_pruned_filters(conv.out_channels, self.rate, self.rate_means)
            masks[name] = lowest_norm_mask(conv.weight, n, self.p)
        masks.update(coupled_masks(model, masks, self.coupled))
        apply_filter_masks(model, masks, self.prune_norm)
        self.masks = masks
        self.last_prune_iter = int(iteration)
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        logger.info("%s pruning at iteration %d: %d of %d filters zeroed in %d layers",
                    self.method.upper(), iteration, pruned, total, len(masks))
        return masks

    def is_pruning_iter(self, completed: int, max_iter: Optional[int] = None) -> bool:
        """Whether a pruning step happens once ``completed`` iterations are done."""
        if completed < self.start_iter:
            return False
        if self.method == "pfec":
            return self.last_prune_iter < 0
        return (completed - self.start_iter) % self.interval == 0 or completed == max_iter

    # ---- HookBase -------------------------------------------------------------------------
    def before_train(self) -> None:
        t = self.trainer
        if self.method == "pfec" and self.masks:  # resumed: the PFEC mask is permanent
            apply_filter_masks(t.model, self.masks, self.prune_norm)
        elif t.iter > self.last_prune_iter and self.is_pruning_iter(t.iter, t.max_iter):
            # a fresh run (SFP and PFEC prune before the first step when START_ITER = 0), or a
            # run resumed where a pruning step is due; resumed SFP filters otherwise keep the
            # values (possibly regrown) of the checkpoint
            self.prune(t.model, t.iter)

    def after_step(self) -> None:
        t = self.trainer
        completed = t.iter + 1
        if completed > self.last_prune_iter and self.is_pruning_iter(completed, t.max_iter):
            self.prune(t.model, completed)
        elif self.method == "pfec" and self.masks:
            apply_filter_masks(t.model, self.masks, self.prune_norm)  # the permanent mask

    def state_dict(self) -> dict:
        if self.last_prune_iter < 0:
            return {}
        return {"method": self.method, "last_prune_iter": self.last_prune_iter,
                "masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("method", self.method) != self.method:
            logger.warning("checkpoint pruning state is for %r, this run uses %r: ignored",
                           state_dict.get("method"), self.method)
            return
        self.last_prune_iter = int(state_dict.get("last_prune_iter", -1))
        self.masks = {k: v.clone().bool() for k, v in state_dict.get("masks", {}).items()}


def _epoch_iters(cfg) -> int:
    from detectron2.data import DatasetCatalog

    n = sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)
    return max(1, math.ceil(n / int(cfg.SOLVER.IMS_PER_BATCH)))


def build_pruning_hook(cfg) -> Optional[FilterPruningHook]:
    """The hook for ``cfg.AQD.PRUNING`` (None when ``METHOD == "none"``)."""
    c = cfg.AQD.PRUNING
    if c.METHOD == "none":
        return None
    norm = c.NORM if c.NORM != "auto" else ("l2" if c.METHOD == "sfp" else "l1")
    interval = int(c.INTERVAL) or (_epoch_iters(cfg) if c.METHOD == "sfp" else 1)
    return FilterPruningHook(c.METHOD, c.RATE, c.LAYERS, c.EXCLUDE, p=int(norm[1]),
                             interval=interval, start_iter=c.START_ITER,
                             prune_norm=c.PRUNE_NORM, rate_means=c.RATE_MEANS,
                             coupled=c.COUPLED)
