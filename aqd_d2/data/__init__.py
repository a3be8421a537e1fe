"""Generated detection datasets and their registration in detectron2's catalogs.

Importing this package registers the embedded datasets (``aqd_shapes_train``,
``aqd_shapes_voc_val``, ``aqd_kitti_train``, ... see :mod:`aqd_d2.data.register`); their
files are generated on first use under ``$DETECTRON2_DATASETS``. The generator
(:mod:`aqd_d2.data.synthetic`) and the COCO / VOC writers (:mod:`aqd_d2.data.formats`) need
only NumPy and Pillow; they are imported on first access to their names here, so that
``python -m aqd_d2.data.synthetic`` (the CLI) runs a module not imported before.
"""
import importlib

from .mappers import TRAIN_MAPPER_REGISTRY, build_aqd_train_loader, build_train_mapper
from . import ssd_mapper  # noqa: F401,E402  (registers "SSDMapper" in TRAIN_MAPPER_REGISTRY)
from .register import (
    FAMILIES,
    SyntheticFamily,
    datasets_root,
    ensure_generated,
    load_synthetic,
    register_all,
    register_coco_dataset,
    register_datasets_from_config,
    register_voc_dataset,
)
from .scenes import CLASS_NAMES, KITTI_CLASSES, SHAPE_CLASSES

from .classification import register_classification_families  # noqa: E402

# Registration: names only, nothing is generated or read until a dataset is used.
register_all()
register_classification_families()  # aqd_shapes_cls(_tiny)_{train,val} (backbone pretraining)

_LAZY = {
    "generate_split": "synthetic", "render_image": "synthetic", "SyntheticImage": "synthetic",
    "ObjectAnnotation": "synthetic", "write_coco_json": "formats", "write_voc": "formats",
    "write_dataset": "formats",
}

__all__ = [
    "CLASS_NAMES", "SHAPE_CLASSES", "KITTI_CLASSES", "FAMILIES", "SyntheticFamily",
    "datasets_root", "ensure_generated", "load_synthetic", "register_all",
    "register_coco_dataset", "register_voc_dataset", "register_datasets_from_config",
    "TRAIN_MAPPER_REGISTRY",
    "build_aqd_train_loader", "build_train_mapper", *_LAZY,
]


def __getattr__(name: str):
    """Import the generator / writers on first access (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
