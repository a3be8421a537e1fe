"""Structured filter pruning (SFP, PFEC) as model operations: ranking and masks
(:mod:`.filters`) and physical channel removal (:mod:`.compact`). The training hook that
applies them during training is :class:`aqd_d2.engine.pruning.FilterPruningHook`."""
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
