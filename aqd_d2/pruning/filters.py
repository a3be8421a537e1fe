"""Filter ranking and masking for structured pruning (SFP, PFEC; appendix 001 B.2).

Pure PyTorch model operations used by the training hook :mod:`aqd_d2.engine.pruning` and by
:mod:`aqd_d2.pruning.compact`:

* :func:`filter_norms`: SFP's filter-selection Lp norm (``||F_j||_p``, p = 2) and PFEC's
  filter ranking (``s_j = sum |K_j|``);
* :func:`num_pruned_filters`: ``floor(N_i * P_i)`` (or the SFP code's kept-fraction reading);
* :func:`lowest_norm_mask`, :func:`select_prunable_layers`, :func:`coupled_masks`,
  :func:`apply_filter_masks` (zero filters, bias and the attached norm's affine).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from aqd_d2.utils import unwrap_model

__all__ = ["filter_norms", "num_pruned_filters", "lowest_norm_mask", "select_prunable_layers",
           "coupled_masks", "apply_filter_masks"]


def filter_norms(weight: torch.Tensor, p: int) -> torch.Tensor:
    """Norm of every output filter of a conv weight.

    SFP (filter selection): ``||F_j||_p = (sum |F_j|^p)^(1/p)`` (p = 2); PFEC: ``s_j = sum |K_j|``
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
    out = [(n, m) for n, m in unwrap_model(model).named_modules()
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
    modules = dict(unwrap_model(model).named_modules())
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
    Elementwise (``masked_fill_``): no device->host synchronisation, so it can run every
    training step on a GPU.

    Args:
        model: the detector (DDP-wrapped or not).
        masks: conv name -> (N,) bool mask, True = kept.
        prune_norm: also zero the norm layer's weight and bias of pruned channels.
    Raises:
        KeyError: a mask names no module of the model.
    """
    model = unwrap_model(model)
    for name, keep in masks.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"pruning mask for {name!r}, which is not a module of the model") from None
        drop = ~keep.to(device=conv.weight.device, dtype=torch.bool)
        conv.weight.masked_fill_(drop.view(-1, *([1] * (conv.weight.dim() - 1))), 0)
        if conv.bias is not None:
            conv.bias.masked_fill_(drop, 0)
        norm = getattr(conv, "norm", None)
        if prune_norm and norm is not None:
            for attr in ("weight", "bias"):
                t = getattr(norm, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == drop.numel():
                    t.masked_fill_(drop, 0)
