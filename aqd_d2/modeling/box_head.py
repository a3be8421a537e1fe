"""A box head whose FC layers can be binary: :class:`BiRealFCHead`.

detectron2's ``FastRCNNConvFCHead`` puts a ReLU after every FC layer, so the second FC sees
only values >= 0. A binary activation quantizer takes ``sign`` of its input with
``sign(0) = +1``, so a binarized ``fc2`` of that head receives the all-(+1) vector for every
box: every ROI gets the same features and the same class scores (measured: 100 detections
per image with one identical score). :func:`~aqd_d2.convert.quantize_model` therefore refuses
a binary activation on ``fc2+`` of detectron2's head and names this one.

``BiRealFCHead`` (``MODEL.ROI_BOX_HEAD.NAME "BiRealFCHead"``) is the same head with the
Bi-Real-Net recipe applied to its FC layers (Liu et al. 2018, as the binary ResNet blocks of
:mod:`aqd_d2.modeling.backbone.bireal_resnet`): after each FC a BatchNorm1d
(``MODEL.ROI_BOX_HEAD.FC_NORM``), a real-valued identity shortcut where the FC keeps the width
(``FC_SHORTCUT``), then ``FC_ACTIVATION`` (``none`` by default; ``relu`` gives detectron2's
head plus BN). Parameter names are detectron2's (``fc1``, ``fc2``, ...), so the conversion's
``box_head`` scope and checkpoints of the plain head apply; the BN layers are ``fc_relu<k>.norm``.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead
from torch import nn

__all__ = ["BiRealFCHead", "FC_ACTIVATIONS", "FC_NORMS"]

#: MODEL.ROI_BOX_HEAD.FC_ACTIVATION choices
FC_ACTIVATIONS = ("none", "relu", "hardtanh", "prelu")
#: MODEL.ROI_BOX_HEAD.FC_NORM choices
FC_NORMS = ("BN", "")


class _FCPost(nn.Module):
    """What follows one FC layer: norm, then activation (the shortcut is added in between by
    :meth:`BiRealFCHead.forward`)."""

    def __init__(self, dim: int, norm: str, activation: str):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if norm == "BN" else nn.Identity()
        self.act = {"none": nn.Identity(), "relu": nn.ReLU(), "hardtanh": nn.Hardtanh(),
                    "prelu": nn.PReLU(dim)}[activation]


@ROI_BOX_HEAD_REGISTRY.register()
class BiRealFCHead(FastRCNNConvFCHead):
    """``FastRCNNConvFCHead`` with BN, identity shortcuts and a configurable activation after
    its FC layers (module docstring).

    Args:
        input_shape, conv_dims, fc_dims, conv_norm: as ``FastRCNNConvFCHead``.
        fc_norm: "BN" (BatchNorm1d after each FC) or "" (none).
        fc_activation: one of :data:`FC_ACTIVATIONS`, after the norm and the shortcut.
        fc_shortcut: add the FC's input to its normalised output where widths match.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims, fc_dims, conv_norm="",
                 fc_norm: str = "BN", fc_activation: str = "none", fc_shortcut: bool = True):
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm)
        if fc_activation not in FC_ACTIVATIONS:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.FC_ACTIVATION = {fc_activation!r}; choose one of {FC_ACTIVATIONS}")
        if fc_norm not in FC_NORMS:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.FC_NORM = {fc_norm!r}; choose one of {FC_NORMS}")
        self.fc_shortcut = bool(fc_shortcut)
        for k, dim in enumerate(fc_dims):
            # replace detectron2's ReLU in place (nn.Sequential keeps the slot's order)
            self._modules[f"fc_relu{k + 1}"] = _FCPost(dim, fc_norm, fc_activation)

    @classmethod
    def from_config(cls, cfg, input_shape) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.update(fc_norm=cfg.MODEL.ROI_BOX_HEAD.FC_NORM,
                   fc_activation=cfg.MODEL.ROI_BOX_HEAD.FC_ACTIVATION,
                   fc_shortcut=cfg.MODEL.ROI_BOX_HEAD.FC_SHORTCUT)
        return ret

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) pooled features -> (R, FC_DIM) box features."""
        fc_in = None
        for name, layer in self.named_children():
            if isinstance(layer, _FCPost):
                y = layer.norm(x)
                if self.fc_shortcut and fc_in is not None and fc_in.shape == y.shape:
                    y = y + fc_in
                x = layer.act(y)
                continue
            if name.startswith("fc"):
                fc_in = x if x.dim() == 2 else None
            x = layer(x)
        return x
