"""AQD.DATASETS: COCO-json and Pascal-VOC-folder datasets registered by name from the config.

``train_net.py`` / ``aqd-train`` register them before anything is built (``--coco`` /
``--voc`` on the command line add entries here); a project's own script calls
:func:`aqd_d2.data.register_datasets_from_config` after merging its config.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError


def add_config(cfg: CN) -> None:
    """AQD.DATASETS (needs the AQD node, created by the engine section)."""
    _C = cfg
    _C.AQD.DATASETS = CN()
    # COCO-format datasets to register: a list of [NAME, JSON_FILE, IMAGE_ROOT]; the name can
    # then be used in DATASETS.TRAIN / DATASETS.TEST (evaluated with COCOEvaluator).
    _C.AQD.DATASETS.COCO = []
    # Pascal-VOC-format folders to register: a list of [NAME, DIRNAME, SPLIT] or
    # [NAME, DIRNAME, SPLIT, CLASSES] (CLASSES: comma-separated names in label order; default
    # the 20 VOC classes); DIRNAME holds Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt.
    # Evaluated with PascalVOCDetectionEvaluator (VOC07 11-point AP50).
    _C.AQD.DATASETS.VOC = []


def _entries(cfg: CN, key: str, lengths):
    value = cfg.AQD.DATASETS[key]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"AQD.DATASETS.{key} = {value!r}: expected a list of lists")
    for i, entry in enumerate(value):
        if (not isinstance(entry, (list, tuple)) or len(entry) not in lengths
                or not all(isinstance(x, str) and x for x in entry)):
            form = {"COCO": "[NAME, JSON_FILE, IMAGE_ROOT]",
                    "VOC": "[NAME, DIRNAME, SPLIT] or [NAME, DIRNAME, SPLIT, 'class1,class2,...']"}
            raise ConfigError(f"AQD.DATASETS.{key}[{i}] = {entry!r}: expected {form[key]} "
                              "(non-empty strings)")
    names = [e[0] for e in value]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"AQD.DATASETS.{key} names {dup} more than once")


def validate(cfg: CN) -> None:
    """Check the shape of every AQD.DATASETS entry (the files are checked at registration)."""
    _entries(cfg, "COCO", (3,))
    _entries(cfg, "VOC", (3, 4))
    both = {e[0] for e in cfg.AQD.DATASETS.COCO} & {e[0] for e in cfg.AQD.DATASETS.VOC}
    if both:
        raise ConfigError(f"dataset names {sorted(both)} are in both AQD.DATASETS.COCO and .VOC")
