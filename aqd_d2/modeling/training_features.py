"""What a detector's config asks of its training, carried by the detector itself.

A user who builds an aqd_d2 detector with detectron2's own ``build_model`` / stock
``DefaultTrainer`` must get the method the yaml describes, or a clear refusal, never a
different method in silence. The registered ``QuantizedDetector`` builder therefore calls
:func:`attach_training_features`, which gives the detector

* the **schedules** that can live in the model, applied by a forward pre-hook before every
  training forward with the iteration of detectron2's event storage (every detectron2
  trainer keeps one; the outermost storage counts, see :func:`_storage_iteration`; without
  one, e.g. a unit test calling the model, nothing is applied):
  stage-wise binarization (:class:`~aqd_d2.modeling.stage_schedule.StageSchedule`,
  ``AQD.STAGE_BINARIZATION``) and filter pruning
  (:class:`~aqd_d2.pruning.schedule.FilterPruningSchedule`, submodule ``filter_pruning``,
  ``AQD.PRUNING``; it also catches up in eval forwards and before ``state_dict()``);
* a **refusal** for what only a trainer can provide (:data:`TRAINER_FEATURES`): a non-SGD
  ``SOLVER.OPTIMIZER``, a training loop other than the plain step (``AQD.TRAIN_LOOP``, e.g.
  AutoBiDet's GAN) and a training mapper other than detectron2's ``DatasetMapper``
  (``INPUT.TRAIN_MAPPER``, e.g. SSD's augmentation). On the first training batch read from a
  dataset (detectron2 dataset dicts carry ``file_name``) the pre-hook raises
  :class:`TrainerSetupError`, naming each missing feature and the two ways out, unless the
  feature is there:

  - the optimizer and the loop are marked on the model by what provides them
    (:func:`mark_trainer_setup`: ``aqd_d2.engine.build_optimizer``, the ``BiDetGANLoop``
    constructor, ``aqd_d2.engine.setup(trainer)``);
  - the mapper marks every dict it maps (``aqd_d2.data.mappers.TRAIN_MAPPER_TAG``), so the
    check reads the batch itself.

Batches built in memory (no ``file_name``) are not checked: whoever feeds them drives the
training themselves.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from aqd_d2.config import get_key
from aqd_d2.data.mappers import TRAIN_MAPPER_TAG
from aqd_d2.pruning.schedule import PRUNING_ATTR, FilterPruningSchedule, pruning_rule_from_config
from aqd_d2.utils import unwrap_model

from .stage_schedule import StageSchedule

__all__ = ["TRAINER_FEATURES", "TrainerSetupError", "TrainingFeatures", "attach_training_features",
           "mark_trainer_setup", "trainer_requirements", "trainer_setup_marks"]

#: config key -> (the value detectron2's stock DefaultTrainer gives, what the feature is)
TRAINER_FEATURES: Dict[str, tuple] = {
    "SOLVER.OPTIMIZER": (
        "SGD", "the detector's optimizer (detectron2's DefaultTrainer.build_optimizer always "
               "builds SGD)"),
    "AQD.TRAIN_LOOP": (
        "AQDTrainLoop", "the training loop (BiDetGANLoop: AutoBiDet's complexity-estimator "
                        "GAN steps after each detector step; DefaultTrainer runs detectron2's "
                        "plain SimpleTrainer step)"),
    "INPUT.TRAIN_MAPPER": (
        "DatasetMapper", "the training data mapper (SSDMapper: SSD's photometric distortion, "
                         "zoom-out and IoU crop to a fixed square; DefaultTrainer maps with "
                         "detectron2's DatasetMapper)"),
}

_MARKS_ATTR = "_aqd_trainer_setup"


class TrainerSetupError(RuntimeError):
    """A detector is trained without a training feature its config needs (see module doc)."""


def trainer_requirements(cfg) -> Dict[str, str]:
    """The :data:`TRAINER_FEATURES` whose value in ``cfg`` differs from stock detectron2's."""
    out = {}
    for key, (stock, _) in TRAINER_FEATURES.items():
        value = get_key(cfg, key)
        if value != stock:
            out[key] = str(value)
    return out


def mark_trainer_setup(model: nn.Module, key: str, value: str) -> None:
    """Record on ``model`` that its trainer provides ``key = value`` (e.g. the optimizer it
    built is ``SOLVER.OPTIMIZER = "Adam"``). Called by what provides the feature.

    Raises:
        KeyError: ``key`` is not one of :data:`TRAINER_FEATURES`.
    """
    if key not in TRAINER_FEATURES:
        raise KeyError(f"{key!r} is not a trainer feature; known: {sorted(TRAINER_FEATURES)}")
    model = unwrap_model(model)
    marks = model.__dict__.get(_MARKS_ATTR)
    if marks is None:
        marks = {}
        object.__setattr__(model, _MARKS_ATTR, marks)
    marks[key] = str(value)


def trainer_setup_marks(model: nn.Module) -> Dict[str, str]:
    """What :func:`mark_trainer_setup` recorded on ``model`` (a copy)."""
    return dict(unwrap_model(model).__dict__.get(_MARKS_ATTR, {}))


def _storage_iteration() -> Optional[int]:
    """The training run's iteration: that of the *outermost* event storage (the trainer's;
    hooks such as detectron2's PreciseBN run training-mode forwards inside a fresh nested
    storage that restarts at 0). None outside any storage."""
    from detectron2.utils import events

    stack = getattr(events, "_CURRENT_STORAGE_STACK", None)
    if isinstance(stack, list):
        return int(stack[0].iter) if stack else None
    try:  # a detectron2 without the storage stack: the current storage
        return int(events.get_event_storage().iter)
    except AssertionError:  # "get_event_storage() has to be called inside ..."
        return None


def _dataset_record(args) -> Optional[dict]:
    """The first input dict when the batch was read from a dataset (it has ``file_name``)."""
    batch = args[0] if args else None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict) \
            and "file_name" in batch[0]:
        return batch[0]
    return None


class TrainingFeatures:
    """The detector's forward pre-hook and state_dict pre-hook (see module doc).

    Args:
        requirements: :func:`trainer_requirements` of the detector's config.
        stage: the stage-wise binarization schedule, or None.
    The pruning schedule is the detector's ``filter_pruning`` submodule (looked up at each
    call, so :func:`aqd_d2.pruning.compact.remove_pruned_channels` can update it).
    """

    def __init__(self, requirements: Dict[str, str], stage: Optional[StageSchedule] = None):
        self.requirements = dict(requirements)
        self.stage = stage

    def __call__(self, module: nn.Module, args) -> None:
        pruning = getattr(module, PRUNING_ATTR, None)
        if not module.training:
            if pruning is not None:
                pruning.catch_up(module)
            return None
        iteration = _storage_iteration()
        if iteration is None:
            return None  # not a training run: the caller drives the model
        record = _dataset_record(args)
        if self.requirements and record is not None:
            self.check(module, record)
        if self.stage is not None:
            self.stage.apply(module, iteration)
        if pruning is not None:
            pruning.before_training_forward(module, iteration, from_dataset=record is not None)
        return None

    def before_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        """A checkpoint holds the pruning state after the last step (see the schedule)."""
        pruning = getattr(module, PRUNING_ATTR, None)
        if pruning is not None:
            pruning.catch_up(module)

    def missing(self, module: nn.Module, record: dict) -> List[str]:
        """One line per required feature that this trainer / batch does not provide."""
        marks = trainer_setup_marks(module)
        lines = []
        for key, value in self.requirements.items():
            what = TRAINER_FEATURES[key][1]
            if key == "INPUT.TRAIN_MAPPER":
                got = record.get(TRAIN_MAPPER_TAG)
                if got != value:
                    src = (f"mapped by {got!r}" if got else "not mapped by an aqd_d2 train "
                           "mapper (detectron2's DatasetMapper?)")
                    lines.append(f"{key} = {value!r}: {what}; this batch was {src}")
            elif marks.get(key) != value:
                have = f" (the trainer set up {marks[key]!r})" if key in marks else ""
                lines.append(f"{key} = {value!r}: {what}{have}")
        return lines

    def check(self, module: nn.Module, record: dict) -> None:
        """Raise :class:`TrainerSetupError` if a required feature is missing."""
        lines = self.missing(module, record)
        if lines:
            raise TrainerSetupError(
                "this detector's config needs training features that the trainer running it "
                "did not set up, so it would silently train a different method:\n  - "
                + "\n  - ".join(lines)
                + "\nEither train with aqd_d2's Trainer (aqd_d2.engine.Trainer; train_net.py / "
                "aqd-train), or call aqd_d2.engine.setup(trainer) on your detectron2 "
                "DefaultTrainer (or subclass) right after constructing it, before "
                "resume_or_load() and train(). (A training loop of your own gets them from "
                "aqd_d2.engine.build_optimizer, aqd_d2.data.build_aqd_train_loader and "
                "aqd_d2.engine.build_train_loop.)")


def attach_training_features(model: nn.Module, cfg) -> nn.Module:
    """Give ``model`` the schedules and the trainer check of ``cfg`` (see module doc).

    Sets ``model.training_features`` (:class:`TrainingFeatures`), ``model.filter_pruning``
    (a :class:`~aqd_d2.pruning.schedule.FilterPruningSchedule`, only with
    ``AQD.PRUNING.METHOD``) and registers the hooks. Called once, at build time.

    Returns:
        ``model``.
    Raises:
        ConfigError: a stage group or pruning rule matches nothing in the model.
        RuntimeError: ``model`` already has training features.
    """
    if getattr(model, "training_features", None) is not None:
        raise RuntimeError("attach_training_features: the model already has training features")
    s = cfg.AQD.STAGE_BINARIZATION
    stage = StageSchedule(model, s.GROUPS, s.ITERS) if len(s.GROUPS) else None
    rule = pruning_rule_from_config(cfg)
    if rule is not None:
        from aqd_d2.config import ConfigError

        try:
            schedule = FilterPruningSchedule(rule, model, max_iter=cfg.SOLVER.MAX_ITER,
                                             dataset_names=cfg.DATASETS.TRAIN,
                                             ims_per_batch=cfg.SOLVER.IMS_PER_BATCH)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        setattr(model, PRUNING_ATTR, schedule)
    features = TrainingFeatures(trainer_requirements(cfg), stage)
    model.training_features = features
    if stage is not None or rule is not None or features.requirements:
        model.register_forward_pre_hook(features)
    if rule is not None:
        model.register_state_dict_pre_hook(features.before_state_dict)
    return model

