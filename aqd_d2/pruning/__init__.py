"""Structured filter pruning (SFP, PFEC) as model operations: ranking and masks
(:mod:`.filters`), the schedule a detector carries and applies itself during training under
any detectron2 trainer (:mod:`.schedule`), and physical channel removal (:mod:`.compact`).
For models that carry no schedule, :class:`aqd_d2.engine.pruning.FilterPruningHook` applies
the same rule from a trainer."""
from .filters import (
    apply_filter_masks,
    coupled_masks,
    filter_norms,
    lowest_norm_mask,
    num_pruned_filters,
    select_prunable_layers,
)

__all__ = ["apply_filter_masks", "coupled_masks", "filter_norms", "lowest_norm_mask",
           "num_pruned_filters", "select_prunable_layers"]
