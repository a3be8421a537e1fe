"""``QuantizedDetector``: the registry entry through which detectron2 builds quantized models.

``cfg.MODEL.META_ARCHITECTURE = "QuantizedDetector"`` makes detectron2's own
``build_model(cfg)`` (and so ``DefaultTrainer``) build the float detector named by
``cfg.MODEL.QUANT.META_ARCHITECTURE`` from ``META_ARCH_REGISTRY`` and, when
``MODEL.QUANT.ENABLED``, convert it with :func:`aqd_d2.convert.quantize_model`.

It is a plain builder function, not a wrapper module: it returns the float detector object
itself (converted in place), so the model's class, its ``forward`` and its state_dict keys are
those of the float detector (plus ``*_quantizer.*`` entries, and ``filter_pruning.*`` when the
config prunes) and float checkpoints load.

It also attaches what the config asks of training
(:func:`aqd_d2.modeling.training_features.attach_training_features`): the stage-wise
binarization and filter pruning schedules, applied by the model itself at each training
forward, and a clear refusal to train under a trainer that lacks a feature only a trainer can
give (optimizer, training loop, data mapper). So the yaml alone decides what trains, with
detectron2's stock ``DefaultTrainer`` as with aqd_d2's ``Trainer``.
"""
from __future__ import annotations

import logging

from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from aqd_d2.config import ConfigError, validate_aqd_config
from aqd_d2.convert import QuantPolicy, quantize_model

from ..training_features import attach_training_features

__all__ = ["QuantizedDetector"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
def QuantizedDetector(cfg: CfgNode) -> nn.Module:  # noqa: N802 (registry name)
    """Build ``cfg.MODEL.QUANT.META_ARCHITECTURE`` and quantize it per ``cfg.MODEL.QUANT``.

    Args:
        cfg: a config with aqd_d2's keys (:func:`aqd_d2.add_aqd_config`).
    Returns:
        the float meta-architecture instance, converted in place when MODEL.QUANT.ENABLED.
        Its ``quant_report`` attribute holds the :class:`~aqd_d2.convert.ConversionReport`
        (None when not enabled); it is a plain attribute set here, never in ``forward``.
        ``training_features`` (and ``filter_pruning`` when pruning) hold the training
        schedules and trainer requirements of ``cfg``.
    Raises:
        ConfigError: invalid MODEL.QUANT values, a policy that does not fit the model, or a
            stage-binarization group / pruning rule that matches nothing in it.
    """
    validate_aqd_config(cfg)
    name = cfg.MODEL.QUANT.META_ARCHITECTURE
    if name == "QuantizedDetector":
        raise ConfigError(
            "MODEL.QUANT.META_ARCHITECTURE must name the float detector (e.g. 'RetinaNet'), "
            "not 'QuantizedDetector'"
        )
    if name not in META_ARCH_REGISTRY:
        raise ConfigError(
            f"MODEL.QUANT.META_ARCHITECTURE = {name!r} is not in detectron2's "
            f"META_ARCH_REGISTRY; registered: {sorted(k for k, _ in META_ARCH_REGISTRY)}"
        )
    model = META_ARCH_REGISTRY.get(name)(cfg)
    report = None
    if cfg.MODEL.QUANT.ENABLED:
        report = quantize_model(model, QuantPolicy.from_config(cfg))
        logger.info("Quantized %s (MODEL.QUANT):\n%s", name, report.table())
    else:
        logger.info("MODEL.QUANT.ENABLED is False: %s stays full precision", name)
    model.quant_report = report
    return attach_training_features(model, cfg)
