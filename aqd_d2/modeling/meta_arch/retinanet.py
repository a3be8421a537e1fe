"""RetinaNet with AQD's head normalization, registered as ``"AQDRetinaNet"``.

detectron2's :class:`~detectron2.modeling.RetinaNet` builds its head with a fixed class and
reads ``MODEL.RETINANET.NORM`` ("BN" there means per-level statistics with a shared affine).
:class:`AQDRetinaNet` is that meta-architecture (same losses, anchors, inference) with
:class:`AQDRetinaNetHead`, whose norm comes from ``MODEL.RETINANET.HEAD_NORM`` (see
:mod:`.head_norm`): AQD's multi-level BN (sec. 3.2) has its own affine per level. Each head
conv is followed by the norm and ReLU (AQD sec. 4.3; detectron2's head already has the ReLU).

Quantization is not done here: ``MODEL.META_ARCHITECTURE: QuantizedDetector`` with
``MODEL.QUANT.META_ARCHITECTURE: AQDRetinaNet`` builds this class and converts it.
"""
from __future__ import annotations

from typing import List

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import Tensor

from aqd_d2.config import ConfigError

from .head_norm import HeadNorm, LevelNormHeadMixin

__all__ = ["AQDRetinaNet", "AQDRetinaNetHead"]


class AQDRetinaNetHead(LevelNormHeadMixin, RetinaNetHead):
    """detectron2's RetinaNetHead with a configurable per-level norm and an explicit level index.

    Parameter names are detectron2's (``cls_subnet.<i>``, ``bbox_subnet.<i>``, ``cls_score``,
    ``bbox_pred``); the norm at ``<subnet>.<i>`` has the layout described in
    :mod:`aqd_d2.layers.multilevel_bn`.

    Args:
        input_shape: one ShapeSpec per level (all with the same channels).
        num_classes, num_anchors, conv_dims, prior_prob: as for ``RetinaNetHead``.
        norm: a :data:`~.head_norm.HEAD_NORMS` name.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm: str = "",
        prior_prob: float = 0.01,
    ):
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=num_anchors,
            conv_dims=conv_dims,
            norm=HeadNorm(norm, len(input_shape)),
            prior_prob=prior_prob,
        )
        self.norm_name = norm

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["norm"] = cfg.MODEL.RETINANET.HEAD_NORM
        return ret

    def forward(self, features: List[Tensor]):
        """
        Args:
            features: L tensors (N, C, Hi, Wi), high to low resolution (P3 first).
        Returns:
            logits: L tensors (N, A*K, Hi, Wi); bbox_reg: L tensors (N, A*4, Hi, Wi).
        """
        if len(features) != self._num_features:
            raise ValueError(f"head built for {self._num_features} levels, got {len(features)}")
        logits, bbox_reg = [], []
        with self.level_pass():
            for level, feature in enumerate(features):
                logits.append(self.cls_score(self.tower(self.cls_subnet, feature, level)))
                bbox_reg.append(self.bbox_pred(self.tower(self.bbox_subnet, feature, level)))
        return logits, bbox_reg


@META_ARCH_REGISTRY.register()
class AQDRetinaNet(RetinaNet):
    """detectron2's RetinaNet whose head is :class:`AQDRetinaNetHead` (``MODEL.RETINANET.HEAD_NORM``).

    All other keys are detectron2's ``MODEL.RETINANET.*``; the constructor is RetinaNet's.
    """

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.RETINANET.NORM:
            raise ConfigError(
                f"MODEL.RETINANET.NORM = {cfg.MODEL.RETINANET.NORM!r} is detectron2's RetinaNetHead "
                "key; AQDRetinaNet reads MODEL.RETINANET.HEAD_NORM (e.g. 'MultiLevelBN', 'CycleBN' "
                "for detectron2's per-level 'BN'). Leave MODEL.RETINANET.NORM empty."
            )
        ret = super().from_config(cfg)  # builds detectron2's head too; replaced below
        shapes = ret["backbone"].output_shape()
        feature_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        ret["head"] = AQDRetinaNetHead(cfg, feature_shapes)
        return ret
