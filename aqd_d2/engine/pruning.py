"""Filter pruning (SFP, PFEC; appendix 001 B.2) as a trainer hook, for models that do not
carry their own schedule.

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

**aqd_d2's detectors carry the schedule themselves**: the registered ``QuantizedDetector``
builder attaches :class:`aqd_d2.pruning.schedule.FilterPruningSchedule` (masks in model
buffers, driven by the event storage's iteration), so detectron2's stock ``DefaultTrainer``
prunes them as well and aqd_d2's ``Trainer`` registers no pruning hook. The hook here applies
the same :class:`~aqd_d2.pruning.schedule.PruningRule` to any other model trained by a
detectron2 trainer (``SimpleTrainer`` included): it prunes in ``before_train`` and after each
step. Its state (masks, last pruning iteration) is the hook's ``state_dict``, which
detectron2's trainers checkpoint (``trainer.state_dict()["hooks"]["FilterPruningHook"]``).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import torch
from detectron2.engine import HookBase
from torch import nn

from aqd_d2.pruning import apply_filter_masks
from aqd_d2.pruning.schedule import PruningRule, epoch_iters, pruning_rule_from_config

__all__ = ["FilterPruningHook", "build_pruning_hook"]

logger = logging.getLogger(__name__)


class FilterPruningHook(PruningRule, HookBase):
    """SFP or PFEC filter pruning during training, as a hook (see module docstring).

    Args: as :class:`~aqd_d2.pruning.schedule.PruningRule`; ``interval`` must be positive
    for SFP (:func:`build_pruning_hook` resolves ``AQD.PRUNING.INTERVAL 0`` to one epoch).
    """

    def __init__(self, method: str, rate: float, layers: Sequence[str], exclude: Sequence[str] = (),
                 p: int = 2, interval: int = 1, start_iter: int = 0, prune_norm: bool = True,
                 rate_means: str = "pruned", coupled: Sequence[str] = ()):
        if method == "sfp" and interval <= 0:
            raise ValueError(f"SFP pruning interval must be positive, got {interval}")
        PruningRule.__init__(self, method, rate, layers, exclude, p=p, interval=interval,
                             start_iter=start_iter, prune_norm=prune_norm,
                             rate_means=rate_means, coupled=coupled)
        self.masks: Dict[str, torch.Tensor] = {}
        self.last_prune_iter = -1  # completed iterations at the last pruning step; -1 = never

    def prune(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        """Rank the selected layers' filters now, zero the lowest-norm ones, record the masks.

        Args:
            model: the detector.
            iteration: completed training iterations (recorded as ``last_prune_iter``).
        Returns:
            the new masks (conv name -> (N,) bool, True = kept).
        """
        masks = self.compute_masks(model)
        apply_filter_masks(model, masks, self.prune_norm)
        self.masks = masks
        self.last_prune_iter = int(iteration)
        self.log(masks, iteration)
        return masks

    def _due(self, completed: int) -> bool:
        return self.is_pruning_iter(completed, self.trainer.max_iter, self.last_prune_iter)

    # ---- HookBase -------------------------------------------------------------------------
    def before_train(self) -> None:
        t = self.trainer
        if self.method == "pfec" and self.masks:  # resumed: the PFEC mask is permanent
            apply_filter_masks(t.model, self.masks, self.prune_norm)
        elif self._due(t.iter):
            # a fresh run (SFP and PFEC prune before the first step when START_ITER = 0), or a
            # run resumed where a pruning step is due; resumed SFP filters otherwise keep the
            # values (possibly regrown) of the checkpoint
            self.prune(t.model, t.iter)

    def after_step(self) -> None:
        t = self.trainer
        completed = t.iter + 1
        if self._due(completed):
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


def build_pruning_hook(cfg) -> Optional[FilterPruningHook]:
    """The hook for ``cfg.AQD.PRUNING`` (None when ``METHOD == "none"``); SFP's
    ``INTERVAL 0`` is one epoch of ``DATASETS.TRAIN`` at ``SOLVER.IMS_PER_BATCH``."""
    rule = pruning_rule_from_config(cfg)
    if rule is None:
        return None
    interval = rule.interval or epoch_iters(cfg.DATASETS.TRAIN, cfg.SOLVER.IMS_PER_BATCH)
    return FilterPruningHook(rule.method, rule.rate, rule.layers, rule.exclude, p=rule.p,
                             interval=interval, start_iter=rule.start_iter,
                             prune_norm=rule.prune_norm, rate_means=rule.rate_means,
                             coupled=rule.coupled)
