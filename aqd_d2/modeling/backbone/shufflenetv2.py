"""ShuffleNetV2 (Ma et al., ECCV 2018) as a detectron2 backbone, registered as
``"build_shufflenetv2_backbone"``: the Light-Head R-CNN backbone of BiDet's efficient-model
extension (paper 000 Table 4, appendix 001 B.2: ShuffleNetV2 x0.5).

Architecture (ShuffleNetV2 paper, Table 5 and Fig. 3(c)/(d)):

* ``stem``: 3x3 conv stride 2 (24 channels) + BN + ReLU, 3x3 max-pool stride 2 (stride 4);
* ``stage2`` / ``stage3`` / ``stage4``: 4 / 8 / 4 units (strides 8 / 16 / 32). The first unit
  of a stage is the down-sampling unit (Fig. 3d): both branches see the whole input, the left
  one a 3x3 depthwise conv stride 2 + BN then 1x1 conv + BN + ReLU, the right one 1x1 conv +
  BN + ReLU, 3x3 depthwise conv stride 2 + BN, 1x1 conv + BN + ReLU. The other units are basic
  units (Fig. 3c): channel split in halves, the first half passes unchanged, the second goes
  through the right branch at stride 1. Both concatenate the two halves and shuffle the
  channels (2 groups);
* ``conv5``: 1x1 conv (1024 channels for x0.5-x1.5, 2048 for x2) + BN + ReLU (stride 32).

Output channels of (stem, stage2, stage3, stage4, conv5) per width: x0.5 24/48/96/192/1024,
x1.0 24/116/232/464/1024, x1.5 24/176/352/704/1024, x2.0 24/244/488/976/2048. The image-
classification pooling and FC layer are not part of the backbone.

Every conv is a detectron2 ``Conv2d`` with its norm (``MODEL.SHUFFLENETV2.NORM``) and
activation attached, so the conversion pass can quantize it and pruning hooks can zero a
filter's norm together with it.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from aqd_d2.config.pruning import SHUFFLENETV2_CHANNELS

__all__ = ["ShuffleNetV2", "ShuffleV2Unit", "channel_shuffle", "build_shufflenetv2_backbone"]

#: units per stage (stage2, stage3, stage4), ShuffleNetV2 paper Table 5
STAGE_REPEATS = (4, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """ShuffleNet channel shuffle: (N, g*c, H, W) -> (N, c*g, H, W), channel ``i*c + j`` goes to
    ``j*g + i``.

    Args:
        x: (N, C, H, W) with C divisible by ``groups``.
        groups: number of groups.
    Returns:
        (N, C, H, W) tensor with interleaved groups.
    """
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv(cin: int, cout: int, k: int, stride: int, norm: str, relu: bool,
          depthwise: bool = False) -> Conv2d:
    return Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=cin if depthwise else 1,
                  bias=False, norm=get_norm(norm, cout), activation=F.relu if relu else None)


class ShuffleV2Unit(nn.Module):
    """One ShuffleNetV2 unit: basic (stride 1, Fig. 3c) or down-sampling (stride 2, Fig. 3d).

    Args:
        in_channels: input channels.
        out_channels: output channels (even; each branch gives half).
        stride: 1 (basic unit, ``in_channels == out_channels``) or 2 (down-sampling unit).
        norm: detectron2 norm name.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "BN"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Unit stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a basic ShuffleNetV2 unit keeps the channel count")
        half = out_channels // 2
        self.stride = stride
        branch_in = in_channels if stride == 2 else in_channels // 2
        self.branch_main = nn.Sequential(
            _conv(branch_in, half, 1, 1, norm, relu=True),
            _conv(half, half, 3, stride, norm, relu=False, depthwise=True),
            _conv(half, half, 1, 1, norm, relu=True),
        )
        self.branch_proj: Optional[nn.Sequential] = None
        if stride == 2:
            self.branch_proj = nn.Sequential(
                _conv(in_channels, in_channels, 3, 2, norm, relu=False, depthwise=True),
                _conv(in_channels, half, 1, 1, norm, relu=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        if self.branch_proj is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch_main(x2)], dim=1)
        else:
            out = torch.cat([self.branch_proj(x), self.branch_main(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(Backbone):
    """ShuffleNetV2 feature extractor (see module docstring).

    Args:
        width_mult: 0.5, 1.0, 1.5 or 2.0.
        out_features: names among "stem", "stage2", "stage3", "stage4", "conv5".
        norm: detectron2 norm name for every conv.
        freeze_at: freeze the first ``freeze_at`` blocks (stem, stage2, stage3, stage4, conv5).
    """

    _NAMES = ("stem", "stage2", "stage3", "stage4", "conv5")
    _STRIDES = (4, 8, 16, 32, 32)

    def __init__(self, width_mult: float = 0.5, out_features=("stage3", "conv5"), norm: str = "BN",
                 freeze_at: int = 0):
        super().__init__()
        if width_mult not in SHUFFLENETV2_CHANNELS:
            raise ValueError(f"MODEL.SHUFFLENETV2.WIDTH_MULT = {width_mult!r}: choose one of "
                             f"{sorted(SHUFFLENETV2_CHANNELS)}")
        bad = [f for f in out_features if f not in self._NAMES]
        if bad or not out_features:
            raise ValueError(f"MODEL.SHUFFLENETV2.OUT_FEATURES = {list(out_features)!r}: choose "
                             f"from {list(self._NAMES)}")
        chans = SHUFFLENETV2_CHANNELS[width_mult]
        self.stem = nn.Sequential(_conv(3, chans[0], 3, 2, norm, relu=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        cin = chans[0]
        for name, cout, repeats in zip(self._NAMES[1:4], chans[1:4], STAGE_REPEATS):
            units = [ShuffleV2Unit(cin, cout, 2, norm)]
            units += [ShuffleV2Unit(cout, cout, 1, norm) for _ in range(repeats - 1)]
            self.add_module(name, nn.Sequential(*units))
            cin = cout
        self.conv5 = _conv(cin, chans[4], 1, 1, norm, relu=True)
        # run only up to the last requested block
        self._last = max(self._NAMES.index(f) for f in out_features)
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(self._NAMES, chans))
        self._out_feature_strides = dict(zip(self._NAMES, self._STRIDES))
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "ShuffleNetV2":
        """Freeze (no gradient, FrozenBatchNorm) the first ``freeze_at`` blocks; returns self."""
        for name in self._NAMES[:freeze_at]:
            block = getattr(self, name)
            for p in block.parameters():
                p.requires_grad = False
            FrozenBatchNorm2d.convert_frozen_batchnorm(block)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {name: (N, C_name, H / stride, W / stride)} for the out features."""
        out = {}
        for name in self._NAMES[: self._last + 1]:
            x = getattr(self, name)(x)
            if name in self._out_features:
                out[name] = x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_shufflenetv2_backbone(cfg, input_shape: ShapeSpec) -> ShuffleNetV2:
    """ShuffleNetV2 from ``cfg.MODEL.SHUFFLENETV2`` (``input_shape`` must have 3 channels)."""
    if input_shape.channels != 3:
        raise ValueError(f"ShuffleNetV2 takes 3-channel images, got {input_shape.channels} "
                         "(MODEL.PIXEL_MEAN length)")
    c = cfg.MODEL.SHUFFLENETV2
    return ShuffleNetV2(float(c.WIDTH_MULT), list(c.OUT_FEATURES), c.NORM, int(c.FREEZE_AT))


# torchvision module index -> ours: (conv, norm) positions inside its Sequential blocks
_TV_BRANCH1 = {"0": "branch_proj.0.weight", "1": "branch_proj.0.norm", "2": "branch_proj.1.weight",
               "3": "branch_proj.1.norm"}
_TV_BRANCH2 = {"0": "branch_main.0.weight", "1": "branch_main.0.norm", "3": "branch_main.1.weight",
               "4": "branch_main.1.norm", "5": "branch_main.2.weight", "6": "branch_main.2.norm"}
_TV_TOP = {"conv1.0": "stem.0.weight", "conv1.1": "stem.0.norm", "conv5.0": "conv5.weight",
           "conv5.1": "conv5.norm"}


def convert_torchvision_shufflenetv2(state_dict: Dict[str, torch.Tensor],
                                     prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """Rename a torchvision ``shufflenet_v2_x*`` state_dict to this backbone's names.

    BiDet's appendix (001 B.2) starts Light-Head R-CNN from "the official PyTorch model zoo"
    ShuffleNetV2 x0.5, i.e. torchvision's ImageNet weights; the classifier ``fc`` is dropped.
    Save the result as ``{"model": ..., "matching_heuristics": False}`` and pass it as
    ``MODEL.WEIGHTS``.

    Args:
        state_dict: torchvision ShuffleNetV2 state_dict.
        prefix: prepended to every key (``"backbone."`` for a detectron2 detector's checkpoint).
    Returns:
        the renamed tensors (same objects).
    Raises:
        KeyError: naming a key of ``state_dict`` that is not a torchvision ShuffleNetV2 key.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        parts = key.split(".")
        head = ".".join(parts[:2])
        if head in _TV_TOP:
            new, rest = _TV_TOP[head], parts[2:]
        elif len(parts) >= 5 and parts[0] in ("stage2", "stage3", "stage4") \
                and parts[2] in ("branch1", "branch2"):
            table = _TV_BRANCH1 if parts[2] == "branch1" else _TV_BRANCH2
            if parts[3] not in table:
                raise KeyError(f"unexpected torchvision ShuffleNetV2 key {key!r}")
            new, rest = f"{parts[0]}.{parts[1]}.{table[parts[3]]}", parts[4:]
        else:
            raise KeyError(f"unexpected torchvision ShuffleNetV2 key {key!r}")
        if new.endswith(".weight"):  # a conv: its only tensor is the weight
            out[prefix + new] = value
        else:
            out[prefix + ".".join([new] + rest)] = value
    return out


def stage_channels(model: ShuffleNetV2) -> List[int]:
    """Output channels of stem, stage2, stage3, stage4, conv5 (for reports and tests)."""
    return [model._out_feature_channels[n] for n in ShuffleNetV2._NAMES]
