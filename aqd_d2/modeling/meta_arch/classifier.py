"""``ImageClassifier``: a registered backbone + global pooling + fc, for pretraining the
backbones of aqd_d2's detectors on image classification (issue 17).

``MODEL.META_ARCHITECTURE "QuantizedDetector"`` with ``MODEL.QUANT.META_ARCHITECTURE
"ImageClassifier"`` builds it through detectron2's ``build_model``; the backbone is
``build_backbone(cfg)``, i.e. exactly the module a detector of the same ``MODEL.BACKBONE`` /
``MODEL.RESNETS`` / ``MODEL.VGG`` ... settings builds, quantized by the same ``MODEL.QUANT``
policy (its components: ``backbone:backbone.``, ``head:cls_head.``).

Checkpoint names: ``MODEL.CLS.STATE_DICT_RENAMES`` renames state_dict prefixes on the way out
(``state_dict()``, so every checkpoint detectron2 writes) and back on the way in
(``load_state_dict``, so ``--resume`` works). With ``"backbone.=>backbone.bottom_up."`` the
checkpoint holds ``backbone.bottom_up.res2...``, the names of an FPN detector, and the
detector's ``MODEL.WEIGHTS`` loads it with no missing backbone key; the classifier's own
``cls_head.*`` keys are then unexpected keys for the detector (logged, ignored).

Inputs are detectron2's: a list of dicts with ``"image"`` (C, H, W) in ``INPUT.FORMAT``, 0-255,
normalised here by ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` as the detectors do, and in training
``"label"`` (int). Training returns ``{"loss_cls": ...}`` (+ ``"loss_kd"`` with a teacher);
inference one dict per image with ``"logits"`` (num_classes,).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from torch import Tensor, nn

from aqd_d2.config import ConfigError
from aqd_d2.config.pretrain import parse_renames

__all__ = ["ImageClassifier", "ClassifierHead", "build_classifier_teacher_config"]

logger = logging.getLogger(__name__)


class ClassifierHead(nn.Module):
    """Global average pooling + fc. Shapes: (N, C, H, W) -> (N, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _renamed(key: str, prefix: str, pairs: Sequence[Tuple[str, str]]) -> str:
    """``key`` with the first matching ``prefix + src`` replaced by ``prefix + dst``."""
    for src, dst in pairs:
        if key.startswith(prefix + src):
            return prefix + dst + key[len(prefix + src):]
    return key


def _rename_metadata(metadata, prefix: str, pairs) -> None:
    """Rename the module entries of a state_dict's ``_metadata`` in place (module names are
    the key prefixes without their trailing dot)."""
    if metadata is None:
        return
    for name in list(metadata):
        new = _renamed(name + ".", prefix, pairs)[:-1]
        if new != name:
            metadata[new] = metadata.pop(name)


@META_ARCH_REGISTRY.register()
class ImageClassifier(nn.Module):
    """Backbone + :class:`ClassifierHead` on one backbone output (module docstring).

    Args:
        backbone: a detectron2 backbone.
        in_feature: the output of ``backbone`` that is pooled.
        num_classes: classes.
        pixel_mean, pixel_std: per-channel normalisation of the input images.
        renames: ``[(module prefix, checkpoint prefix), ...]``, longest first.
        label_smoothing: of the cross-entropy.
        teacher: a frozen float classifier for distillation (kept out of ``state_dict``,
            ``parameters()`` and DDP), or None.
        kd_weight, kd_temperature: the distillation loss (``MODEL.CLS.KD_*``).
    """

    @configurable
    def __init__(self, *, backbone: Backbone, in_feature: str, num_classes: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 renames: Sequence[Tuple[str, str]] = (), label_smoothing: float = 0.0,
                 teacher: Optional[nn.Module] = None, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0):
        super().__init__()
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ConfigError(f"MODEL.CLS.IN_FEATURE = {in_feature!r} is not an output of the "
                              f"backbone; it gives {sorted(shapes)}")
        self.backbone = backbone
        self.in_feature = in_feature
        self.cls_head = ClassifierHead(shapes[in_feature].channels, num_classes)
        self.num_classes = int(num_classes)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.label_smoothing = float(label_smoothing)
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        # a tuple: not a registered submodule (not saved, not optimised, not moved by .to())
        self._teacher = (teacher,) if teacher is not None else ()
        self._renames = [tuple(p) for p in renames]
        if self._renames:
            self._register_state_dict_hook(ImageClassifier._rename_out)
            self._register_load_state_dict_pre_hook(self._rename_in)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        c = cfg.MODEL.CLS
        in_feature = c.IN_FEATURE or max(shapes, key=lambda f: shapes[f].stride)
        teacher = build_teacher(cfg) if c.KD_WEIGHT > 0 else None
        return {"backbone": backbone, "in_feature": in_feature, "num_classes": c.NUM_CLASSES,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "renames": parse_renames(cfg), "label_smoothing": c.LABEL_SMOOTHING,
                "teacher": teacher, "kd_weight": c.KD_WEIGHT, "kd_temperature": c.KD_TEMPERATURE}

    # -- checkpoint names ------------------------------------------------------------------
    @staticmethod
    def _rename_out(module, state_dict, prefix, local_metadata):
        # in place: a parent module (DDP's "module.") keeps using the same dict object
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            state_dict[_renamed(k, prefix, module._renames)] = v
        _rename_metadata(getattr(state_dict, "_metadata", None), prefix, module._renames)

    def _rename_in(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        back = [(dst, src) for src, dst in self._renames]
        back.sort(key=lambda p: -len(p[0]))
        for key in list(state_dict):
            new = _renamed(key, prefix, back)
            if new != key:
                state_dict[new] = state_dict.pop(key)
        _rename_metadata(getattr(state_dict, "_metadata", None), prefix, back)

    # -- forward ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen distillation teacher, or None."""
        return self._teacher[0] if self._teacher else None

    def logits(self, batched_inputs: List[Dict]) -> Tensor:
        """(N, num_classes) logits of the images of ``batched_inputs``."""
        images = torch.stack([d["image"].to(self.device, non_blocking=True) for d in batched_inputs])
        images = (images.float() - self.pixel_mean) / self.pixel_std
        return self.cls_head(self.backbone(images)[self.in_feature])

    def forward(self, batched_inputs: List[Dict]):
        logits = self.logits(batched_inputs)
        if not self.training:
            return [{"logits": row} for row in logits]
        if any("label" not in d for d in batched_inputs):
            raise ValueError("ImageClassifier in training mode needs a 'label' in every input "
                             "dict (the class index)")
        labels = torch.as_tensor([int(d["label"]) for d in batched_inputs], device=logits.device)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        teacher = self.teacher
        if teacher is None:
            return {"loss_cls": ce}
        with torch.no_grad():
            t_logits = teacher.logits(batched_inputs)
        temp = self.kd_temperature
        kd = F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(t_logits / temp, dim=1),
                      reduction="batchmean", log_target=True) * temp * temp
        return {"loss_cls": (1.0 - self.kd_weight) * ce, "loss_kd": self.kd_weight * kd}


def build_classifier_teacher_config(cfg: CfgNode) -> CfgNode:
    """The teacher's config: ``MODEL.CLS.TEACHER_CONFIG`` merged into a fresh aqd_d2 config,
    or this config with quantization off; never itself distilling, without training
    schedules (stage-wise binarization, pruning)."""
    from ..distill import frozen_teacher_config

    c = cfg.MODEL.CLS
    if c.TEACHER_CONFIG and not os.path.isfile(c.TEACHER_CONFIG):
        raise ConfigError(f"MODEL.CLS.TEACHER_CONFIG {c.TEACHER_CONFIG!r} does not exist")
    tcfg = frozen_teacher_config(cfg, c.TEACHER_CONFIG)
    tcfg.MODEL.CLS.KD_WEIGHT = 0.0
    tcfg.MODEL.CLS.TEACHER_WEIGHTS = ""
    if tcfg.MODEL.CLS.NUM_CLASSES != c.NUM_CLASSES:
        raise ConfigError(f"the teacher (MODEL.CLS.TEACHER_CONFIG) has MODEL.CLS.NUM_CLASSES = "
                          f"{tcfg.MODEL.CLS.NUM_CLASSES}, the student {c.NUM_CLASSES}")
    return tcfg


def build_teacher(cfg: CfgNode) -> nn.Module:
    """The frozen teacher classifier of ``MODEL.CLS.TEACHER_*``, loaded, in eval mode."""
    from detectron2.checkpoint import DetectionCheckpointer

    weights = cfg.MODEL.CLS.TEACHER_WEIGHTS
    if "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.CLS.TEACHER_WEIGHTS {weights!r} does not exist: train the "
                          "float teacher's pretraining config first")
    tcfg = build_classifier_teacher_config(cfg)
    teacher = META_ARCH_REGISTRY.get(tcfg.MODEL.META_ARCHITECTURE)(tcfg)
    if not hasattr(teacher, "logits"):
        raise ConfigError(f"the teacher built from MODEL.CLS.TEACHER_CONFIG is a "
                          f"{type(teacher).__name__}, not an ImageClassifier")
    teacher.to(torch.device(cfg.MODEL.DEVICE))
    DetectionCheckpointer(teacher).load(weights)
    logger.info("Distillation teacher loaded from %s (weight %s, temperature %s)", weights,
                cfg.MODEL.CLS.KD_WEIGHT, cfg.MODEL.CLS.KD_TEMPERATURE)
    return teacher.eval()
