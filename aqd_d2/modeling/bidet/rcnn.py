"""``BiDetRCNN``: detectron2's GeneralizedRCNN with the BiDet / AutoBiDet objective (paper 000
eq. 7, sec. 3.2) for two-stage detectors.

The backbone's outputs are the posterior parameters of the high-level feature maps; the
:class:`~.objective.BiDetObjective` samples them in training and binarizes them at
inference, the RPN and the ROI heads (normally :class:`~.roi_heads.BiDetROIHeads`) run on
those features. Loss dict (training):

- ``loss_ib_feature``: I(X;F) (eq. 7 first term; 0 during warm-up),
- ``loss_cls`` / ``loss_box_ib``: beta-weighted class / location terms (ROI heads),
- ``loss_sop``: gamma * J2 (0 during warm-up),
- ``loss_rpn_cls`` / ``loss_rpn_loc``: the RPN's own objective (it is trained by it, as in
  the paper's iterative RPN / refinement training).

With a plain ``StandardROIHeads`` the ROI losses are detectron2's (no beta, no SOP).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import ImageList

from .objective import BiDetObjective
from .roi_heads import BiDetROIHeads

__all__ = ["BiDetRCNN"]


@META_ARCH_REGISTRY.register()
class BiDetRCNN(GeneralizedRCNN):
    """GeneralizedRCNN + ``bidet`` (:class:`BiDetObjective`). Box detection only.

    Args:
        bidet: the shared BiDet objective (bottleneck, beta, estimator, warm-up).
        other arguments: as ``GeneralizedRCNN``.
    """

    @configurable
    def __init__(self, *, bidet: BiDetObjective, **kwargs):
        super().__init__(**kwargs)
        self.bidet = bidet

    @classmethod
    def from_config(cls, cfg) -> dict:
        ret = super().from_config(cfg)
        ret["bidet"] = BiDetObjective(cfg, ret["backbone"].output_shape())
        return ret

    def _features(self, images: ImageList):
        return self.bidet(self.backbone(images.tensor))

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Training: the loss dict above. Eval: ``inference`` (deterministic features)."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features, kl = self._features(images)
        active = self.bidet.active()
        n = len(batched_inputs)
        if active:
            real = (self.bidet.real_images(images.tensor, self.pixel_mean, self.pixel_std)
                    if self.bidet.estimator is not None else None)
            betas = self.bidet.image_betas(features, real, n, self.device)
        else:
            betas = torch.ones(n, device=self.device)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        if isinstance(self.roi_heads, BiDetROIHeads):
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances,
                                                image_weights=betas,
                                                sop_weight=1.0 if active else 0.0)
        else:
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses = {"loss_ib_feature": kl.mean() * (1.0 if active else 0.0)}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        return losses

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]],
                  detected_instances: Optional[list] = None, do_postprocess: bool = True):
        """As GeneralizedRCNN.inference, on the deterministic (binarized) features."""
        assert not self.training
        if detected_instances is not None:
            raise NotImplementedError("BiDetRCNN.inference: detected_instances is not supported")
        images = self.preprocess_image(batched_inputs)
        features, _ = self._features(images)
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        if do_postprocess:
            return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
        return results

    @torch.no_grad()
    def estimator_inputs(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """(feature map, real images) for the complexity estimator's own training steps.

        One extra backbone forward without gradient, in the model's current mode (training:
        sampled features, as the detector sees them; BatchNorm running statistics get one more
        update from the same batch)."""
        images = self.preprocess_image(batched_inputs)
        features, _ = self._features(images)
        real = self.bidet.real_images(images.tensor, self.pixel_mean, self.pixel_std)
        return features[self.bidet.in_feature], real
