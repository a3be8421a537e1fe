"""Hard pruning: physically remove the pruned (masked) filters of a trained model.

PFEC (Li et al. 2017) removes a pruned filter together with its feature map and
the matching input channels of the next conv; SFP's final step (He et al. 2018, Alg. 1) does
the same to obtain the compact model. During training aqd_d2 masks the filters
(:mod:`aqd_d2.engine.pruning`); :func:`remove_pruned_channels` then rebuilds the affected
convs (and their attached norms) with fewer channels, in place, so the parameter and MAC
counts of :func:`aqd_d2.analysis.model_stats.analyze_model` are those of the pruned network.

Which convs read a pruned conv's output is given by *consumer rules* ``"regex=>replacement"``
(``AQD.PRUNING.CONSUMERS``; ``re.sub`` on the pruned conv's name gives the consumer's name):
e.g. ``"conv1$=>conv2"`` in a ResNet basic block, ``"(branch_main)\\.0$=>\\1.1"`` and
``"(branch_main)\\.1$=>\\1.2"`` in a ShuffleNetV2 branch. A depthwise consumer must itself be
masked with the same mask (``AQD.PRUNING.COUPLED``): it loses the same channels. Masked convs
without a consumer rule (e.g. convs feeding a residual sum) keep their shapes, masked.

The compact model computes exactly what the masked model computes when each removed channel
is 0 at the consumer's input, i.e. when the pruned conv's norm affine was zeroed with it
(``AQD.PRUNING.PRUNE_NORM``) and any activation maps 0 to 0 (ReLU), as in the configs.
"""
from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from aqd_d2.convert import replace_module_references

from aqd_d2.utils import unwrap_model

from .schedule import PRUNING_ATTR, FilterPruningSchedule

__all__ = ["remove_pruned_channels", "masks_from_checkpoint", "masks_from_state_dict"]

_COUNTERS = ("last_prune_iter", "last_train_iter")

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def masks_from_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The masks of a detector's pruning schedule in its ``state_dict`` (buffers
    ``filter_pruning.<conv/name>``): conv name -> (N,) bool, True = kept. Empty if none."""
    prefix = PRUNING_ATTR + "."
    return {k[len(prefix):].replace("/", "."): v.bool() for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):] not in _COUNTERS}


def masks_from_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The pruning masks a detectron2 checkpoint holds: the detector's ``filter_pruning``
    buffers, or (checkpoints of a trainer with the hook) ``trainer.hooks.FilterPruningHook``.

    Raises:
        KeyError: naming the file when it holds no pruning state.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    masks = masks_from_state_dict(ckpt.get("model", {})) if isinstance(ckpt, dict) else {}
    if masks:
        return masks
    try:
        return {k: v.bool() for k, v in ckpt["trainer"]["hooks"]["FilterPruningHook"]["masks"].items()}
    except (KeyError, TypeError):
        raise KeyError(f"checkpoint {path!r} holds no pruning masks (was it written by a "
                       "run with AQD.PRUNING.METHOD set?)") from None


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _shrink_norm(norm: nn.Module, keep: torch.Tensor, conv_name: str) -> nn.Module:
    if isinstance(norm, nn.GroupNorm):
        raise ValueError(f"{conv_name}: channels of a GroupNorm cannot be removed")
    new = copy.deepcopy(norm)
    for attr in _NORM_TENSORS:
        t = getattr(norm, attr, None)
        if isinstance(t, torch.Tensor):
            v = t.detach()[keep.to(t.device)].clone()
            if isinstance(t, nn.Parameter):
                setattr(new, attr, nn.Parameter(v, requires_grad=t.requires_grad))
            else:
                new._buffers[attr] = v
    if hasattr(new, "num_features"):
        new.num_features = int(keep.sum())
    return new


def _shrink_conv(conv: nn.Conv2d, name: str, out_keep: Optional[torch.Tensor],
                 in_keep: Optional[torch.Tensor]) -> nn.Conv2d:
    """A copy of ``conv`` with only the kept output filters / input channels (and norm)."""
    if hasattr(conv, "weight_quantizer") or hasattr(conv, "input_quantizer"):
        raise ValueError(f"{name}: channel removal is implemented for float convs only")
    w = conv.weight.detach()
    new = copy.deepcopy(conv)
    if _is_depthwise(conv):
        keep = out_keep if out_keep is not None else in_keep
        if out_keep is None or (in_keep is not None and not torch.equal(in_keep, out_keep)):
            raise ValueError(f"{name} is a depthwise consumer: it must be masked with its "
                             "producer (AQD.PRUNING.COUPLED) and have a consumer rule itself "
                             "(AQD.PRUNING.CONSUMERS), so it loses the same channels")
        w = w[keep.to(w.device)]
        new.groups = new.in_channels = new.out_channels = int(keep.sum())
    else:
        if conv.groups != 1 and in_keep is not None:
            raise ValueError(f"{name}: input channels of a grouped conv cannot be removed")
        if out_keep is not None:
            w = w[out_keep.to(w.device)]
            new.out_channels = int(out_keep.sum())
        if in_keep is not None:
            w = w[:, in_keep.to(w.device)]
            new.in_channels = int(in_keep.sum())
    new.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None and out_keep is not None:
        new.bias = nn.Parameter(conv.bias.detach()[out_keep.to(w.device)].clone(),
                                requires_grad=conv.bias.requires_grad)
    norm = getattr(conv, "norm", None)
    if norm is not None and out_keep is not None:
        new.norm = _shrink_norm(norm, out_keep, name)
    return new


def remove_pruned_channels(model: nn.Module, masks: Dict[str, torch.Tensor],
                           consumers: Sequence[str]) -> List[Tuple[str, int, int]]:
    """Remove the masked filters of every pruned conv that has a consumer rule, in place.

    Args:
        model: the trained (masked) model; DDP-wrapped or not.
        masks: conv name -> (N,) bool, True = kept (``model.filter_pruning.masks()``, the
            hook's ``masks``, or :func:`masks_from_checkpoint`). The model's own pruning
            schedule, if any, keeps masks of the remaining filters.
        consumers: "regex=>replacement" rules (see module docstring).
    Returns:
        ``(conv name, channels before, channels after)`` for every conv whose output
        channels were removed.
    Raises:
        ValueError: a rule names a missing module, a depthwise consumer is not masked with its
            producer, or a layer cannot lose channels (GroupNorm, quantized, grouped).
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    out_keep: Dict[str, torch.Tensor] = {}
    in_keep: Dict[str, torch.Tensor] = {}
    for name, keep in masks.items():
        for rule in consumers:
            pattern, repl = rule.split("=>")
            if not re.search(pattern, name):
                continue
            target = re.sub(pattern, repl, name)
            consumer = modules.get(target)
            if not isinstance(consumer, nn.Conv2d):
                raise ValueError(f"AQD.PRUNING.CONSUMERS rule {rule!r} maps {name!r} to {target!r}, "
                                 "which is not a conv of the model")
            out_keep[name] = keep.bool().cpu()
            in_keep[target] = keep.bool().cpu()
    mapping: Dict[int, nn.Module] = {}
    report = []
    for name in sorted(set(out_keep) | set(in_keep)):
        conv = modules[name]
        new = _shrink_conv(conv, name, out_keep.get(name), in_keep.get(name))
        mapping[id(conv)] = new
        if name in out_keep:
            report.append((name, conv.out_channels, new.out_channels))
    replace_module_references(model, mapping)
    schedule = getattr(model, PRUNING_ATTR, None)
    if isinstance(schedule, FilterPruningSchedule):  # the model's masks follow its convs
        for name, keep in out_keep.items():
            if name in schedule.conv_names:
                schedule.shrink_mask(name, keep)
    return report
