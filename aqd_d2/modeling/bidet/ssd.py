"""``BiDetSSD``: the SSD meta-architecture with the BiDet / AutoBiDet objective for one-stage
detectors (paper 000 eq. 7, sec. 3.2).

- the head's input features (SSD's multi-scale maps) are the high-level feature maps: their
  backbone outputs are the posterior parameters, sampled in training and binarized at
  inference by :class:`~.objective.BiDetObjective` (``loss_ib_feature`` = I(X;F));
- :class:`BiDetSSDHead` adds a log-variance conv per level (``head.bbox_logvar.<level>``) to
  the box convs (the posterior mean): location posterior N(mu, diag(exp(logvar))) against
  the standard-normal prior of one-stage detectors (sec. 3.1.2); the branch is not run at
  inference;
- ``loss_cls`` (positives + hard negatives, as SSD) and ``loss_box_ib`` (positives) are the
  class and location information terms, each default box weighted by its image's beta,
  normalised by the number of positives like SSD's loss; the location term is the paper's
  Gaussian ``-log p(l|f) / p(l)`` (MODEL.BIDET.SSD_LOCATION_LOSS "gaussian") or the official
  code's smooth L1 on a posterior sample ("sampled_smooth_l1");
- ``loss_sop``: gamma * J2 over the detections that survive SSD's inference (score
  threshold, top-k, per-class NMS) on the training predictions.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from fvcore.nn import smooth_l1_loss
from torch import Tensor, nn

from aqd_d2.modeling.meta_arch.ssd import SSD
from aqd_d2.modeling.meta_arch.ssd_head import SSDHead

from .losses import location_info_loss, sparse_object_prior
from .objective import BiDetObjective

__all__ = ["BiDetSSD", "BiDetSSDHead"]


class BiDetSSDHead(SSDHead):
    """SSDHead + one log-variance 3x3 conv per level (training only).

    Args:
        logvar_clamp: log-variances are clamped to [-clamp, clamp].
        other arguments: as ``SSDHead``.
    """

    @configurable
    def __init__(self, *, logvar_clamp: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.logvar_clamp = float(logvar_clamp)
        self.bbox_logvar = nn.ModuleList()
        for conv in self.bbox_pred:
            lv = Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
            nn.init.normal_(lv.weight, std=0.001)
            nn.init.zeros_(lv.bias)
            self.bbox_logvar.append(lv)

    @classmethod
    def from_config(cls, cfg, input_shape, num_anchors) -> dict:
        ret = super().from_config(cfg, input_shape, num_anchors)
        ret["logvar_clamp"] = cfg.MODEL.BIDET.LOGVAR_CLAMP
        return ret

    def forward(self, features: List[Tensor]):
        """Eval: (logits, deltas) per level; training: (logits, deltas, logvars)."""
        logits, deltas = super().forward(features)
        if not self.training:
            return logits, deltas
        logvars = [conv(f).clamp(-self.logvar_clamp, self.logvar_clamp)
                   for conv, f in zip(self.bbox_logvar, features)]
        return logits, deltas, logvars


@META_ARCH_REGISTRY.register()
class BiDetSSD(SSD):
    """SSD + ``bidet`` (:class:`BiDetObjective`), ``head`` a :class:`BiDetSSDHead`.

    Args:
        bidet: the shared BiDet objective; sop / gamma / sop_detach_norm: MODEL.BIDET.*.
        location_loss: "gaussian" (paper 000 eq. 7) or "sampled_smooth_l1" (official code).
        sample_scale: posterior sample scale of "sampled_smooth_l1".
        other arguments: as ``SSD``.
    """

    @configurable
    def __init__(self, *, bidet: BiDetObjective, sop: str = "sop", gamma: float = 0.2,
                 sop_detach_norm: bool = False, location_loss: str = "gaussian",
                 sample_scale: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if location_loss not in ("gaussian", "sampled_smooth_l1"):
            raise ValueError(f"MODEL.BIDET.SSD_LOCATION_LOSS = {location_loss!r}; choose one of "
                             "['gaussian', 'sampled_smooth_l1']")
        self.location_loss = location_loss
        self.sample_scale = float(sample_scale)
        self.bidet = bidet
        self.sop = sop
        self.gamma = float(gamma)
        self.sop_detach_norm = bool(sop_detach_norm)

    @classmethod
    def from_config(cls, cfg) -> dict:
        ret = super().from_config(cfg)
        shapes = ret["backbone"].output_shape()
        in_shapes = {f: shapes[f] for f in ret["head_in_features"]}
        ret["head"] = BiDetSSDHead(cfg, list(in_shapes.values()),
                                   ret["default_boxes"].num_cell_anchors)
        b = cfg.MODEL.BIDET
        ret.update(bidet=BiDetObjective(cfg, in_shapes), sop=b.SOP, gamma=b.GAMMA,
                   sop_detach_norm=b.SOP_DETACH_NORM, location_loss=b.SSD_LOCATION_LOSS,
                   sample_scale=b.SSD_SAMPLE_SCALE)
        return ret

    def _features(self, images) -> Tuple[Dict[str, Tensor], Tensor]:
        raw = self.backbone(images.tensor)
        return self.bidet({f: raw[f] for f in self.head_in_features})

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """Training: {"loss_ib_feature", "loss_cls", "loss_box_ib", "loss_sop"}; eval: the
        usual detectron2 outputs, on deterministic features without the variance branch."""
        images = self.preprocess_image(batched_inputs)
        feats, kl = self._features(images)
        features = [feats[f] for f in self.head_in_features]
        predictions = self.head(features)
        if not self.training:
            results = self.forward_inference(images, features, predictions)
            return [{"instances": detector_postprocess(r, x.get("height", s[0]), x.get("width", s[1]))}
                    for r, x, s in zip(results, batched_inputs, images.image_sizes)]
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        active = self.bidet.active()
        n = len(batched_inputs)
        if active:
            real = (self.bidet.real_images(images.tensor, self.pixel_mean, self.pixel_std)
                    if self.bidet.estimator is not None else None)
            betas = self.bidet.image_betas(feats, real, n, self.device)
        else:
            betas = torch.ones(n, device=self.device)
        k = self.num_classes + 1
        logits, deltas, logvars = self._transpose_dense_predictions(
            list(predictions), [k, self.head.box_dim, self.head.box_dim])
        anchors = self.default_boxes(features)
        gt_labels, gt_boxes = self.label_default_boxes(anchors, self.resize_gt(gt_instances))
        losses = {"loss_ib_feature": kl.mean() * (1.0 if active else 0.0)}
        losses.update(self.information_losses(anchors, logits, deltas, logvars, gt_labels,
                                              gt_boxes, betas))
        if self.sop != "none":
            losses["loss_sop"] = (1.0 if active else 0.0) * self.gamma * self.sop_term(
                anchors, logits, deltas, [g.gt_classes for g in gt_instances])
        return losses

    def information_losses(self, anchors: List[Boxes], pred_logits: List[Tensor],
                           pred_deltas: List[Tensor], pred_logvars: List[Tensor],
                           gt_labels: List[Tensor], gt_boxes: List[Tensor],
                           betas: Tensor) -> Dict[str, Tensor]:
        """beta-weighted class (-log p(c|f)) and location (-log p(l|f)/p(l), prior N(0, I))
        terms of eq. 7 over SSD's positives (+ hard negatives for the class term), / N_pos.

        Args: per-level (N, R_k, .) predictions, per-image (R,) labels / (R, 4) boxes,
        betas (N,). Returns: {"loss_cls", "loss_box_ib"}.
        """
        logits = cat(pred_logits, dim=1)
        deltas = cat(pred_deltas, dim=1)[..., :4]
        logvars = cat(pred_logvars, dim=1)[..., :4]
        labels = torch.stack(gt_labels)
        positive = labels != self.num_classes
        n = max(float(positive.sum()), 1.0)
        w = betas.to(logits.dtype)[:, None].expand_as(labels)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        chosen = positive | self.hard_negative_mining(ce, positive)
        loss_cls = (ce * w)[chosen].sum() / n
        anchors_t = Boxes.cat(anchors).tensor
        target = torch.stack([self.box2box_transform.get_deltas(anchors_t, b) for b in gt_boxes])
        loc = self.location_term(target[positive], deltas[positive], logvars[positive])
        return {"loss_cls": loss_cls, "loss_box_ib": (loc * w[positive]).sum() / n}

    def location_term(self, target: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
        """Per-positive location term (without beta).

        "gaussian": paper 000 eq. 7, ``-log p(l|f) / p(l)`` with the N(0, I) prior
        (:func:`~.losses.location_info_loss`); "sampled_smooth_l1": the official BiDet SSD
        code, SSD's smooth L1 between l and ``mu + sample_scale * exp(logvar / 2) * eps``.

        Args:
            target, mean, logvar: (P, 4) offsets l, posterior means and log-variances.
        Returns:
            (P,) the term summed over the 4 offsets.
        """
        if self.location_loss == "gaussian":
            return location_info_loss(target, mean, logvar).sum(1)
        sample = mean + self.sample_scale * torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return smooth_l1_loss(sample, target, self.smooth_l1_beta, reduction="none").sum(1)

    def sop_term(self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor],
                 gt_classes: List[Tensor]) -> Tensor:
        """J2 / gamma of the batch: SSD inference (scores keep their gradient, boxes do not)
        on the training predictions, then :func:`~.losses.sparse_object_prior`."""
        anchors_all = Boxes.cat(anchors)
        dets: List[Instances] = [
            self.inference_single_image(anchors_all, cat([x[i] for x in logits]),
                                        cat([x[i] for x in deltas])[:, :4].detach())
            for i in range(len(gt_classes))]
        return sparse_object_prior([d.scores for d in dets], [d.pred_classes for d in dets],
                                   gt_classes, self.num_classes, self.sop, self.sop_detach_norm)

    @torch.no_grad()
    def estimator_inputs(self, batched_inputs: List[Dict[str, Tensor]],
                         ) -> Tuple[Tensor, Optional[Tensor]]:
        """(feature map, real images) for the complexity estimator's own steps (one extra
        no-grad backbone forward in the current mode; see BiDetRCNN.estimator_inputs)."""
        images = self.preprocess_image(batched_inputs)
        feats, _ = self._features(images)
        real = self.bidet.real_images(images.tensor, self.pixel_mean, self.pixel_std)
        return feats[self.bidet.in_feature], real
