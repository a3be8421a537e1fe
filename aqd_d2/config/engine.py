"""Keys read by aqd_d2.engine, and MODEL.DEVICE."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice  # noqa: F401


def add_config(cfg: CN) -> None:
    """Keys read by aqd_d2.engine (trainer, hooks)."""
    _C = cfg
    _C.AQD = CN()
    # Evaluator for the test datasets: "auto" picks it from the dataset's metadata
    # evaluator_type ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator).
    _C.AQD.EVALUATOR = "auto"
    # Training loop (aqd_d2.engine.train_loop.TRAIN_LOOP_REGISTRY, class names): "AQDTrainLoop" is detectron2's
    # SimpleTrainer step; detectors with extra optimisers (AutoBiDet's GAN) register their own.
    # AMP (SOLVER.AMP.ENABLED) is not combined with these loops.
    _C.AQD.TRAIN_LOOP = "AQDTrainLoop"
    # Training dataset mapper (aqd_d2.data.mappers.TRAIN_MAPPER_REGISTRY): "DatasetMapper" is
    # detectron2's; SSD registers its augmentation mapper.
    _C.INPUT.TRAIN_MAPPER = "DatasetMapper"


def validate(cfg: CN) -> None:
    """Check AQD.EVALUATOR and MODEL.DEVICE."""
    check_choice(cfg, "AQD.EVALUATOR", {"auto", "coco", "pascal_voc", "none"})
    from ..data.mappers import TRAIN_MAPPER_REGISTRY
    from ..engine.train_loop import TRAIN_LOOP_REGISTRY

    check_choice(cfg, "AQD.TRAIN_LOOP", [k for k, _ in TRAIN_LOOP_REGISTRY])
    check_choice(cfg, "INPUT.TRAIN_MAPPER", [k for k, _ in TRAIN_MAPPER_REGISTRY])
    _validate_device(cfg)


def _validate_device(cfg: CN) -> None:
    import torch

    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"MODEL.DEVICE = {device!r} but CUDA is not available on this machine; "
            "add `MODEL.DEVICE cpu` to the command line"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"MODEL.DEVICE = {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
