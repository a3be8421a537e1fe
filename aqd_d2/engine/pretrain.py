"""``PretrainTrainer``: aqd_d2's Trainer for backbone pretraining on image classification
(issue 17). Everything detectron2's engine gives the detectors (hooks, periodic checkpoints,
``--resume``, logging, ``--num-gpus``, exact resume, the optimizer choice) is inherited; only
the data (ImageNet-layout folders, :mod:`aqd_d2.data.classification`) and the evaluator
(top-k accuracy, :class:`~aqd_d2.engine.classification_eval.ClassificationEvaluator`) differ.
The model is whatever ``MODEL.META_ARCHITECTURE`` builds: ``ImageClassifier`` (float) or
``QuantizedDetector`` over it (``MODEL.QUANT``).
"""
from __future__ import annotations

import torch
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler
from detectron2.evaluation import DatasetEvaluators

from ..data.classification import ClassificationMapper
from ..data.resumable_loader import resumable_loader_from_config
from .checkpoint import BACKBONE_CHECKPOINT_KEY
from .classification_eval import ClassificationEvaluator
from .trainer import Trainer

__all__ = ["PretrainTrainer", "build_classification_train_loader",
           "build_classification_test_loader", "backbone_checkpoint_marker"]


def backbone_checkpoint_marker(cfg) -> dict:
    """The entry every pretraining checkpoint carries (``BACKBONE_CHECKPOINT_KEY``): which
    backbone it holds and which key prefixes are the classifier head, so that a detector's
    checkpointer (:class:`~aqd_d2.engine.checkpoint.AQDCheckpointer`) checks the backbone part
    fits instead of asking the whole detector to match."""
    return {BACKBONE_CHECKPOINT_KEY: {"backbone": cfg.MODEL.BACKBONE.NAME,
                                      "head_prefixes": ["cls_head."],
                                      "renames": list(cfg.MODEL.CLS.STATE_DICT_RENAMES)}}


def _list_collate(batch):
    return batch


def build_classification_train_loader(cfg):
    """The training loader of ``DATASETS.TRAIN`` with :class:`ClassificationMapper`: the
    exact-resume loader under ``AQD.EXACT_RESUME`` (position-seeded augmentation, skips the
    consumed batches on resume), else detectron2's ``build_detection_train_loader``."""
    mapper = ClassificationMapper(cfg, is_train=True)
    if cfg.AQD.EXACT_RESUME:
        return resumable_loader_from_config(cfg, mapper)
    dicts = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    return build_detection_train_loader(
        dataset=dicts, mapper=mapper, total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS)


def build_classification_test_loader(cfg, dataset_name: str):
    """Evaluation loader: ``AQD.PRETRAIN.TEST_IMS_PER_BATCH`` images per batch, each rank a
    contiguous share (detectron2's ``InferenceSampler``), test-time resize + center crop."""
    dataset = MapDataset(DatasetFromList(DatasetCatalog.get(dataset_name), copy=False),
                         ClassificationMapper(cfg, is_train=False))
    batches = torch.utils.data.BatchSampler(InferenceSampler(len(dataset)),
                                            cfg.AQD.PRETRAIN.TEST_IMS_PER_BATCH, drop_last=False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_list_collate,
                                       num_workers=cfg.DATALOADER.NUM_WORKERS)


class PretrainTrainer(Trainer):
    """aqd_d2's :class:`~aqd_d2.engine.trainer.Trainer` with classification data and
    top-k evaluation (module docstring)."""

    def build_hooks(self):
        hooks = super().build_hooks()  # creates the AQDCheckpointer the hooks save with
        self.checkpointer.extra_state.update(backbone_checkpoint_marker(self.cfg))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        return build_classification_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_classification_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return DatasetEvaluators([ClassificationEvaluator(dataset_name, cfg.AQD.PRETRAIN.TOPK)])
