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


def validate(cfg: CN) -> None:
    """Check AQD.EVALUATOR and MODEL.DEVICE."""
    check_choice(cfg, "AQD.EVALUATOR", {"auto", "coco", "pascal_voc", "none"})
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
