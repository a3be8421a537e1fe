"""BiDet / AutoBiDet (paper 000 sec. 3, appendix 001): information-bottleneck feature sampling,
class / location information terms, sparse object priors (SOP, C-SOP), the complexity
estimator with the eq. 10 beta transforms, and the detectors that use them.

Importing registers ``BiDetRCNN`` and ``BiDetSSD`` (META_ARCH_REGISTRY), ``BiDetROIHeads``
(ROI_HEADS_REGISTRY), ``BiDetRPN`` (PROPOSAL_GENERATOR_REGISTRY) and ``BiDetRPNHead``
(RPN_HEAD_REGISTRY). The loss functions in :mod:`.losses` are plain tensor functions that
any detector can add to its loss dict.
"""
from .bottleneck import FeatureBottleneck
from .estimator import ComplexityEstimator, Discriminator, Generator, trainable
from .losses import (beta_transform, binomial_kl, categorical_kl, csop_loss, gaussian_kl,
                     location_info_loss, sop_loss, sparse_object_prior)
from .objective import BiDetObjective
from .rcnn import BiDetRCNN
from .roi_heads import BiDetFastRCNNOutputLayers, BiDetROIHeads
from .rpn import BiDetRPN, BiDetRPNHead, rpn_to_roi_logvar, select_rpn_proposals
from .ssd import BiDetSSD, BiDetSSDHead

__all__ = ["BiDetFastRCNNOutputLayers", "BiDetObjective", "BiDetRCNN", "BiDetROIHeads",
           "BiDetRPN", "BiDetRPNHead", "BiDetSSD", "BiDetSSDHead",
           "ComplexityEstimator", "Discriminator", "FeatureBottleneck", "Generator",
           "beta_transform", "binomial_kl", "categorical_kl", "csop_loss", "gaussian_kl",
           "location_info_loss", "rpn_to_roi_logvar", "select_rpn_proposals", "sop_loss",
           "sparse_object_prior", "trainable"]
