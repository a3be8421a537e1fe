"""Keys read by aqd_d2.engine, and MODEL.DEVICE."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice  # noqa: F401


def add_config(cfg: CN) -> None:
    """Keys read by aqd_d2.engine (trainer, hooks)."""
    _C = cfg
    _C.AQD = CN()
    # Evaluator for the test datasets: "auto" picks it from the dataset's metadata
    # evaluator_type ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator);
    # "none" trains without evaluating.
    _C.AQD.EVALUATOR = "auto"
    # Training loop (aqd_d2.engine.train_loop.TRAIN_LOOP_REGISTRY, class names): "AQDTrainLoop" is detectron2's
    # SimpleTrainer step; detectors with extra optimisers (AutoBiDet's GAN) register their own.
    # AMP (SOLVER.AMP.ENABLED) is not combined with these loops.
    _C.AQD.TRAIN_LOOP = "AQDTrainLoop"
    # Training dataset mapper (aqd_d2.data.mappers.TRAIN_MAPPER_REGISTRY): "DatasetMapper" is
    # detectron2's; SSD registers its augmentation mapper.
    _C.INPUT.TRAIN_MAPPER = "DatasetMapper"
    # Detector optimizer built by aqd_d2's Trainer (aqd_d2.engine.optimizer): "SGD"
    # (detectron2's: MOMENTUM, NESTEROV), "Adam" (BiDet / AutoBiDet, paper 000 sec. 4.1) or
    # "AdamW". Built by aqd_d2's Trainer / aqd_d2.engine.build_optimizer / aqd_d2.engine.setup;
    # a detector whose config names Adam/AdamW refuses to train under a trainer that built SGD.
    _C.SOLVER.OPTIMIZER = "SGD"
    # MODEL.WEIGHTS names a local file that does not exist (train_net.py / aqd-train): "raise"
    # stops with an error naming it and how to make it; "scratch" logs one line and trains
    # from random initialisation (the CPU twins, whose float checkpoint is written by their
    # *-FP twin into OUTPUT_DIR relative to the working directory).
    _C.AQD.MISSING_WEIGHTS = "raise"
    # Adam / AdamW (beta1, beta2) and epsilon; ignored by SGD.
    _C.SOLVER.ADAM_BETAS = (0.9, 0.999)
    _C.SOLVER.ADAM_EPS = 1e-8


def validate(cfg: CN) -> None:
    """Check AQD.EVALUATOR, AQD.MISSING_WEIGHTS, AQD.TRAIN_LOOP, INPUT.TRAIN_MAPPER, SOLVER.OPTIMIZER / ADAM_* and MODEL.DEVICE."""
    check_choice(cfg, "AQD.EVALUATOR", {"auto", "coco", "pascal_voc", "none"})
    check_choice(cfg, "AQD.MISSING_WEIGHTS", {"raise", "scratch"})
    from ..data.mappers import TRAIN_MAPPER_REGISTRY
    from ..engine.train_loop import TRAIN_LOOP_REGISTRY

    check_choice(cfg, "AQD.TRAIN_LOOP", [k for k, _ in TRAIN_LOOP_REGISTRY])
    check_choice(cfg, "INPUT.TRAIN_MAPPER", [k for k, _ in TRAIN_MAPPER_REGISTRY])
    _validate_optimizer(cfg)
    _validate_device(cfg)


def _validate_optimizer(cfg: CN) -> None:
    from ..engine.optimizer import OPTIMIZERS

    check_choice(cfg, "SOLVER.OPTIMIZER", OPTIMIZERS)
    betas = cfg.SOLVER.ADAM_BETAS
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"SOLVER.ADAM_BETAS = {betas!r}; expected two numbers in [0, 1), "
                          "e.g. (0.9, 0.999)")
    eps = cfg.SOLVER.ADAM_EPS
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"SOLVER.ADAM_EPS = {eps!r}; expected a positive number, e.g. 1e-8")


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
