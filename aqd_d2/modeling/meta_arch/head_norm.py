"""Normalization of dense-detector heads whose convs are shared across pyramid levels.

One config string (``MODEL.RETINANET.HEAD_NORM`` / ``MODEL.FCOS.HEAD_NORM``) picks it:

==================== ==========================================================================
value                normalization after each head tower conv (then ReLU, as detectron2 does)
==================== ==========================================================================
``""``               none (detectron2's RetinaNet default)
``"GN"``             GroupNorm, 32 groups (FCOS paper; fewer groups if C is not divisible)
``"BN"``             one BatchNorm2d shared by all levels ("shared BN", AQD Table 3)
``"SyncBN"``         shared detectron2 NaiveSyncBatchNorm ("shared Sync BN", AQD Table 3)
``"MultiLevelBN"``   AQD multi-level BN: per-level statistics and per-level affine (sec. 3.2)
``"SyncMultiLevelBN"`` the same with NaiveSyncBatchNorm per level (AQD's setting, sec. 4.3)
``"CycleBN"``        detectron2's CycleBatchNormList form: per-level statistics, shared affine
``"SyncCycleBN"``    the same, synchronized
==================== ==========================================================================

"SyncBN" here is detectron2's ``NaiveSyncBatchNorm`` (not ``torch.nn.SyncBatchNorm``): it also
synchronizes over gloo on CPU and equals BN in a single process. Note that detectron2's own
``MODEL.RETINANET.NORM = "BN"`` means per-level statistics (CycleBatchNormList); here "BN" is
the truly shared BN and the per-level forms have their own names.
"""
from __future__ import annotations

import math
from typing import Optional

from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

from aqd_d2.layers.multilevel_bn import (
    MultiLevelBatchNorm,
    forward_at_level,
    level_pass,
    merge_levels_into_shared_bn,
    multi_level_norms,
)

__all__ = ["HEAD_NORMS", "HeadNorm", "LevelNormHeadMixin"]

#: allowed values of MODEL.{RETINANET,FCOS}.HEAD_NORM
HEAD_NORMS = ("", "GN", "BN", "SyncBN", "MultiLevelBN", "SyncMultiLevelBN", "CycleBN", "SyncCycleBN")


def _merge_hook(state_dict, prefix, *args) -> None:
    """Load pre-hook of a shared BN: accept a multi-level BN checkpoint (see
    :func:`merge_levels_into_shared_bn`)."""
    merge_levels_into_shared_bn(state_dict, prefix)


class HeadNorm:
    """Callable ``channels -> nn.Module`` for a head norm name; what detectron2's heads accept
    as ``norm`` (``detectron2.layers.get_norm`` calls it).

    Args:
        name: one of :data:`HEAD_NORMS`.
        num_levels: pyramid levels the head is applied to (per-level forms).
    """

    def __init__(self, name: str, num_levels: int):
        if name not in HEAD_NORMS:
            raise ValueError(f"head norm {name!r} is not one of {list(HEAD_NORMS)}")
        self.name = name
        self.num_levels = num_levels

    def __bool__(self) -> bool:  # detectron2's heads test `if norm:`
        return self.name != ""

    def __call__(self, channels: int) -> Optional[nn.Module]:
        """Args: channels: C of the conv output. Returns: the norm module (None for "")."""
        name = self.name
        if name == "":
            return None
        if name == "GN":
            return nn.GroupNorm(math.gcd(32, channels), channels)
        if name in ("BN", "SyncBN"):
            bn = nn.BatchNorm2d(channels) if name == "BN" else NaiveSyncBatchNorm(channels)
            bn._register_load_state_dict_pre_hook(_merge_hook)
            return bn
        return MultiLevelBatchNorm(
            channels,
            self.num_levels,
            shared_affine="Cycle" in name,
            sync=name.startswith("Sync"),
        )

    def __repr__(self) -> str:
        return f"HeadNorm({self.name!r}, num_levels={self.num_levels})"


class LevelNormHeadMixin:
    """For heads built like detectron2's ``RetinaNetHead`` (``cls_subnet`` / ``bbox_subnet``
    ``nn.Sequential`` towers applied to every level): run a tower on one level, passing the
    level index to multi-level norms, and check the one-call-per-level invariant per forward.
    """

    def tower(self, subnet: nn.Module, feature, level: int):
        """``subnet`` applied to level ``level``'s feature (N, C, H, W)."""
        return forward_at_level(subnet, feature, level)

    def level_pass(self):
        """Context manager around one forward over all levels (see :func:`level_pass`)."""
        return level_pass(multi_level_norms(self))
