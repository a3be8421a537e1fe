"""Backbone pretraining on image classification (issue 17): ``MODEL.CLS`` (the classifier
meta-architecture ``ImageClassifier``, :mod:`aqd_d2.modeling.meta_arch.classifier`) and
``AQD.PRETRAIN`` (ImageNet-layout folders and their augmentation,
:mod:`aqd_d2.data.classification`). Detection configs never read these keys.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range

__all__ = ["add_config", "validate", "parse_renames", "AUGMENTATIONS"]

#: values of AQD.PRETRAIN.TRAIN_AUGMENTATION
AUGMENTATIONS = ("RandomResizedCrop", "ResizeRandomCrop")


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""
    _C = cfg
    _C.MODEL.CLS = CN()
    # Number of classes of the classifier's fc layer; must equal the number of class folders
    # of every dataset in DATASETS.TRAIN / TEST (ImageNet: 1000).
    _C.MODEL.CLS.NUM_CLASSES = 1000
    # The backbone output that is pooled and classified; "" = the output with the largest
    # stride (the deepest one).
    _C.MODEL.CLS.IN_FEATURE = ""
    # Prefix renames "from=>to" between the classifier's module names and the names of its
    # state_dict (checkpoints), so that a checkpoint's backbone keys are the detector's:
    # "backbone.=>backbone.bottom_up." for FPN detectors, "backbone.res5.=>roi_heads.box_head.res5."
    # for the C4 detectors whose res5 runs in the ROI head. Longest "from" wins; resume reads
    # the renamed names back.
    _C.MODEL.CLS.STATE_DICT_RENAMES = []
    # Label smoothing of the cross-entropy loss (0 = plain cross-entropy).
    _C.MODEL.CLS.LABEL_SMOOTHING = 0.0
    # Knowledge distillation from a float teacher (Bi-Real-Net / Real-to-Binary practice):
    # the teacher is the classifier of TEACHER_CONFIG (a pretraining yaml; "" = this config
    # with MODEL.QUANT.ENABLED False) loaded from TEACHER_WEIGHTS (required when KD_WEIGHT > 0).
    _C.MODEL.CLS.TEACHER_CONFIG = ""
    _C.MODEL.CLS.TEACHER_WEIGHTS = ""
    # Weight w of the distillation loss: loss = (1 - w) * CE + w * T^2 * KL(teacher || student)
    # at temperature T = KD_TEMPERATURE (w = 1: the distributional loss alone, as ReActNet).
    _C.MODEL.CLS.KD_WEIGHT = 0.0
    _C.MODEL.CLS.KD_TEMPERATURE = 1.0

    _C.AQD.PRETRAIN = CN()
    # ImageNet-layout folders registered by tools/pretrain_backbone.py (also its
    # --image-folder NAME DIRECTORY): [[NAME, DIRECTORY], ...], DIRECTORY/<class>/<image>
    # read by torchvision's ImageFolder; e.g. [["imagenet_train", "/data/imagenet/train"]].
    _C.AQD.PRETRAIN.IMAGE_FOLDERS = []
    # Training crop, then a random horizontal flip: "RandomResizedCrop" (to TRAIN_SIZE pixels,
    # area scale in [MIN_SCALE, 1]; the torchvision ImageNet recipe) or "ResizeRandomCrop"
    # (shorter side to TEST_RESIZE, then a random TRAIN_SIZE crop; paper 001 appendix B.1).
    _C.AQD.PRETRAIN.TRAIN_AUGMENTATION = "RandomResizedCrop"
    _C.AQD.PRETRAIN.TRAIN_SIZE = 224
    _C.AQD.PRETRAIN.MIN_SCALE = 0.08
    # Evaluation: resize the shorter side to TEST_RESIZE, then a TEST_SIZE center crop.
    _C.AQD.PRETRAIN.TEST_RESIZE = 256
    _C.AQD.PRETRAIN.TEST_SIZE = 224
    # Images per evaluation batch (per process).
    _C.AQD.PRETRAIN.TEST_IMS_PER_BATCH = 32
    # The top-k accuracies the evaluator reports (k larger than the class count is capped).
    _C.AQD.PRETRAIN.TOPK = [1, 5]


def parse_renames(cfg: CN):
    """``MODEL.CLS.STATE_DICT_RENAMES`` as ``[(from, to), ...]``, longest ``from`` first.

    Raises:
        ConfigError: an entry is not ``"from=>to"``.
    """
    pairs = []
    for entry in cfg.MODEL.CLS.STATE_DICT_RENAMES:
        if not isinstance(entry, str) or entry.count("=>") != 1:
            raise ConfigError(f"MODEL.CLS.STATE_DICT_RENAMES entry {entry!r}: expected "
                              "'from_prefix=>to_prefix', e.g. 'backbone.=>backbone.bottom_up.'")
        src, dst = entry.split("=>")
        if not src or not dst:
            raise ConfigError(f"MODEL.CLS.STATE_DICT_RENAMES entry {entry!r}: both prefixes "
                              "must be non-empty")
        pairs.append((src, dst))
    return sorted(pairs, key=lambda p: -len(p[0]))


def validate(cfg: CN) -> None:
    """Check MODEL.CLS and AQD.PRETRAIN values."""
    c, p = cfg.MODEL.CLS, cfg.AQD.PRETRAIN
    if not isinstance(c.NUM_CLASSES, int) or c.NUM_CLASSES < 2:
        raise ConfigError(f"MODEL.CLS.NUM_CLASSES = {c.NUM_CLASSES!r}; expected an integer >= 2")
    parse_renames(cfg)
    check_range(cfg, "MODEL.CLS.LABEL_SMOOTHING", 0.0, 1.0, hi_open=True)
    check_range(cfg, "MODEL.CLS.KD_WEIGHT", 0.0, 1.0)
    check_range(cfg, "MODEL.CLS.KD_TEMPERATURE", 0.0, lo_open=True)
    if c.KD_WEIGHT > 0 and not c.TEACHER_WEIGHTS:
        raise ConfigError(f"MODEL.CLS.KD_WEIGHT = {c.KD_WEIGHT} needs a trained float teacher: "
                          "set MODEL.CLS.TEACHER_WEIGHTS (its checkpoint) and, if it is another "
                          "config than this one without quantization, MODEL.CLS.TEACHER_CONFIG")
    for entry in p.IMAGE_FOLDERS:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"AQD.PRETRAIN.IMAGE_FOLDERS entry {entry!r}: expected "
                              "[NAME, DIRECTORY]")
    for key in ("TRAIN_SIZE", "TEST_RESIZE", "TEST_SIZE", "TEST_IMS_PER_BATCH"):
        value = p[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"AQD.PRETRAIN.{key} = {value!r}; expected a positive integer")
    if p.TEST_SIZE > p.TEST_RESIZE:
        raise ConfigError(f"AQD.PRETRAIN.TEST_SIZE = {p.TEST_SIZE} is larger than TEST_RESIZE = "
                          f"{p.TEST_RESIZE}: the center crop must fit in the resized image")
    check_range(cfg, "AQD.PRETRAIN.MIN_SCALE", 0.0, 1.0, lo_open=True)
    check_choice(cfg, "AQD.PRETRAIN.TRAIN_AUGMENTATION", AUGMENTATIONS)
    if p.TRAIN_AUGMENTATION == "ResizeRandomCrop" and p.TRAIN_SIZE > p.TEST_RESIZE:
        raise ConfigError(f"AQD.PRETRAIN.TRAIN_SIZE = {p.TRAIN_SIZE} is larger than TEST_RESIZE "
                          f"= {p.TEST_RESIZE}: ResizeRandomCrop crops from the resized image")
    if (not len(p.TOPK) or not all(isinstance(k, int) and k >= 1 for k in p.TOPK)):
        raise ConfigError(f"AQD.PRETRAIN.TOPK = {list(p.TOPK)!r}; expected positive integers, "
                          "e.g. [1, 5]")
