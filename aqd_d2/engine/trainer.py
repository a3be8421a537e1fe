"""aqd_d2's Trainer: detectron2's DefaultTrainer with evaluators chosen from the dataset.

Everything a model needs is built through detectron2's registries, so the stock
``DefaultTrainer`` trains every aqd_d2 detector too; this subclass only adds what
DefaultTrainer leaves abstract (``build_evaluator``) and works without detectron2's compiled
ops (plain pycocotools COCOeval when ``detectron2._C`` is absent).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)

from .. import compat
from ..data.mappers import build_aqd_train_loader
from .checkpoint import AQDCheckpointer
from .stage_hook import build_aqd_hooks
from .train_loop import build_train_loop

__all__ = ["Trainer", "build_evaluator"]

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``.

    ``cfg.AQD.EVALUATOR == "auto"`` picks it from the dataset's metadata ``evaluator_type``
    ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator, the latter
    reporting VOC07 11-point AP50 and area AP); "coco" / "pascal_voc" force one.

    Raises:
        ValueError: naming the dataset when no evaluator fits it.
    """
    kind = cfg.AQD.EVALUATOR
    if kind == "auto":
        kind = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    if kind == "coco":
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=compat.has_compiled_ops()
        )
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    raise ValueError(
        f"no evaluator for dataset {dataset_name!r}: its metadata evaluator_type is {kind!r}; "
        "set AQD.EVALUATOR to 'coco' or 'pascal_voc', or register the dataset with "
        "evaluator_type"
    )


class Trainer(DefaultTrainer):
    """DefaultTrainer + evaluator selection (see :func:`build_evaluator`) + atomic,
    validated checkpoints (:class:`~aqd_d2.engine.checkpoint.AQDCheckpointer`)."""

    def build_hooks(self):
        # DefaultTrainer.__init__ creates self.checkpointer just before building the hooks;
        # swap in the atomic/validating checkpointer with the same checkpointables so the
        # PeriodicCheckpointer hook and resume_or_load both use it.
        old = self.checkpointer
        self.checkpointer = AQDCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        # The training loop named by AQD.TRAIN_LOOP replaces SimpleTrainer (same model, data
        # loader and optimizer objects, so the scheduler and checkpointer stay valid).
        if self.cfg.SOLVER.AMP.ENABLED and self.cfg.AQD.TRAIN_LOOP != "AQDTrainLoop":
            raise ValueError(f"SOLVER.AMP.ENABLED cannot be combined with AQD.TRAIN_LOOP = "
                             f"{self.cfg.AQD.TRAIN_LOOP!r}")
        if not self.cfg.SOLVER.AMP.ENABLED:
            t = self._trainer
            self._trainer = build_train_loop(self.cfg, t.model, t.data_loader, t.optimizer,
                                             data_iter=t._data_loader_iter)
        # aqd_d2's hooks (stage-wise binarization, ...) run before detectron2's defaults.
        return build_aqd_hooks(self.cfg, self) + super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader with the mapper named by ``INPUT.TRAIN_MAPPER``."""
        return build_aqd_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return DatasetEvaluators([build_evaluator(cfg, dataset_name, output_folder)])
