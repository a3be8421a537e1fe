"""Batch norms stored as their eval-mode affine map (packed checkpoint version 3).

In eval mode a batch norm is a per-channel affine map ``y = x * a + b`` with
``a = gamma / sqrt(var + eps)`` and ``b = beta - mean * a``: four stored vectors (plus an
int64 ``num_batches_tracked``) describe two. Version 3 of the packed checkpoint stores
``(a, b)`` (``num_batches_tracked`` is kept as is) and, on loading, writes ``weight = a``, ``bias = b``, ``running_mean = 0`` and
``running_var = v1`` where ``v1`` is the float32 value with ``v1 + eps == 1`` (so the norm's
own ``1 / sqrt(var + eps)`` is exactly 1). The loaded norm then computes ``x * a + b`` with
the same ``a`` and ``b`` the original norm computed internally.

Exactness is not assumed, it is checked per norm when saving: ``a`` and ``b`` are read off
the norm's own forward (``b = norm(0)``; ``a = norm'(1)`` for a copy with ``beta = mean = 0``,
whose ``a`` is the same), then a copy with the reparameterised state must give bit-identical
outputs on random inputs in NCHW and channels_last layout. A norm that fails (another
formula inside torch, non-finite values) is stored unchanged.

The reparameterised state is only right for **inference**: training the loaded model in
train mode would normalise with batch statistics and then apply ``(a, b)`` as if they were
``(gamma, beta)``. Fine-tune from the ordinary (fake-quantized) checkpoint instead.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ["is_affine_norm", "eval_affine", "identity_var", "reparam_state", "affine_norms", "check_identity_var"]


def is_affine_norm(m: nn.Module) -> bool:
    """True for a 1-d / 2-d batch norm with affine parameters and running statistics:
    ``nn.BatchNorm1d/2d`` and subclasses (detectron2's NaiveSyncBatchNorm), ``SyncBatchNorm``
    and detectron2's ``FrozenBatchNorm2d``."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if isinstance(m, nn.BatchNorm3d) or not (m.affine and m.track_running_stats):
            return False
    elif type(m).__name__ != "FrozenBatchNorm2d":
        return False
    return all(isinstance(getattr(m, k, None), torch.Tensor) and getattr(m, k).dtype == torch.float32
               for k in ("weight", "bias", "running_mean", "running_var"))


def _probe_shapes(m: nn.Module, c: int) -> Tuple[Tuple[int, ...], ...]:
    if isinstance(m, nn.BatchNorm1d):
        return (2, c), (2, c, 5)
    return (2, c, 3, 5), (2, c, 3, 5)  # the second one is also tried channels_last


def _rows(y: torch.Tensor) -> torch.Tensor:
    """First sample, first position of each channel: ``[C]``."""
    return y[0].reshape(y.shape[1], -1)[:, 0]


@torch.no_grad()
def eval_affine(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` (float32 ``[C]``) of the eval-mode norm, read off its own forward.

    Args:
        norm: a module for which :func:`is_affine_norm` holds.
    Returns:
        ``a``, ``b`` with ``norm(x) == x * a + b`` per channel (as the norm computes it).
    """
    c = norm.weight.numel()
    shape = _probe_shapes(norm, c)[0]
    probe = copy.deepcopy(norm).eval()
    b = _rows(probe(torch.zeros(shape))).clone()
    probe.bias.zero_()
    probe.running_mean.zero_()  # a depends on gamma, var and eps only
    a = _rows(probe(torch.ones(shape))).clone()
    return a, b


def identity_var(eps: float) -> torch.Tensor:
    """The float32 ``v1`` with ``v1 + eps == 1`` in float32 (0-d tensor)."""
    e = torch.tensor(eps, dtype=torch.float32)
    return torch.tensor(1.0) - e


def reparam_state(norm: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The norm's buffers / parameters (local names) that make it compute ``x * a + b``.

    Args:
        norm: the norm to fill (read for ``eps``, shapes and ``num_batches_tracked``).
        a, b: ``[C]`` float32.
    Returns:
        ``{"weight", "bias", "running_mean", "running_var"}`` (``num_batches_tracked``, where
        the norm has it, is not part of the map and stays as saved).
    """
    return {"weight": a.clone(), "bias": b.clone(), "running_mean": torch.zeros_like(a),
            "running_var": identity_var(float(norm.eps)).expand_as(a).clone()}


@torch.no_grad()
def _same_outputs(norm: nn.Module, state: Dict[str, torch.Tensor], seed: int) -> bool:
    ref = copy.deepcopy(norm).eval()
    new = copy.deepcopy(norm).eval()
    for k, v in state.items():
        getattr(new, k).copy_(v)
    g = torch.Generator().manual_seed(seed)
    for i, shape in enumerate(_probe_shapes(norm, norm.weight.numel())):
        x = torch.randn(shape, generator=g) * 8
        if i == 1 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not torch.equal(ref(x), new(x)):
            return False
    return True


def affine_norms(model: nn.Module) -> Iterator[Tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """``(name, norm, a, b)`` for every norm of ``model`` whose reparameterised state is
    verified to compute bit-identical outputs (module docstring)."""
    for i, (name, m) in enumerate(model.named_modules()):
        if not is_affine_norm(m):
            continue
        a, b = eval_affine(m)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            continue
        if _same_outputs(m, reparam_state(m, a, b), seed=i):
            yield name, m, a, b


def check_identity_var(norm: nn.Module) -> Optional[str]:
    """None when ``norm`` with ``running_var = identity_var(eps)`` scales by exactly 1 in this
    torch build; else a description of the difference (used when loading)."""
    probe = copy.deepcopy(norm).eval()
    with torch.no_grad():
        probe.weight.fill_(1.0)
        probe.bias.zero_()
        probe.running_mean.zero_()
        probe.running_var.copy_(identity_var(float(norm.eps)).expand_as(probe.running_var))
        y = _rows(probe(torch.ones(_probe_shapes(norm, norm.weight.numel())[0])))
    if torch.equal(y, torch.ones_like(y)):
        return None
    return f"a unit-variance norm scales by {float(y[0])!r}, not 1"
