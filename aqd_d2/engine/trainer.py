"""aqd_d2's Trainer: detectron2's DefaultTrainer with evaluators chosen from the dataset.

Everything a model needs is built through detectron2's registries, and aqd_d2's detectors
carry their training schedules (stage-wise binarization, filter pruning) themselves, so the
stock ``DefaultTrainer`` trains every aqd_d2 detector too, or refuses one whose config needs
a trainer feature it lacks (:mod:`aqd_d2.modeling.training_features`; a project's own
trainer gets those with :func:`aqd_d2.engine.setup`). This subclass adds what DefaultTrainer
leaves abstract (``build_evaluator``), the optimizer choice ``SOLVER.OPTIMIZER`` (SGD / Adam /
AdamW; DefaultTrainer always builds SGD), the training loop / mapper registries, exact resume,
and works without detectron2's compiled ops (plain pycocotools COCOeval when
``detectron2._C`` is absent). ``AQD.EVALUATOR "none"`` trains without evaluating.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)

from .. import compat
from ..pruning.schedule import PRUNING_ATTR
from ..utils import unwrap_model
from ..data.mappers import build_aqd_test_loader, build_aqd_train_loader
from .checkpoint import AQDCheckpointer
from .optimizer import build_optimizer as _build_optimizer
from .python_state import collect_python_state, restore_python_state
from .stage_hook import build_aqd_hooks
from .step_seed import StepSeedHook
from .train_loop import build_train_loop

__all__ = ["Trainer", "build_evaluator"]

logger = logging.getLogger(__name__)

# detectron2 0.6's DefaultTrainer checkpoints only the iteration and hook states (scheduler),
# not the optimizer: Trainer adds the loop's state (optimizer, non-finite counters) itself
# unless the installed detectron2 does.
_D2_SAVES_LOOP = "state_dict" in DefaultTrainer.__dict__


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``.

    ``cfg.AQD.EVALUATOR == "auto"`` picks it from the dataset's metadata ``evaluator_type``
    ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator, the latter
    reporting VOC07 11-point AP50 and area AP); "coco" / "pascal_voc" force one. ``"none"``
    means no evaluation (:meth:`Trainer.test` then evaluates nothing): there is no evaluator
    to build.

    Raises:
        ValueError: ``AQD.EVALUATOR`` is "none", or no evaluator fits the dataset (naming it).
    """
    kind = cfg.AQD.EVALUATOR
    if kind == "none":
        raise ValueError(f"AQD.EVALUATOR is 'none' (evaluation off): no evaluator for "
                         f"{dataset_name!r}; Trainer.test evaluates nothing under this setting")
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


def _broadcast_buffers_from_rank0(model) -> None:
    """Copy rank 0's floating-point/integer buffers to every rank (no-op in one process).

    The pruning schedule's state is not copied: every rank instead applies the pruning step
    due after the last training step itself (rank 0 may have applied it already, when it saved
    a checkpoint), so each rank's counters keep describing its own weights (which the step
    makes equal to rank 0's)."""
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    module = unwrap_model(model)
    pruning = getattr(module, PRUNING_ATTR, None)
    skip = set()
    if pruning is not None:
        pruning.catch_up(module)
        skip = {id(b) for b in pruning.buffers()}
    for buf in module.buffers():
        if buf.dtype != torch.bool and id(buf) not in skip:
            dist.broadcast(buf.data, src=0)


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
        # aqd_d2's hooks (the GAN loop's state) run before detectron2's defaults; the
        # per-iteration reseeding (exact resume) first of all. Stage-wise binarization and
        # pruning need no hook: the model carries them (aqd_d2.modeling.training_features).
        first = []
        if self.cfg.AQD.EXACT_RESUME:
            seed = self.cfg.SEED if self.cfg.SEED >= 0 else comm.shared_random_seed()
            first.append(StepSeedHook(seed))
        return first + build_aqd_hooks(self.cfg, self) + super().build_hooks()

    def train(self):
        """DefaultTrainer.train; under ``AQD.EXACT_RESUME`` without TorchScript's executor
        optimisations: detectron2's losses call scripted functions (fvcore's focal loss,
        Box2BoxTransform) whose optimised graphs (built after the first calls in a process,
        with their own symbolic gradients) round differently from the first, unoptimised
        calls, so a resumed process would differ from an uninterrupted one in the last bits."""
        if not self.cfg.AQD.EXACT_RESUME:
            return super().train()
        with torch.jit.optimized_execution(False):
            return super().train()

    def state_dict(self) -> dict:
        """detectron2's trainer state + the loop's (optimizer, ...) + the loader position."""
        ret = super().state_dict()
        if not _D2_SAVES_LOOP:
            ret["_trainer"] = self._trainer.state_dict()
        if hasattr(self.data_loader, "state_dict"):
            ret["data_loader"] = self.data_loader.state_dict()
        ret["model_python_state"] = collect_python_state(self.model)  # EMA loss normalisers
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if not _D2_SAVES_LOOP and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "data_loader" in state_dict and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(state_dict["data_loader"])
        restore_python_state(self.model, state_dict.get("model_python_state", {}))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """The optimizer named by ``SOLVER.OPTIMIZER`` (:mod:`aqd_d2.engine.optimizer`)."""
        return _build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader with the mapper named by ``INPUT.TRAIN_MAPPER``."""
        return build_aqd_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; with several processes every rank first takes rank 0's buffers.

        detectron2 wraps the model in DDP without buffer broadcasting, so BN running
        statistics are rank-local: each rank would evaluate its shard of the test set with a
        different model, and the gathered result would match no checkpoint (rank 0 saves its
        own). Training is unaffected (train-mode BN normalises by batch statistics).

        Under ``AQD.EVALUATOR "none"`` without explicit ``evaluators`` nothing is run and the
        result is empty (training then ends normally, without evaluation).
        """
        if evaluators is None and cfg.AQD.EVALUATOR == "none":
            if len(cfg.DATASETS.TEST):
                logger.info("AQD.EVALUATOR is 'none': not evaluating %s", list(cfg.DATASETS.TEST))
            return OrderedDict()
        _broadcast_buffers_from_rank0(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader; bad images named or skipped (``AQD.BAD_INPUT``)."""
        return build_aqd_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return DatasetEvaluators([build_evaluator(cfg, dataset_name, output_folder)])
