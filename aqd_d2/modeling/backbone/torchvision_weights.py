"""torchvision ImageNet state_dicts renamed to aqd_d2's backbone names (issue 17 item 3).

``convert_torchvision_backbone(state_dict, arch, prefix)`` returns a state_dict whose keys are
``prefix`` + the names of the backbone as detectron2 builds it, so a detection config's
``MODEL.WEIGHTS`` loads it with no missing backbone key (``prefix "backbone.bottom_up."`` for
the FPN detectors, ``"backbone."`` for the rest; the C4 detectors take res5 under
``roi_heads.box_head.res5.`` through ``res5_prefix``). The classifier (``fc`` /
``classifier``) is dropped.

* ``resnet`` (torchvision resnet18/34/50/101): detectron2's ``build_resnet_backbone`` names
  (``stem.conv1``, ``res2.0.conv1.norm``, ``res3.0.shortcut``, ...). torchvision's bottleneck
  strides in the 3x3 conv: for ResNet-50+ set ``MODEL.RESNETS.STRIDE_IN_1X1 False``.
* ``vgg16`` / ``vgg16_bn``: :class:`~aqd_d2.modeling.backbone.vgg.VGG16SSD` names
  (``conv1_1`` ... ``conv5_3``; with BN, ``MODEL.VGG.NORM "BN"``, where the conv bias of
  vgg16_bn moves into BN's running mean: same eval output), and SSD's ``fc6`` / ``fc7``
  made from the classifier's fc6 / fc7 by subsampling as in SSD (Liu et al. 2016, sec. 3:
  every 4th output / input unit, every 3rd position of fc6's 7x7 window, giving the 3x3
  dilated fc6 and the 1x1 fc7 of 1024 channels).
* ``shufflenetv2`` (torchvision shufflenet_v2_x*): :func:`convert_torchvision_shufflenetv2`.
* MobileNet: torchvision ships MobileNetV2 / V3 only, and aqd_d2's MobileNet backbones are
  MobileNetV1 (paper 000's MobileNetV1 SSD, paper 004's MobileNet YOLO): there is nothing to
  convert; pretrain them with ``tools/pretrain_backbone.py`` (configs/Pretrain/MobileNetV1-*).
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from .shufflenetv2 import convert_torchvision_shufflenetv2

__all__ = ["convert_torchvision_backbone", "convert_torchvision_resnet",
           "convert_torchvision_vgg16", "TORCHVISION_ARCHS"]

#: what ``convert_torchvision_backbone`` accepts
TORCHVISION_ARCHS = ("resnet", "vgg16", "vgg16_bn", "shufflenetv2")

_VGG_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone.",
                               res5_prefix: str = "") -> Dict[str, torch.Tensor]:
    """torchvision ResNet -> detectron2 ResNet names (module docstring).

    Args:
        state_dict: a torchvision ``resnet*`` state_dict.
        prefix: prepended to every key.
        res5_prefix: if set, res5's keys get this prefix instead of ``prefix + "res5."``
            (``"roi_heads.box_head.res5."``: a C4 detector's ROI head).
    Raises:
        KeyError: naming a key that is not a torchvision ResNet key.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
        if m:
            new = "stem.conv1." + ("weight" if m.group(1) == "conv1" else f"norm.{m.group(2)}")
        else:
            m = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", key)
            if not m:
                raise KeyError(f"unexpected torchvision ResNet key {key!r}")
            stage, block, part, tensor = m.groups()
            if part.startswith("conv"):
                part = f"{part}.weight"
            elif part.startswith("bn"):
                part = f"conv{part[2:]}.norm.{tensor}"
            else:
                part = "shortcut.weight" if part.endswith("0") else f"shortcut.norm.{tensor}"
            new = f"res{int(stage) + 1}.{block}.{part}"
        if res5_prefix and new.startswith("res5."):
            out[res5_prefix + new[len("res5."):]] = value
        else:
            out[prefix + new] = value
    return out


def convert_torchvision_vgg16(state_dict: Dict[str, torch.Tensor],
                              prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """torchvision vgg16 / vgg16_bn -> VGG16SSD names, with SSD's reduced fc6 / fc7.

    Raises:
        KeyError: an unexpected key, or not 13 convs in ``features``.
    """
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"features\.(\d+)\.(\w+)", key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif not re.fullmatch(r"classifier\.[0-6]\.(weight|bias)", key):
            raise KeyError(f"unexpected torchvision VGG key {key!r}")
    convs = [i for i in sorted(layers) if layers[i]["weight"].dim() == 4]
    if len(convs) != len(_VGG_CONVS):
        raise KeyError(f"expected {len(_VGG_CONVS)} convs in a VGG16 'features', found {len(convs)}")
    for name, i in zip(_VGG_CONVS, convs):
        conv, norm = layers[i], layers.get(i + 1)
        out[f"{prefix}{name}.weight"] = conv["weight"]
        if norm is None or norm["weight"].dim() != 1:
            if "bias" in conv:
                out[f"{prefix}{name}.bias"] = conv["bias"]
            continue
        # vgg16_bn: the BN after the conv; our conv has no bias (BN follows), so the bias
        # moves into the running mean: BN(conv(x) + b) with mean m = BN(conv(x)) with mean m - b
        for tensor in _BN_TENSORS:
            if tensor in norm:
                out[f"{prefix}{name}.norm.{tensor}"] = norm[tensor]
        if "bias" in conv:
            out[f"{prefix}{name}.norm.running_mean"] = norm["running_mean"] - conv["bias"]
    if "classifier.0.weight" in state_dict:
        with_bn = any(k.endswith(".norm.running_var") for k in out)
        fc6 = state_dict["classifier.0.weight"].reshape(4096, -1, 7, 7)
        fc7 = state_dict["classifier.3.weight"]
        for name, weight, bias in (
                ("fc6", fc6[::4, :, ::3, ::3], state_dict["classifier.0.bias"][::4]),
                ("fc7", fc7[::4, ::4, None, None], state_dict["classifier.3.bias"][::4])):
            out[f"{prefix}{name}.weight"] = weight.contiguous()
            if not with_bn:
                out[f"{prefix}{name}.bias"] = bias.contiguous()
                continue
            # NORM "BN" puts a BN after fc6 / fc7 too, which torchvision's classifier lacks:
            # one that adds the bias and leaves the rest as it is (eval mode; eps 1e-5)
            out[f"{prefix}{name}.norm.weight"] = torch.ones_like(bias)
            out[f"{prefix}{name}.norm.bias"] = bias.clone()
            out[f"{prefix}{name}.norm.running_mean"] = torch.zeros_like(bias)
            out[f"{prefix}{name}.norm.running_var"] = torch.full_like(bias, 1.0 - 1e-5)
    return out


def convert_torchvision_backbone(state_dict: Dict[str, torch.Tensor], arch: str,
                                 prefix: str = "backbone.", res5_prefix: str = ""
                                 ) -> Dict[str, torch.Tensor]:
    """Dispatch on ``arch`` (one of :data:`TORCHVISION_ARCHS`; module docstring).

    Raises:
        ValueError: an unknown ``arch`` (MobileNet: see the module docstring).
    """
    if arch == "resnet":
        return convert_torchvision_resnet(state_dict, prefix, res5_prefix)
    if arch in ("vgg16", "vgg16_bn"):
        return convert_torchvision_vgg16(state_dict, prefix)
    if arch == "shufflenetv2":
        return convert_torchvision_shufflenetv2(state_dict, prefix)
    hint = (" torchvision has no MobileNetV1 (aqd_d2's MobileNet backbones); pretrain it with "
            "tools/pretrain_backbone.py --config-file configs/Pretrain/MobileNetV1-*.yaml"
            if "mobilenet" in arch.lower() else "")
    raise ValueError(f"no torchvision converter for {arch!r}; choose one of "
                     f"{list(TORCHVISION_ARCHS)}.{hint}")
