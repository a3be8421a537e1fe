"""Multi-level batch normalization for detection heads shared across pyramid levels.

AQD (Chen et al., "AQD: Towards Accurate Quantized Object Detection", CVPR 2021, sec. 3.2):
the head convs of a one-stage detector are shared by all pyramid levels, but the batch
statistics of the levels differ (their Fig. 1), and quantization widens the gap; one shared
BN then normalizes every level with wrong statistics. *Multi-level BN* keeps one BN per level,
each with its own running statistics and its own affine parameters (AQD's code calls each
level's BN in turn; AdelaiDet's ``ModuleListDial``). detectron2's
:class:`~detectron2.layers.CycleBatchNormList` is the variant with per-level statistics and a
*shared* affine (Wu & Johnson, "Rethinking batch in BatchNorm", sec. 5.2). Both are
:class:`MultiLevelBatchNorm` here (``shared_affine``), with a synchronized form (``sync``)
built from detectron2's :class:`~detectron2.layers.NaiveSyncBatchNorm` per level, which
all-reduces statistics over any backend (gloo on CPU too, unlike ``torch.nn.SyncBatchNorm``).

Which level a call belongs to is the invariant everything depends on. The head passes it
explicitly (``bn(x, level=l)``, see :func:`forward_at_level`) so the order cannot drift, and
:func:`level_pass` checks that each level was called exactly once per head forward. Called
without ``level`` the module cycles through the levels as CycleBatchNormList does.

State-dict layout (checkpoint-friendly, identical to CycleBatchNormList's): per-level BN
``<name>.<level>.{weight,bias,running_mean,running_var,num_batches_tracked}``; with
``shared_affine`` the affine is ``<name>.{weight,bias}`` and the levels hold statistics only.
Loading converts between layouts: a plain (shared) BN checkpoint is copied to every level,
a shared affine to per-level affines and vice versa (see :meth:`_load_from_state_dict`);
:func:`merge_levels_into_shared_bn` does the reverse for a plain BN.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

__all__ = [
    "MultiLevelBatchNorm",
    "level_pass",
    "forward_at_level",
    "multi_level_norms",
    "merge_levels_into_shared_bn",
]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
_AFFINE = ("weight", "bias")


def _level_bn(num_features: int, affine: bool, sync: bool, eps: float, momentum: float) -> nn.Module:
    """One level's BN. ``sync`` without affine: NaiveSyncBatchNorm needs weight/bias tensors in
    its distributed path, so it gets constant ones/zeros as *non-persistent* buffers (not
    trained, not in the state_dict: the layout stays that of ``affine=False``)."""
    if not sync:
        return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
    bn = NaiveSyncBatchNorm(num_features, eps=eps, momentum=momentum, affine=True)
    if not affine:
        del bn.weight, bn.bias
        bn.register_buffer("weight", torch.ones(num_features), persistent=False)
        bn.register_buffer("bias", torch.zeros(num_features), persistent=False)
    return bn


class MultiLevelBatchNorm(nn.ModuleList):
    """``num_levels`` batch norms, one per pyramid level, for a conv shared across levels.

    Args:
        num_features: channels C.
        num_levels: pyramid levels L the shared conv is applied to (e.g. 5 for P3-P7).
        shared_affine: False (AQD multi-level BN): each level has its own ``weight``/``bias``.
            True (detectron2's CycleBatchNormList form): per-level statistics, one affine.
        sync: use detectron2's ``NaiveSyncBatchNorm`` per level (statistics averaged over
            all processes in training; identical to BN in a single process).
        eps, momentum: as for ``nn.BatchNorm2d``.

    Forward: ``x`` (N, C, H, W) and the level index -> (N, C, H, W), normalized by that level's
    BN (its batch statistics in training, its running statistics in eval).
    """

    def __init__(
        self,
        num_features: int,
        num_levels: int,
        *,
        shared_affine: bool = False,
        sync: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ):
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        super().__init__(
            [_level_bn(num_features, not shared_affine, sync, eps, momentum) for _ in range(num_levels)]
        )
        self.num_features = num_features
        self.shared_affine = shared_affine
        self.sync = sync
        if shared_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        # Transient call bookkeeping (plain Python, deliberately not buffers: it is not model
        # state, must not be checkpointed or broadcast by DDP). ``_cursor`` serves calls
        # without a level (cycling, as CycleBatchNormList); ``_calls`` counts calls per level
        # while a :func:`level_pass` is open, None otherwise.
        self._cursor = 0
        self._calls: Optional[List[int]] = None

    @property
    def num_levels(self) -> int:
        return len(self)

    # ---- the level invariant -----------------------------------------------------------------
    def begin_pass(self) -> None:
        """Start counting calls per level (one head forward)."""
        self._calls = [0] * len(self)

    def end_pass(self) -> None:
        """Stop counting; raise RuntimeError unless every level was called exactly once."""
        calls, self._calls = self._calls, None
        if calls is not None and any(c != 1 for c in calls):
            raise RuntimeError(
                f"MultiLevelBatchNorm: calls per level in one forward were {calls}; each of the "
                f"{len(self)} levels must be called exactly once (the head must apply its shared "
                "convs to every level and pass the level index)"
            )

    def abort_pass(self) -> None:
        """Stop counting without checking (used when the forward raised)."""
        self._calls = None

    def forward(self, x: torch.Tensor, level: Optional[int] = None) -> torch.Tensor:
        """Args: x: (N, C, H, W); level: 0-based pyramid level, None = next in cycle.
        Returns: (N, C, H, W)."""
        if level is None:
            level = self._cursor
            self._cursor = (self._cursor + 1) % len(self)
        elif not 0 <= level < len(self):
            raise IndexError(f"level {level} out of range for {len(self)} levels")
        if self._calls is not None:
            self._calls[level] += 1
            if self._calls[level] > 1:
                raise RuntimeError(
                    f"MultiLevelBatchNorm: level {level} called twice in one forward "
                    f"(calls so far {self._calls})"
                )
        out = self[level](x)
        if self.shared_affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_levels={len(self)}, "
                f"shared_affine={self.shared_affine}, sync={self.sync}")

    # ---- checkpoint layouts --------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept other BN layouts for this module (rewrites ``state_dict`` in place, before
        the per-level children load):

        * plain shared BN (``<p>running_mean`` ...): statistics copied to every level;
        * affine at ``<p>weight`` but this module has per-level affines: copied per level;
        * per-level affines ``<p><l>.weight`` but this module shares the affine: averaged.
        """
        n = len(self)
        has = lambda k: prefix + k in state_dict  # noqa: E731
        if has("running_mean") and not has("0.running_mean"):
            for name in _STATS:
                if has(name):
                    value = state_dict.pop(prefix + name)
                    for lv in range(n):
                        state_dict[f"{prefix}{lv}.{name}"] = value.clone()
        if not self.shared_affine and has("weight") and not has("0.weight"):
            for name in _AFFINE:
                value = state_dict.pop(prefix + name)
                for lv in range(n):
                    state_dict[f"{prefix}{lv}.{name}"] = value.clone()
        if self.shared_affine and not has("weight") and has("0.weight"):
            for name in _AFFINE:
                values = [state_dict.pop(f"{prefix}{lv}.{name}") for lv in range(n) if has(f"{lv}.{name}")]
                state_dict[prefix + name] = torch.stack(values).mean(0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def merge_levels_into_shared_bn(state_dict: Dict[str, torch.Tensor], prefix: str) -> None:
    """Rewrite a multi-level BN checkpoint entry ``<prefix><l>.*`` into a plain BN ``<prefix>*``.

    Used as a load pre-hook of a shared BN so that a head trained with multi-level BN (AQD's
    float model) initializes the shared-BN ablation (AQD Table 3). The pooled statistics are
    those of the union of the levels with equal weight: ``mean = avg_l(mu_l)``,
    ``var = avg_l(var_l + mu_l^2) - mean^2``; per-level affines are averaged; a shared affine
    (CycleBatchNormList layout, ``<prefix>weight``) is kept. No-op for other layouts.

    Args:
        state_dict: the checkpoint's state dict, modified in place.
        prefix: the BN module's key prefix, ending with ".".
    """
    levels = 0
    while f"{prefix}{levels}.running_mean" in state_dict:
        levels += 1
    if levels == 0 or f"{prefix}running_mean" in state_dict:
        return
    mu = torch.stack([state_dict.pop(f"{prefix}{lv}.running_mean") for lv in range(levels)])
    var = torch.stack([state_dict.pop(f"{prefix}{lv}.running_var") for lv in range(levels)])
    mean = mu.mean(0)
    state_dict[prefix + "running_mean"] = mean
    state_dict[prefix + "running_var"] = (var + mu * mu).mean(0) - mean * mean
    counts = [state_dict.pop(f"{prefix}{lv}.num_batches_tracked", None) for lv in range(levels)]
    counts = [c for c in counts if c is not None]
    if counts:
        state_dict[prefix + "num_batches_tracked"] = torch.stack(counts).max()
    for name in _AFFINE:
        per_level = [state_dict.pop(f"{prefix}{lv}.{name}") for lv in range(levels)
                     if f"{prefix}{lv}.{name}" in state_dict]
        if per_level and prefix + name not in state_dict:
            state_dict[prefix + name] = torch.stack(per_level).mean(0)


def multi_level_norms(module: nn.Module) -> List[MultiLevelBatchNorm]:
    """All :class:`MultiLevelBatchNorm` submodules of ``module`` (looked up on each call, so a
    conversion pass that replaces modules never leaves a stale list)."""
    return [m for m in module.modules() if isinstance(m, MultiLevelBatchNorm)]


@contextmanager
def level_pass(norms: Iterable[MultiLevelBatchNorm]) -> Iterator[None]:
    """Context of one head forward: on normal exit, every norm in ``norms`` must have been
    called exactly once per level (RuntimeError otherwise)."""
    norms = list(norms)
    for n in norms:
        n.begin_pass()
    try:
        yield
    except BaseException:
        for n in norms:
            n.abort_pass()
        raise
    for n in norms:
        n.end_pass()


def forward_at_level(subnet: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Run an ``nn.Sequential`` subnet on level ``level``'s feature.

    Children that are :class:`MultiLevelBatchNorm` get the level index; every other child
    (convs, quantized convs, shared norms, ReLU) is called as usual.

    Args:
        subnet: an ``nn.Sequential`` (e.g. a RetinaNet/FCOS head tower).
        x: (N, C, H, W) feature of pyramid level ``level``.
        level: 0-based level index (P3 = 0 for P3-P7).
    Returns:
        the subnet's output for that level.
    """
    for child in subnet:
        x = child(x, level=level) if isinstance(child, MultiLevelBatchNorm) else child(x)
    return x
