"""Shared helpers of the backbone-pretraining tests (issue 17)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from tests.conftest import REPO

PRETRAIN_DIR = REPO / "configs" / "Pretrain"
TOOL = REPO / "tools" / "pretrain_backbone.py"


def tiny_pretrain_opts(output_dir, max_iter: int = 2, size: int = 32) -> List[str]:
    """Overrides that turn a pretraining CPU twin into a seconds-long run: the tiny embedded
    classification set (32-pixel crops), batch 4, no warmup / steps, evaluation batch 8."""
    return [
        "DATASETS.TRAIN", "('aqd_shapes_cls_tiny_train',)",
        "DATASETS.TEST", "('aqd_shapes_cls_tiny_val',)",
        "MODEL.DEVICE", "cpu", "MODEL.CLS.NUM_CLASSES", "6",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1",
        "AQD.PRETRAIN.TRAIN_SIZE", str(size), "AQD.PRETRAIN.TEST_RESIZE", str(size),
        "AQD.PRETRAIN.TEST_SIZE", str(size), "AQD.PRETRAIN.TEST_IMS_PER_BATCH", "8",
        "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output_dir),
    ]


def pretrain_cfg(config: Path, opts=()):
    """A validated pretraining config (not frozen): ``config`` + ``opts``."""
    from detectron2.config import get_cfg

    from aqd_d2.config import add_aqd_config, validate_aqd_config

    cfg = add_aqd_config(get_cfg())
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(opts))
    validate_aqd_config(cfg)
    return cfg
