"""Pretrain a detector's backbone on image classification with detectron2's engine (issue 17):
``tools/pretrain_backbone.py``, the same flags as ``train_net.py`` plus ``--image-folder``.

    python tools/pretrain_backbone.py --config-file configs/Pretrain/R18-shapes-cpu.yaml
    python tools/pretrain_backbone.py --config-file configs/Pretrain/R18.yaml --num-gpus 8 \\
        --image-folder imagenet_train /data/imagenet/train \\
        --image-folder imagenet_val /data/imagenet/val
    python tools/pretrain_backbone.py --config-file ... --resume        # continue a killed run
    python tools/pretrain_backbone.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth

The model is ``ImageClassifier`` (``MODEL.BACKBONE`` as the detector builds it + pooling + fc,
under ``QuantizedDetector`` for ``MODEL.QUANT``); the data ImageNet-layout folders; the
evaluator reports top-1 / top-5. The checkpoint's backbone keys are the detector's
(``MODEL.CLS.STATE_DICT_RENAMES``): the detection config's ``MODEL.WEIGHTS`` takes
``OUTPUT_DIR/model_final.pth`` as it is. Errors in the input exit with status 2 and one line.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import aqd_d2  # noqa: F401  isort:skip  (compat shims, registrations)

from . import train_net
from .config import ConfigError
from .data.classification import check_classification_datasets, register_image_folders_from_config
from .engine.pretrain import PretrainTrainer

__all__ = ["build_parser", "prepare", "setup", "main", "cli", "PretrainTrainer"]


def build_parser():
    """``train_net``'s parser + ``--image-folder NAME DIRECTORY``."""
    parser = train_net.build_parser()
    parser.description = "Pretrain an aqd_d2 backbone on image classification"
    parser.add_argument(
        "--image-folder", nargs=2, action="append", metavar=("NAME", "DIRECTORY"),
        help="register an ImageNet-layout folder (DIRECTORY/<class>/<image>) under NAME "
             "(repeatable); use NAME in DATASETS.TRAIN / TEST")
    return parser


def _check_classifier(cfg) -> None:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "QuantizedDetector":
        arch = cfg.MODEL.QUANT.META_ARCHITECTURE
    if arch != "ImageClassifier":
        raise ConfigError(
            f"tools/pretrain_backbone.py trains an image classifier, but this config builds "
            f"{arch!r}: use a configs/Pretrain/*.yaml config (MODEL.META_ARCHITECTURE "
            "'ImageClassifier', or 'QuantizedDetector' with MODEL.QUANT.META_ARCHITECTURE "
            "'ImageClassifier'); detection configs train with train_net.py")


def prepare(args):
    """Config loaded and validated, image folders registered, datasets and classes checked
    against MODEL.CLS.NUM_CLASSES, a missing MODEL.WEIGHTS resolved (as train_net's)."""
    cfg = train_net.load_config(args)
    _check_classifier(cfg)
    extra = [list(e) for e in (getattr(args, "image_folder", None) or [])]
    cfg.AQD.PRETRAIN.IMAGE_FOLDERS = list(cfg.AQD.PRETRAIN.IMAGE_FOLDERS) + extra
    register_image_folders_from_config(cfg)
    check_classification_datasets(cfg)
    train_net._resolve_missing_weights(cfg, args)
    return cfg


def setup(args):
    """:func:`prepare`, frozen, then detectron2's ``default_setup`` (as ``train_net.setup``)."""
    return train_net.setup(args, prepare_fn=prepare)


def main(args):
    """Train / evaluate in this process with :class:`PretrainTrainer`."""
    return train_net.main(args, trainer_cls=PretrainTrainer, setup_fn=setup)


def cli(argv: Optional[List[str]] = None) -> int:
    """The ``tools/pretrain_backbone.py`` entry point; returns the exit status."""
    return train_net.cli(argv, parser=build_parser(), prepare_fn=prepare, main_fn=main)


if __name__ == "__main__":
    sys.exit(cli())
