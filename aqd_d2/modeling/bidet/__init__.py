"""BiDet / AutoBiDet (paper 000 sec. 3, appendix 001): information-bottleneck feature sampling,
class / location information terms, sparse object priors (SOP, C-SOP), the complexity
estimator with the eq. 10 beta transforms, and the detectors that use them.

Importing registers ``BiDetRCNN`` and ``BiDetSSD`` (META_ARCH_REGISTRY) and ``BiDetROIHeads``
(ROI_HEADS_REGISTRY). The loss functions in :mod:`.losses` are plain tensor functions that
any detector can add to its loss dict.
"""
from .bottleneck import FeatureBottleneck
from .estimator import ComplexityEstimator, Discriminator, Generator, trainable
from .losses import (beta_transform, binomial_kl, categorical_kl, csop_loss, gaussian_kl,
                     location_info_loss, sop_loss, sparse_object_prior)
from .objective import BiDetObjective
from .rcnn import BiDetRCNN
from .roi_heads import BiDetFastRCNNOutputLayers, BiDetROIHeads
from .ssd import BiDetSSD, BiDetSSDHead

__all__ = ["BiDetFastRCNNOutputLayers", "BiDetObjective", "BiDetRCNN", "BiDetROIHeads", "BiDetSSD", "BiDetSSDHead",
           "ComplexityEstimator", "Discriminator", "FeatureBottleneck", "Generator",
           "beta_transform", "binomial_kl", "categorical_kl", "csop_loss", "gaussian_kl",
           "location_info_loss", "sop_loss", "sparse_object_prior", "trainable"]
