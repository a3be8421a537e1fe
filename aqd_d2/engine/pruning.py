"""Filter pruning as training hooks: soft filter pruning (SFP) and PFEC (appendix 001 B.2).

BiDet applies its IB / SOP techniques to detectors pruned by two structured methods
(paper 000 Table 4, appendix 001 Tables 1-2):

* **SFP** (He et al. 2018, "Soft Filter Pruning", Alg. 1): at the end of every epoch, in each
  selected conv layer i, rank the filters by their Lp norm (eq. 2, ``||F_j||_p`` over the
  filter's ``C x k x k`` weights; p = 2 in the paper's experiments) and set the
  ``floor(N_i * P_i)`` filters with the smallest norm to zero. The zeroed filters stay in the
  model and keep being updated, so they can regrow before the next pruning step. Pruning also
  happens before training starts and after the last step (the model then has exactly the
  pruned filters at zero, from which a compact model is obtained).
* **PFEC** (Li et al. 2017, "Pruning Filters for Efficient ConvNets", sec. 3.1): rank the
  filters of each selected layer by ``s_j = sum |K_j|`` (L1 norm of the filter), prune the
  ``floor(N_i * P_i)`` smallest once, then fine-tune. The paper removes the filters (and the
  matching input channels of the next layer). Here they are **masked permanently**: their
  weights (and bias, and the affine of the attached norm layer with ``PRUNE_NORM``) are zero
  at every forward, so the pruned channels output exactly 0, as a removed channel would; the
  tensors keep their shapes, so the analysis tools still count the unpruned parameters and
  MACs (see the note in the report).

State: the masks (per layer, bool over output filters, True = kept) and the last pruning
iteration are the hook's ``state_dict`` which detectron2's ``DefaultTrainer`` checkpoints with
the trainer (``trainer.state_dict()["hooks"]["FilterPruningHook"]``) and restores on
``resume_or_load(resume=True)``.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.engine import HookBase
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["FilterPruningHook", "filter_norms", "num_pruned_filters", "lowest_norm_mask",
           "select_prunable_layers", "coupled_masks", "apply_filter_masks", "build_pruning_hook"]

logger = logging.getLogger(__name__)


def filter_norms(weight: torch.Tensor, p: int) -> torch.Tensor:
    """Norm of every output filter of a conv weight.

    SFP eq. 2: ``||F_j||_p = (sum |F_j|^p)^(1/p)`` (p = 2); PFEC sec. 3.1: ``s_j = sum |K_j|``
    (p = 1).

    Args:
        weight: (N, C, kh, kw) conv weight (any shape with the filters on dim 0).
        p: 1 or 2.
    Returns:
        (N,) float tensor of filter norms.
    """
    if p not in (1, 2):
        raise ValueError(f"filter norm p = {p!r}: use 1 (PFEC) or 2 (SFP)")
    return weight.detach().flatten(1).float().norm(p=p, dim=1)


def num_pruned_filters(num_filters: int, rate: float, rate_means: str = "pruned") -> int:
    """How many of ``num_filters`` filters are pruned.

    Args:
        num_filters: N_i, the layer's output filters.
        rate: the pruning rate P_i (``rate_means == "pruned"``: ``floor(N_i * P_i)`` are pruned,
            the papers' wording), or the kept fraction of the SFP code (``"kept"``:
            ``int(N_i * (1 - rate))`` are pruned, as its ``--rate``).
        rate_means: "pruned" or "kept".
    Returns:
        the number of filters to zero (always leaves at least one filter).
    """
    if rate_means == "pruned":
        n = int(math.floor(num_filters * rate + 1e-9))
    elif rate_means == "kept":
        n = int(num_filters * (1.0 - rate))
    else:
        raise ValueError(f"rate_means = {rate_means!r}: use 'pruned' or 'kept'")
    return max(0, min(n, num_filters - 1))


def lowest_norm_mask(weight: torch.Tensor, n_pruned: int, p: int) -> torch.Tensor:
    """Mask keeping all but the ``n_pruned`` filters of smallest Lp norm.

    Args:
        weight: (N, C, kh, kw) conv weight.
        n_pruned: number of filters to prune (ties broken by lower index first).
        p: the norm (1 or 2), see :func:`filter_norms`.
    Returns:
        (N,) bool tensor, True for kept filters.
    """
    norms = filter_norms(weight, p)
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    if n_pruned > 0:
        order = torch.argsort(norms.cpu(), stable=True)
        keep[order[:n_pruned]] = False
    return keep


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def select_prunable_layers(model: nn.Module, layers: Sequence[str],
                           exclude: Sequence[str] = ()) -> List[Tuple[str, nn.Conv2d]]:
    """The conv layers whose names match a ``layers`` regex and no ``exclude`` regex.

    Args:
        model: the detector (DDP-wrapped or not).
        layers, exclude: regexes (``re.search``) over ``named_modules`` names.
    Returns:
        ``(name, conv)`` pairs in module order.
    Raises:
        ValueError: when nothing matches (naming the AQD.PRUNING.LAYERS key).
    """
    inc = [re.compile(r) for r in layers]
    exc = [re.compile(r) for r in exclude]
    out = [(n, m) for n, m in _unwrap(model).named_modules()
           if isinstance(m, nn.Conv2d) and any(r.search(n) for r in inc)
           and not any(r.search(n) for r in exc)]
    if not out:
        raise ValueError(f"AQD.PRUNING.LAYERS = {list(layers)} (EXCLUDE = {list(exclude)}) "
                         "matches no nn.Conv2d of the model")
    return out


def coupled_masks(model: nn.Module, masks: Dict[str, torch.Tensor],
                  rules: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Masks that ranked layers pass to the convs coupled to them.

    Args:
        model: the detector (DDP-wrapped or not).
        masks: ranked layer name -> (N,) bool mask.
        rules: "regex=>replacement" (``re.sub`` on the ranked layer's name gives the coupled
            conv's name; AQD.PRUNING.COUPLED).
    Returns:
        coupled conv name -> the same mask.
    Raises:
        ValueError: the coupled conv does not exist or has another number of filters.
    """
    modules = dict(_unwrap(model).named_modules())
    out: Dict[str, torch.Tensor] = {}
    for rule in rules:
        pattern, repl = rule.split("=>")
        for name, keep in masks.items():
            if not re.search(pattern, name):
                continue
            target = re.sub(pattern, repl, name)
            conv = modules.get(target)
            if not isinstance(conv, nn.Conv2d) or conv.out_channels != keep.numel():
                raise ValueError(f"AQD.PRUNING.COUPLED rule {rule!r} maps {name!r} to {target!r}, "
                                 f"which is not a conv with {keep.numel()} filters")
            out[target] = keep
    return out


@torch.no_grad()
def apply_filter_masks(model: nn.Module, masks: Dict[str, torch.Tensor],
                       prune_norm: bool = True) -> None:
    """Zero the pruned filters (mask False) of each named conv, in place.

    Zeroes the filter's weights and bias; with ``prune_norm`` also the scale and shift of the
    conv's attached norm (detectron2 ``Conv2d.norm``), so the channel outputs exactly 0.

    Args:
        model: the detector (DDP-wrapped or not).
        masks: conv name -> (N,) bool mask, True = kept.
        prune_norm: also zero the norm layer's weight and bias of pruned channels.
    """
    modules = dict(_unwrap(model).named_modules())
    for name, keep in masks.items():
        conv = modules.get(name)
        if conv is None:
            raise KeyError(f"pruning mask for {name!r}, which is not a module of the model")
        drop = (~keep).to(conv.weight.device)
        conv.weight[drop] = 0
        if conv.bias is not None:
            conv.bias[drop] = 0
        norm = getattr(conv, "norm", None)
        if prune_norm and norm is not None:
            for attr in ("weight", "bias"):
                t = getattr(norm, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == drop.numel():
                    t[drop] = 0


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
