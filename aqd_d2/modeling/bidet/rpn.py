"""The RPN-parameterised location prior of BiDet's two-stage detectors (paper 000 sec. 3.1.3).

Paper 000, after eq. 7: "For two-stage detectors, p(l1,i) and p(l2,i) are parameterized by RPN
which is learned by the objective function. Following [43], we iteratively train the RPN and
the refining networks that predict priors and posteriors of bounding box location offset
respectively." (sec. 3.1.2: "For two-stage detectors, Region Proposal Networks (RPN) output
the parameters of the Gaussian priors.") Here:

- :class:`BiDetRPNHead` (RPN_HEAD_REGISTRY) is detectron2's ``StandardRPNHead`` plus a 1x1 conv
  ``anchor_logvar`` giving, per anchor, the log-variance of each of the 4 box deltas. The mean
  is the usual ``anchor_deltas`` output, so the RPN's prior for the object's offset from the
  anchor is N(mu, diag(exp(lv))).
- :class:`BiDetRPN` (PROPOSAL_GENERATOR_REGISTRY) is detectron2's ``RPN``. The mean is trained
  by Faster R-CNN's own RPN objective [43] (``loss_rpn_cls`` / ``loss_rpn_loc``, unchanged);
  the variance by maximum likelihood of the RPN's own regression targets t on the foreground
  anchors, ``loss_rpn_logvar`` = sum 0.5*((t - mu)^2 exp(-lv) + lv) / (anchors sampled per
  image * N) (the Gaussian negative log-likelihood without its constant, normalised like
  ``loss_rpn_loc``), with mu detached so that the mean keeps [43]'s objective. This NLL is the
  prior's own objective (the "iterative" training): the ROI heads use the prior detached. The
  NLL also reaches the head's shared 3x3 conv and the features below it, as any RPN loss does.
- Every training proposal carries ``proposal_prior_logvar`` (R, 4): that prior moved into the
  ROI head's delta frame (:func:`rpn_to_roi_logvar`), with mean 0 (the proposal is the prior's
  mean). In eval the variance branch is skipped ("we drop the network branch of covariance
  matrix", sec. 3.1.3) and the output equals detectron2's RPN. ``anchor_logvar`` is a prediction
  layer ("remain real-valued"): the BiDet configs list it in MODEL.QUANT.LAST_LAYERS.

With ``MODEL.BIDET.RPN_PRIOR: "standard"`` both classes build no variance branch and behave
exactly as detectron2's (the prior is then N(0, I) in the proposal frame).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY, RPN_HEAD_REGISTRY
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from aqd_d2.config import ConfigError

__all__ = ["BiDetRPNHead", "BiDetRPN", "gaussian_nll", "rpn_to_roi_logvar", "select_rpn_proposals",
           "PRIOR_LOGVAR_FIELD"]

# Instances field of the training proposals: the prior's log-variance in the ROI delta frame.
PRIOR_LOGVAR_FIELD = "proposal_prior_logvar"


def _box_sizes(boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def rpn_to_roi_logvar(logvar: torch.Tensor, anchors: torch.Tensor, proposals: torch.Tensor,
                      rpn_weights: Sequence[float], roi_weights: Sequence[float]) -> torch.Tensor:
    """The RPN prior's log-variance in the ROI head's delta frame.

    Derivation (detectron2's Box2BoxTransform; anchor a, proposal p, object g, RPN weights Wr =
    MODEL.RPN.BBOX_REG_WEIGHTS, ROI weights Wq = MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS). The RPN's
    prior for the object's offset from the anchor is dx ~ N(mu_x, s_x^2), i.e.
    g_x = a_x + dx wa / Wr_x, and the proposal is its mean p_x = a_x + mu_x wa / Wr_x. The ROI
    target is dx' = Wq_x (g_x - p_x) / wp = Wq_x (wa / wp) (dx - mu_x) / Wr_x, so
    dx' ~ N(0, s_x^2 (Wq_x wa / (Wr_x wp))^2): logvar' = lv_x + 2 log(Wq_x wa / (Wr_x wp))
    (y: heights). For the scale, g_w = wa exp(dw / Wr_w), p_w = wa exp(mu_w / Wr_w), so
    dw' = Wq_w log(g_w / p_w) = Wq_w (dw - mu_w) / Wr_w: logvar' = lv_w + 2 log(Wq_w / Wr_w).
    With ``proposals`` the final (clipped) boxes the variances stay exact, because the ROI
    deltas are normalised by the box actually used; only the mean moves off 0 for a proposal
    that clipping shifted (such proposals still get mean 0).

    Args:
        logvar: (R, 4) log-variances of the RPN deltas (dx, dy, dw, dh) of the anchors.
        anchors: (R, 4) the anchors (x0, y0, x1, y1) the proposals were decoded from.
        proposals: (R, 4) the proposal boxes, non-empty.
        rpn_weights, roi_weights: the (wx, wy, ww, wh) of the two Box2BoxTransforms.
    Returns:
        (R, 4) log-variances of the ROI deltas (prior mean 0).
    """
    wa, ha = _box_sizes(anchors)
    wp, hp = _box_sizes(proposals)
    r, q = [float(v) for v in rpn_weights], [float(v) for v in roi_weights]
    shift = torch.stack([
        2 * torch.log(q[0] * wa / (r[0] * wp)),
        2 * torch.log(q[1] * ha / (r[1] * hp)),
        torch.full_like(wa, 2 * math.log(q[2] / r[2])),
        torch.full_like(wa, 2 * math.log(q[3] / r[3])),
    ], dim=1)
    return logvar + shift


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise 0.5*((t - mu)^2 exp(-lv) + lv): -log N(t; mu, exp(lv)) without 0.5 log(2 pi)."""
    return 0.5 * ((target - mean) ** 2 * torch.exp(-logvar) + logvar)


@torch.no_grad()
def select_rpn_proposals(proposals: List[torch.Tensor], logits: List[torch.Tensor],
                         image_sizes: List[Tuple[int, int]], nms_thresh: float, pre_nms_topk: int,
                         post_nms_topk: int, min_box_size: float, training: bool
                         ) -> Tuple[List[Instances], List[torch.Tensor]]:
    """detectron2's RPN proposal selection, also returning which anchor each proposal is from.

    Same steps and settings as ``find_top_rpn_proposals`` (whose result equals this one's, see
    the tests): per level the ``pre_nms_topk`` highest logits; per image non-finite candidates
    dropped (an error in training), boxes clipped to the image, boxes with a side <=
    ``min_box_size`` dropped, NMS per level, the ``post_nms_topk`` best kept.

    Args:
        proposals: L tensors (N, A_l, 4): decoded boxes of every anchor of level l.
        logits: L tensors (N, A_l): objectness logits.
        image_sizes: N (h, w).
        other arguments: as ``find_top_rpn_proposals``.
    Returns:
        (N Instances with ``proposal_boxes`` / ``objectness_logits``, N tensors (R_i,) with the
        index of each proposal's anchor among the sum_l A_l anchors of all levels).
    """
    num_images = len(image_sizes)
    cand_boxes, cand_logits, cand_anchor, cand_level = [], [], [], []
    offset = 0
    rows = torch.arange(num_images, device=proposals[0].device)[:, None]
    for level, (boxes_l, logits_l) in enumerate(zip(proposals, logits)):
        k = min(logits_l.shape[1], pre_nms_topk)
        ordered, order = logits_l.sort(dim=1, descending=True)
        top = order[:, :k]
        cand_logits.append(ordered[:, :k])
        cand_boxes.append(boxes_l[rows, top])
        cand_anchor.append(top + offset)
        cand_level.append(torch.full((k,), level, dtype=torch.int64, device=top.device))
        offset += logits_l.shape[1]
    cand_boxes, cand_logits = cat(cand_boxes, dim=1), cat(cand_logits, dim=1)
    cand_anchor, cand_level = cat(cand_anchor, dim=1), cat(cand_level, dim=0)

    results, anchor_ids = [], []
    for i, size in enumerate(image_sizes):
        boxes, scores, ids, level = Boxes(cand_boxes[i]), cand_logits[i], cand_anchor[i], cand_level
        finite = torch.isfinite(boxes.tensor).all(dim=1) & torch.isfinite(scores)
        if not bool(finite.all()):
            if training:
                raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. "
                                         "Training has diverged.")
            boxes, scores, ids, level = boxes[finite], scores[finite], ids[finite], level[finite]
        boxes.clip(size)
        big = boxes.nonempty(threshold=min_box_size)
        boxes, scores, ids, level = boxes[big], scores[big], ids[big], level[big]
        keep = batched_nms(boxes.tensor, scores, level, nms_thresh)[:post_nms_topk]
        inst = Instances(size)
        inst.proposal_boxes = boxes[keep]
        inst.objectness_logits = scores[keep]
        results.append(inst)
        anchor_ids.append(ids[keep])
    return results, anchor_ids


@RPN_HEAD_REGISTRY.register()
class BiDetRPNHead(StandardRPNHead):
    """``StandardRPNHead`` + a 1x1 conv ``anchor_logvar`` (A*box_dim channels) on the shared
    hidden map: per-anchor log-variances of the box deltas, clamped to [-clamp, clamp].

    Args:
        predict_logvar: build the variance branch (False for MODEL.BIDET.RPN_PRIOR "standard":
            then the head is exactly ``StandardRPNHead``).
        logvar_clamp: MODEL.BIDET.LOGVAR_CLAMP.
        other arguments: as ``StandardRPNHead``.
    """

    @configurable
    def __init__(self, *, predict_logvar: bool = True, logvar_clamp: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.logvar_clamp = float(logvar_clamp)
        self.anchor_logvar: Optional[nn.Conv2d] = None
        if predict_logvar:
            d = self.anchor_deltas
            # forked RNG: every other parameter of the detector is initialised exactly as with
            # RPN_PRIOR "standard" (same seed), so the two settings differ only in the prior
            with torch.random.fork_rng(devices=[]):
                self.anchor_logvar = nn.Conv2d(d.in_channels, d.out_channels, kernel_size=1)
                # small init: variance ~1 in RPN delta units at the start
                nn.init.normal_(self.anchor_logvar.weight, std=0.001)
                nn.init.constant_(self.anchor_logvar.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape) -> dict:
        ret = super().from_config(cfg, input_shape)
        if ret["box_dim"] != 4:
            raise ConfigError(f"BiDetRPNHead predicts axis-aligned boxes (box_dim 4), got box_dim "
                              f"{ret['box_dim']} from MODEL.ANCHOR_GENERATOR.NAME = "
                              f"{cfg.MODEL.ANCHOR_GENERATOR.NAME!r}; use 'DefaultAnchorGenerator'")
        ret["predict_logvar"] = cfg.MODEL.BIDET.RPN_PRIOR == "rpn"
        ret["logvar_clamp"] = cfg.MODEL.BIDET.LOGVAR_CLAMP
        return ret

    def forward(self, features: List[torch.Tensor], with_logvar: bool = False):
        """As ``StandardRPNHead.forward``; with ``with_logvar`` also the log-variances.

        Args:
            features: L maps (N, C, H_l, W_l).
            with_logvar: also return L tensors (N, A*4, H_l, W_l) of clamped log-variances
                (needs the variance branch).
        Returns:
            (objectness logits, deltas) or (objectness logits, deltas, log-variances).
        """
        if not with_logvar:
            return super().forward(features)
        if self.anchor_logvar is None:
            raise RuntimeError("BiDetRPNHead was built without the variance branch "
                               "(MODEL.BIDET.RPN_PRIOR = 'standard')")
        logits, deltas, logvars = [], [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
            logvars.append(self.anchor_logvar(t).clamp(-self.logvar_clamp, self.logvar_clamp))
        return logits, deltas, logvars


def _per_anchor(x: torch.Tensor, box_dim: int) -> torch.Tensor:
    """(N, A*box_dim, H, W) -> (N, H*W*A, box_dim), detectron2's anchor order."""
    n, _, h, w = x.shape
    return x.view(n, -1, box_dim, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, box_dim)


@PROPOSAL_GENERATOR_REGISTRY.register()
class BiDetRPN(RPN):
    """detectron2's ``RPN`` that also learns and hands on the location prior's variance.

    Args:
        rpn_prior: MODEL.BIDET.RPN_PRIOR ("rpn": learn the variance, attach
            ``proposal_prior_logvar`` to training proposals; "standard": plain RPN).
        roi_box_reg_weights: MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS (the ROI delta frame).
        other arguments: as ``RPN`` (``loss_weight`` may hold "loss_rpn_logvar"; default: the
            weight of "loss_rpn_loc").
    """

    # the ROI heads that accept PRIOR_LOGVAR_FIELD check for this flag
    provides_location_prior = True

    @configurable
    def __init__(self, *, rpn_prior: str = "rpn",
                 roi_box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), **kwargs):
        super().__init__(**kwargs)
        if rpn_prior not in ("rpn", "standard"):
            raise ConfigError(f"MODEL.BIDET.RPN_PRIOR = {rpn_prior!r}; choose one of "
                              "['rpn', 'standard']")
        self.rpn_prior = rpn_prior
        self.roi_box_reg_weights = tuple(float(v) for v in roi_box_reg_weights)
        if rpn_prior == "rpn" and getattr(self.rpn_head, "anchor_logvar", None) is None:
            raise ConfigError("MODEL.BIDET.RPN_PRIOR = 'rpn' needs an RPN head with a variance "
                              f"branch: MODEL.RPN.HEAD_NAME = {type(self.rpn_head).__name__!r}; "
                              "use 'BiDetRPNHead'")

    @classmethod
    def from_config(cls, cfg, input_shape) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret["rpn_prior"] = cfg.MODEL.BIDET.RPN_PRIOR
        ret["roi_box_reg_weights"] = tuple(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
        ret["loss_weight"]["loss_rpn_logvar"] = ret["loss_weight"]["loss_rpn_loc"]
        roi_name = cfg.MODEL.ROI_HEADS.NAME
        if ret["rpn_prior"] == "rpn" and not getattr(
                ROI_HEADS_REGISTRY.get(roi_name), "accepts_location_prior", False):
            raise ConfigError(
                f"MODEL.BIDET.RPN_PRIOR = 'rpn': BiDetRPN hands the prior to the ROI heads, but "
                f"MODEL.ROI_HEADS.NAME = {roi_name!r} does not take it; use 'BiDetROIHeads' (or "
                "a subclass), or set MODEL.BIDET.RPN_PRIOR to 'standard'")
        return ret

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None):
        """As ``RPN.forward``. Training with RPN_PRIOR "rpn": also ``loss_rpn_logvar`` and the
        proposals' ``proposal_prior_logvar`` (R_i, 4). Eval: exactly ``RPN.forward``."""
        if not self.training or self.rpn_prior != "rpn":
            return super().forward(images, features, gt_instances)
        assert gt_instances is not None, "RPN requires gt_instances in training!"
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas, logvars = self.rpn_head(feats, with_logvar=True)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [_per_anchor(x, 4) for x in deltas]
        logvars = [_per_anchor(x, 4) for x in logvars]
        gt_labels, gt_boxes = self.label_and_sample_anchors(anchors, gt_instances)
        losses = self.losses(anchors, logits, gt_labels, deltas, gt_boxes)
        losses["loss_rpn_logvar"] = self.logvar_loss(anchors, gt_labels, deltas, logvars,
                                                     gt_boxes)
        proposals = self.proposals_with_prior(anchors, logits, deltas, logvars, images.image_sizes)
        return proposals, losses

    def logvar_loss(self, anchors: List[Boxes], gt_labels: List[torch.Tensor],
                    deltas: List[torch.Tensor], logvars: List[torch.Tensor],
                    gt_boxes: List[torch.Tensor]) -> torch.Tensor:
        """Gaussian NLL of the RPN's regression targets on the foreground anchors (module doc).

        Args:
            anchors: L Boxes (A_l, 4); gt_labels / gt_boxes: N tensors (sum A_l,) / (sum A_l, 4)
                from ``label_and_sample_anchors``; deltas / logvars: L tensors (N, A_l, 4).
        Returns:
            a scalar: sum over fg anchors and the 4 deltas / (BATCH_SIZE_PER_IMAGE * N), times
            the weight of "loss_rpn_logvar".
        """
        all_anchors = Boxes.cat(anchors).tensor
        fg = torch.stack(gt_labels) == 1
        targets = torch.stack([self.box2box_transform.get_deltas(all_anchors, g)
                               for g in gt_boxes])
        mu = cat(deltas, dim=1).detach()  # the mean is trained by loss_rpn_loc only
        nll = gaussian_nll(targets[fg], mu[fg], cat(logvars, dim=1)[fg]).sum()
        weight = self.loss_weight.get("loss_rpn_logvar", self.loss_weight.get("loss_rpn_loc", 1.0))
        return nll * weight / (self.batch_size_per_image * len(gt_labels))

    @torch.no_grad()
    def proposals_with_prior(self, anchors: List[Boxes], logits: List[torch.Tensor],
                             deltas: List[torch.Tensor], logvars: List[torch.Tensor],
                             image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """``predict_proposals`` (same boxes and logits) plus ``proposal_prior_logvar``.

        Args:
            anchors: L Boxes; logits: L (N, A_l); deltas / logvars: L (N, A_l, 4).
        Returns:
            N Instances with ``proposal_boxes``, ``objectness_logits`` and
            ``proposal_prior_logvar`` (R_i, 4), detached.
        """
        boxes = self._decode_proposals(anchors, deltas)
        results, anchor_ids = select_rpn_proposals(
            boxes, logits, image_sizes, self.nms_thresh, self.pre_nms_topk[self.training],
            self.post_nms_topk[self.training], self.min_box_size, self.training)
        all_anchors = Boxes.cat(anchors).tensor
        all_logvars = cat(logvars, dim=1)
        for i, (inst, ids) in enumerate(zip(results, anchor_ids)):
            inst.set(PRIOR_LOGVAR_FIELD, rpn_to_roi_logvar(
                all_logvars[i, ids], all_anchors[ids], inst.proposal_boxes.tensor,
                self.box2box_transform.weights, self.roi_box_reg_weights))
        return results
