"""When filters are pruned (SFP, PFEC), and the schedule a detector carries in its own state.

:class:`PruningRule` is what ``AQD.PRUNING`` says: which convs, how many filters, by which
norm, at which iterations. Two things apply it:

* :class:`FilterPruningSchedule`, the submodule ``filter_pruning`` that the registered
  ``QuantizedDetector`` builder attaches to a detector whose config sets
  ``AQD.PRUNING.METHOD``. The detector's forward pre-hook
  (:mod:`aqd_d2.modeling.training_features`) drives it by the iteration of detectron2's event
  storage, so *any* detectron2 trainer (the stock ``DefaultTrainer`` included) prunes as the
  config says. Its state (one bool mask per pruned conv, the iteration of the last pruning
  step and of the last training forward) is buffers: checkpointed with the model, moved with
  it, and the same on every DDP rank.
* :class:`aqd_d2.engine.pruning.FilterPruningHook`, a trainer hook for models that do not
  carry the schedule (any ``nn.Module`` trained by a detectron2 ``SimpleTrainer``).

Timing (both): with ``k`` completed iterations, a pruning step is *due* when ``k >= START_ITER``
and, for SFP, ``(k - START_ITER) % INTERVAL == 0`` or ``k == SOLVER.MAX_ITER`` (the final
step: the model then has exactly the pruned filters at zero), and for PFEC when it never
pruned. A due step runs once. PFEC's masks are permanent: the masked weights (and bias, and
the attached norm's affine with ``PRUNE_NORM``) are zero again before every forward and
before every ``state_dict()``.

The model-carried schedule prunes before the training forward of iteration ``k`` (the storage's
iteration = completed iterations); a forward in eval mode and ``state_dict()`` first catch up
with the step after the last training forward (``k = last training iteration + 1``). Hence
what a checkpoint, an evaluation or the next step sees is exactly what a hook pruning right
after the optimizer step (detectron2's ``after_step``) would give: the same masks at the same
iterations, the same weights, bit for bit.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .filters import (
    apply_filter_masks,
    coupled_masks,
    lowest_norm_mask,
    num_pruned_filters,
    select_prunable_layers,
)

__all__ = ["PruningRule", "FilterPruningSchedule", "pruning_rule_from_config",
           "PRUNING_ATTR", "mask_buffer_name"]

logger = logging.getLogger(__name__)

#: attribute (submodule) name of the schedule on a detector; state_dict keys start with it
PRUNING_ATTR = "filter_pruning"


class PruningRule:
    """Which filters are pruned, and when (see module docstring).

    Args:
        method: "sfp" (soft: re-ranked every ``interval`` iterations, pruned filters keep
            training) or "pfec" (pruned once at ``start_iter``, then masked permanently).
        rate: pruning rate (see :func:`num_pruned_filters`).
        layers, exclude: regexes selecting the conv layers (module names).
        p: filter norm, 1 or 2.
        interval: SFP iterations between pruning steps; 0 = one epoch, which the user of the
            rule resolves and passes to :meth:`is_pruning_iter` (while unknown, only the first
            and the final steps are due).
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
        if interval < 0:
            raise ValueError(f"pruning interval must be >= 0 (0 = one epoch), got {interval}")
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

    def is_pruning_iter(self, completed: int, max_iter: Optional[int] = None,
                        last_prune_iter: int = -1, interval: Optional[int] = None) -> bool:
        """Whether a pruning step is due once ``completed`` iterations are done.

        Args:
            completed: completed training iterations.
            max_iter: the run's last iteration count (SFP prunes after the last step).
            last_prune_iter: completed iterations at the last pruning step (-1: never).
            interval: the SFP interval to use (default: ``self.interval``); 0 or None with
                an unresolved epoch: only the steps at ``start_iter`` and ``max_iter``.
        """
        if completed < self.start_iter:
            return False
        if self.method == "pfec":
            return last_prune_iter < 0
        if completed <= last_prune_iter:
            return False
        step = self.interval if interval is None else int(interval)
        if completed == max_iter or completed == self.start_iter:
            return True
        return step > 0 and (completed - self.start_iter) % step == 0

    def compute_masks(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Rank the selected layers' filters now: conv name -> (N,) bool, True = kept
        (ranked layers, then the convs coupled to them, which get the same mask)."""
        masks = {}
        for name, conv in select_prunable_layers(model, self.layers, self.exclude):
            n = num_pruned_filters(conv.out_channels, self.rate, self.rate_means)
            masks[name] = lowest_norm_mask(conv.weight, n, self.p)
        masks.update(coupled_masks(model, masks, self.coupled))
        return masks

    def layer_names(self, model: nn.Module) -> List[Tuple[str, int]]:
        """``(conv name, output filters)`` of every conv the rule masks (ranked + coupled).

        Raises:
            ValueError: LAYERS matches no conv, or a COUPLED rule names no suitable conv.
        """
        ranked = {n: torch.ones(c.out_channels, dtype=torch.bool)
                  for n, c in select_prunable_layers(model, self.layers, self.exclude)}
        names = dict(ranked)
        names.update(coupled_masks(model, ranked, self.coupled))
        return [(n, int(m.numel())) for n, m in names.items()]

    def log(self, masks: Dict[str, torch.Tensor], iteration: int) -> None:
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m.cpu()).sum()) for m in masks.values())
        logger.info("%s pruning at iteration %d: %d of %d filters zeroed in %d layers",
                    self.method.upper(), iteration, pruned, total, len(masks))


def pruning_rule_from_config(cfg) -> Optional[PruningRule]:
    """The rule of ``cfg.AQD.PRUNING`` (None when ``METHOD == "none"``). ``interval`` is
    ``INTERVAL``, or 0 for SFP with ``INTERVAL 0`` (one epoch, resolved by the caller)."""
    c = cfg.AQD.PRUNING
    if c.METHOD == "none":
        return None
    norm = c.NORM if c.NORM != "auto" else ("l2" if c.METHOD == "sfp" else "l1")
    return PruningRule(c.METHOD, c.RATE, c.LAYERS, c.EXCLUDE, p=int(norm[1]),
                       interval=int(c.INTERVAL) if c.METHOD == "sfp" else 1,
                       start_iter=c.START_ITER, prune_norm=c.PRUNE_NORM,
                       rate_means=c.RATE_MEANS, coupled=c.COUPLED)


def epoch_iters(dataset_names: Sequence[str], ims_per_batch: int) -> int:
    """Iterations of one epoch: ``ceil(#images of the datasets / ims_per_batch)``."""
    from detectron2.data import DatasetCatalog

    n = sum(len(DatasetCatalog.get(name)) for name in dataset_names)
    return max(1, math.ceil(n / int(ims_per_batch)))


def mask_buffer_name(conv_name: str) -> str:
    """The buffer of ``conv_name``'s mask (module paths use "/" in place of ".")."""
    return conv_name.replace(".", "/")


class FilterPruningSchedule(nn.Module):
    """The pruning state and schedule a detector carries (see module docstring).

    Args:
        rule: what to prune and when (its ``interval`` 0 = one epoch of ``dataset_names``).
        model: the detector, to resolve the pruned convs now (errors surface at build time).
        max_iter: ``SOLVER.MAX_ITER`` (SFP's final step), None = no final step.
        dataset_names, ims_per_batch: ``DATASETS.TRAIN`` and ``SOLVER.IMS_PER_BATCH``: with
            interval 0 (one epoch), the epoch length is read from the datasets at the first
            training forward on a batch read from a dataset (not at build time: a model built
            for inference needs no training data). Training on batches built in memory has no
            epochs: SFP then prunes only at ``START_ITER`` and after ``MAX_ITER`` (set
            ``AQD.PRUNING.INTERVAL`` to prune periodically), and says so once in the log.

    Buffers:
        ``<conv/name>`` (one per pruned conv; "/" for "."): (N,) bool, True = kept.
        last_prune_iter: completed iterations at the last pruning step (-1: never).
        last_train_iter: the storage iteration of the last training forward (-1: none).
    """

    def __init__(self, rule: PruningRule, model: nn.Module, max_iter: Optional[int] = None,
                 dataset_names: Sequence[str] = (), ims_per_batch: int = 1):
        super().__init__()
        self.rule = rule
        self.max_iter = None if max_iter is None else int(max_iter)
        self.dataset_names = tuple(dataset_names)
        self.ims_per_batch = int(ims_per_batch)
        self.conv_names: List[str] = []
        for name, n in rule.layer_names(model):
            self.register_buffer(mask_buffer_name(name), torch.ones(n, dtype=torch.bool))
            self.conv_names.append(name)
        self.register_buffer("last_prune_iter", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("last_train_iter", torch.tensor(-1, dtype=torch.int64))
        # Host copies of the two counters (a CUDA scalar read is a device->host sync):
        # name -> (tensor, its _version, value), valid while neither changed (in-place writes,
        # load_state_dict and .to() are seen; a write through ``.data`` is not, so these
        # buffers are never written that way, e.g. not broadcast by aqd_d2's Trainer.test);
        # and the epoch length (a constant of the config and dataset) once resolved. Caches,
        # not state.
        self._host: Dict[str, Tuple[torch.Tensor, int, int]] = {}
        self._epoch: List[int] = []
        self._warned: List[bool] = []  # the one-time "no epoch known" warning was given

    # ---- state ---------------------------------------------------------------------------
    def _get(self, name: str) -> int:
        t = self._buffers[name]
        cached = self._host.get(name)
        try:
            if cached is not None and cached[0] is t and cached[1] == t._version:
                return cached[2]
            value = int(t)
            self._host[name] = (t, t._version, value)
        except RuntimeError:  # inference tensors have no version counter
            value = int(t)
        return value

    def _set(self, name: str, value: int) -> None:
        t = self._buffers[name]
        t.fill_(int(value))
        try:
            self._host[name] = (t, t._version, int(value))
        except RuntimeError:
            self._host.pop(name, None)

    def masks(self) -> Dict[str, torch.Tensor]:
        """conv name -> its (N,) bool mask buffer (True = kept)."""
        return {n: self._buffers[mask_buffer_name(n)] for n in self.conv_names}

    @property
    def last_prune(self) -> int:
        """Completed iterations at the last pruning step (-1: never pruned)."""
        return self._get("last_prune_iter")

    def interval(self, resolve: bool = False) -> int:
        """The SFP interval: the rule's, or the epoch length when the rule says 0 (read from
        the datasets when ``resolve``; 0 while unknown)."""
        if self.rule.method != "sfp" or self.rule.interval > 0:
            return self.rule.interval
        if not self._epoch and resolve:
            self._epoch.append(epoch_iters(self.dataset_names, self.ims_per_batch))
        return self._epoch[0] if self._epoch else 0

    def shrink_mask(self, conv_name: str, keep: torch.Tensor) -> None:
        """After ``conv_name`` lost its pruned filters (:mod:`aqd_d2.pruning.compact`): its
        mask keeps only the entries of the remaining filters."""
        key = mask_buffer_name(conv_name)
        self._buffers[key] = self._buffers[key][keep.to(self._buffers[key].device)].clone()

    # ---- pruning -------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model: nn.Module, completed: int) -> Dict[str, torch.Tensor]:
        """Rank now, zero the lowest-norm filters, record masks and ``completed``."""
        masks = self.rule.compute_masks(model)
        for name, keep in masks.items():
            self._buffers[mask_buffer_name(name)].copy_(keep)
        apply_filter_masks(model, self.masks(), self.rule.prune_norm)
        self._set("last_prune_iter", completed)
        self.rule.log(masks, completed)
        return masks

    def _sync(self, model: nn.Module, completed: int, resolve: bool = False) -> None:
        last = self.last_prune
        interval = self.interval(resolve)
        if self.rule.is_pruning_iter(completed, self.max_iter, last, interval=interval):
            self.prune(model, completed)
        elif self.rule.method == "pfec" and last >= 0:
            apply_filter_masks(model, self.masks(), self.rule.prune_norm)  # permanent mask

    def before_training_forward(self, model: nn.Module, iteration: int,
                                from_dataset: bool = True) -> None:
        """Prune if a step is due with ``iteration`` completed iterations (PFEC: re-zero
        the permanent mask), then record ``iteration`` as the last training iteration.
        ``from_dataset``: the batch was read from the training datasets (then the epoch
        length of an ``INTERVAL 0`` rule may be read from them)."""
        self._sync(model, int(iteration), resolve=from_dataset)
        if self.interval() <= 0 and iteration > self.rule.start_iter and not self._warned:
            logger.warning("SFP with AQD.PRUNING.INTERVAL 0 (one epoch) on batches not read from "
                           "a dataset: no epoch is known, so it prunes only at START_ITER and "
                           "after MAX_ITER; set AQD.PRUNING.INTERVAL to prune periodically")
            self._warned.append(True)
        if self._get("last_train_iter") != int(iteration):
            self._set("last_train_iter", int(iteration))

    def catch_up(self, model: nn.Module) -> None:
        """Outside a training forward (eval forward, ``state_dict()``): apply the step due
        after the last training iteration's optimizer step. No-op before any training."""
        last = self._get("last_train_iter")
        if last >= 0:
            self._sync(model, last + 1)

    def extra_repr(self) -> str:
        r = self.rule
        return (f"method={r.method}, rate={r.rate}, p={r.p}, interval={r.interval or 'epoch'}, "
                f"start_iter={r.start_iter}, convs={len(self.conv_names)}")
