"""BiDet's detection part for two-stage detectors (paper 000 sec. 3.1.3, eq. 7).

:class:`BiDetFastRCNNOutputLayers` adds a log-variance branch to detectron2's box predictor:
the location posterior p(l|f) = N(mu, diag(exp(logvar))) with mu the usual box deltas. Its
loss is the class term ``-log p(c|f)`` (cross-entropy; log p(c) is a constant, sec. 3.1.3)
and the location term ``-log p(l|f)/p(l)`` (:func:`~.losses.location_info_loss`), both
weighted per image by beta (eq. 7; per-image beta = T(D(G(f))) for AutoBiDet). The
variance branch is not evaluated at inference (eval ``forward`` returns the usual pair).

Location prior p(l) (MODEL.BIDET.RPN_PRIOR): "rpn" (the paper's two-stage prior, sec. 3.1.3:
"parameterized by RPN"): N(0, diag(exp(lv'))) in proposal coordinates, the proposal being the
RPN's mean and lv' the RPN's predicted log-variance moved into the ROI delta frame
(``proposal_prior_logvar`` from :class:`~.rpn.BiDetRPN`). The prior is used detached: the RPN
learns it by its own objective (``loss_rpn_logvar``, maximum likelihood), the paper's
iterative training of the RPN and the refining network. "standard": N(0, I) in proposal
coordinates (the one-stage prior of sec. 3.1.2). Either way the prior term carries no
gradient, so it changes the value of ``loss_box_ib``, not the gradients of the ROI heads.

:class:`BiDetROIHeads` (registered in ROI_HEADS_REGISTRY) uses that predictor and adds the
sparse-object-prior term J2 (eq. 6 / 11) over the detections that survive NMS among the
training proposals (per image, the detector's test-time score threshold / NMS / top-k).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import ImageList, Instances
from torch import nn

from aqd_d2.config import ConfigError

from .losses import location_info_loss, sparse_object_prior
from .rpn import PRIOR_LOGVAR_FIELD

__all__ = ["BiDetFastRCNNOutputLayers", "BiDetROIHeads"]


class BiDetFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor with mean and log-variance location branches (see module doc).

    Args:
        logvar_clamp: log-variances are clamped to [-clamp, clamp] (numerical safety).
        rpn_prior: MODEL.BIDET.RPN_PRIOR, "rpn" (proposals carry ``proposal_prior_logvar``) or
            "standard" (N(0, I)).
        other arguments: as ``FastRCNNOutputLayers``.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, logvar_clamp: float = 10.0,
                 rpn_prior: str = "standard", **kwargs):
        super().__init__(input_shape, **kwargs)
        if rpn_prior not in ("rpn", "standard"):
            raise ConfigError(f"MODEL.BIDET.RPN_PRIOR = {rpn_prior!r}; choose one of "
                              "['rpn', 'standard']")
        self.logvar_clamp = float(logvar_clamp)
        self.rpn_prior = rpn_prior
        self.bbox_logvar = nn.Linear(self.bbox_pred.in_features, self.bbox_pred.out_features)
        nn.init.normal_(self.bbox_logvar.weight, std=0.001)
        nn.init.constant_(self.bbox_logvar.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret["logvar_clamp"] = cfg.MODEL.BIDET.LOGVAR_CLAMP
        ret["rpn_prior"] = cfg.MODEL.BIDET.RPN_PRIOR
        gen = cfg.MODEL.PROPOSAL_GENERATOR.NAME
        if ret["rpn_prior"] == "rpn" and not getattr(
                PROPOSAL_GENERATOR_REGISTRY.get(gen), "provides_location_prior", False):
            raise ConfigError(
                f"MODEL.BIDET.RPN_PRIOR = 'rpn' needs a proposal generator that predicts the "
                f"prior's variance: MODEL.PROPOSAL_GENERATOR.NAME = {gen!r}; use 'BiDetRPN' "
                "with MODEL.RPN.HEAD_NAME 'BiDetRPNHead', or set MODEL.BIDET.RPN_PRIOR to "
                "'standard' (prior N(0, I))")
        return ret

    def forward(self, x: torch.Tensor):
        """Training: (scores (R, K+1), deltas (R, K*4), logvar (R, K*4)); eval: (scores, deltas)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores, deltas = super().forward(x)
        if not self.training:
            return scores, deltas
        logvar = self.bbox_logvar(x).clamp(-self.logvar_clamp, self.logvar_clamp)
        return scores, deltas, logvar

    def losses(self, predictions, proposals: List[Instances],
               image_weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """beta-weighted class and location information terms of eq. 7.

        Args:
            predictions: the training output of :meth:`forward`.
            proposals: sampled proposals with ``gt_classes`` / ``gt_boxes`` (and, for
                RPN_PRIOR "rpn", ``proposal_prior_logvar`` (R_i, 4)).
            image_weights: (N,) beta per image (None = 1).
        Returns:
            {"loss_cls": sum_r beta_r CE_r / R, "loss_box_ib": sum_fg beta_r sum_d
            location_info_loss / R}, R = number of sampled ROIs (detectron2's normalisation).
        """
        scores, deltas, logvar = predictions
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        n_per = [len(p) for p in proposals]
        if image_weights is None:
            w = torch.ones(len(gt_classes), device=scores.device)
        else:
            w = torch.repeat_interleave(image_weights.to(scores.dtype),
                                        torch.tensor(n_per, device=scores.device))
        r = max(gt_classes.numel(), 1)
        loss_cls = (F.cross_entropy(scores, gt_classes, reduction="none") * w).sum() / r

        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)[fg]
        gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                        for p in proposals], dim=0)[fg]
        box_dim = proposal_boxes.shape[1]
        mu, lv = deltas[fg], logvar[fg]
        if mu.shape[1] > box_dim:  # class-specific regression: take the gt class's deltas
            cls = gt_classes[fg]
            mu = mu.view(-1, self.num_classes, box_dim)[torch.arange(len(cls)), cls]
            lv = lv.view(-1, self.num_classes, box_dim)[torch.arange(len(cls)), cls]
        target = self.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        prior_mean = prior_logvar = None  # "standard": N(0, I)
        if self.rpn_prior == "rpn":
            if not all(p.has(PRIOR_LOGVAR_FIELD) for p in proposals):
                raise ValueError(f"MODEL.BIDET.RPN_PRIOR = 'rpn' but the proposals lack "
                                 f"{PRIOR_LOGVAR_FIELD!r}: use MODEL.PROPOSAL_GENERATOR.NAME "
                                 "'BiDetRPN', or RPN_PRIOR 'standard'")
            # the RPN's prior, detached: it is trained by the RPN's own objective (module doc)
            prior_logvar = cat([p.get(PRIOR_LOGVAR_FIELD) for p in proposals], dim=0)[fg].detach()
            prior_mean = torch.zeros_like(prior_logvar)
        loc = location_info_loss(target, mu, lv, prior_mean, prior_logvar).sum(1)
        loss_box = (loc * w[fg]).sum() / r
        return {"loss_cls": loss_cls, "loss_box_ib": loss_box}


@ROI_HEADS_REGISTRY.register()
class BiDetROIHeads(StandardROIHeads):
    """StandardROIHeads with :class:`BiDetFastRCNNOutputLayers` and the SOP term.

    Args:
        sop: "sop" | "csop" | "csop_no_nc" | "none" (MODEL.BIDET.SOP).
        gamma: weight of J2 (MODEL.BIDET.GAMMA).
        sop_detach_norm: official-code variant of the normaliser.
        other arguments: as ``StandardROIHeads``.
    """

    # BiDetRPN hands its location prior (PRIOR_LOGVAR_FIELD) only to heads with this flag
    accepts_location_prior = True

    @configurable
    def __init__(self, *, sop: str = "sop", gamma: float = 0.2, sop_detach_norm: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if self.mask_on or self.keypoint_on:
            raise ValueError("BiDetROIHeads predicts boxes only: set MODEL.MASK_ON and "
                             "MODEL.KEYPOINT_ON to False")
        self.sop = sop
        self.gamma = float(gamma)
        self.sop_detach_norm = bool(sop_detach_norm)

    @classmethod
    def from_config(cls, cfg, input_shape) -> dict:
        ret = super().from_config(cfg, input_shape)
        b = cfg.MODEL.BIDET
        ret.update(sop=b.SOP, gamma=b.GAMMA, sop_detach_norm=b.SOP_DETACH_NORM)
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape) -> dict:
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = BiDetFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                proposals: List[Instances], targets: Optional[List[Instances]] = None,
                image_weights: Optional[torch.Tensor] = None, sop_weight: float = 1.0):
        """As ``StandardROIHeads.forward``; in training also ``loss_sop`` = sop_weight * gamma *
        J2 / gamma (eq. 7) and beta weights ``image_weights`` (N,) on the class / location
        terms. Masks / keypoints are not supported (box detection only)."""
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        feats = [features[f] for f in self.box_in_features]
        box_features = self.box_head(self.box_pooler(feats, [p.proposal_boxes for p in proposals]))
        predictions = self.box_predictor(box_features)
        losses = self.box_predictor.losses(predictions, proposals, image_weights)
        if self.sop != "none":
            losses["loss_sop"] = sop_weight * self.gamma * self.sop_term(
                predictions[:2], proposals, [t.gt_classes for t in targets])
        return proposals, losses

    def label_and_sample_proposals(self, proposals: List[Instances],
                                   targets: List[Instances]) -> List[Instances]:
        """As ``StandardROIHeads.label_and_sample_proposals``. When the proposals carry
        ``proposal_prior_logvar`` and ground-truth boxes are appended as proposals
        (MODEL.ROI_HEADS.PROPOSAL_APPEND_GT), those get log-variance 0 (prior N(0, I); the RPN
        did not predict them, and the detached prior gives no gradient either way).

        Args:
            proposals: N Instances from the proposal generator.
            targets: N ground-truth Instances (not modified).
        Returns:
            N Instances of sampled proposals with ``gt_classes`` / ``gt_boxes`` (and
            ``proposal_prior_logvar`` (R_i, 4) when the proposals had it).
        """
        if self.proposal_append_gt and proposals and proposals[0].has(PRIOR_LOGVAR_FIELD):
            with_prior = []
            for t, p in zip(targets, proposals):
                t = Instances(t.image_size, **t.get_fields())  # shallow copy: caller's intact
                t.set(PRIOR_LOGVAR_FIELD, p.get(PRIOR_LOGVAR_FIELD).new_zeros(len(t), 4))
                with_prior.append(t)
            targets = with_prior
        return super().label_and_sample_proposals(proposals, targets)

    def sop_term(self, predictions, proposals: List[Instances],
                 gt_classes: List[torch.Tensor]) -> torch.Tensor:
        """J2 / gamma of the batch: NMS (test-time settings) over the training proposals, then
        :func:`~.losses.sparse_object_prior` on the surviving foreground scores (with grad)."""
        bp = self.box_predictor
        probs = bp.predict_probs(predictions, proposals)
        with torch.no_grad():
            boxes = [b.detach() for b in bp.predict_boxes(predictions, proposals)]
        dets, _ = fast_rcnn_inference(boxes, probs, [p.image_size for p in proposals],
                                      bp.test_score_thresh, bp.test_nms_thresh,
                                      bp.test_topk_per_image)
        return sparse_object_prior([d.scores for d in dets], [d.pred_classes for d in dets],
                                   gt_classes, self.num_classes, self.sop, self.sop_detach_norm)
