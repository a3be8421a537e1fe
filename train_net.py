#!/usr/bin/env python
"""Train and evaluate aqd_d2 detectors with detectron2's trainer (the installed ``aqd-train``
command is the same program).

Usage (the detectron2 conventions):
    python train_net.py --config-file configs/RetinaNet/R18-FPN-shapes-cpu.yaml
    python train_net.py --config-file configs/RetinaNet/R18-FPN-COCO.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume                 # continue the last run
    python train_net.py --config-file ... --num-cpu-procs 2        # CPU processes (gloo)
    python train_net.py --config-file ... --coco NAME JSON IMAGE_ROOT DATASETS.TRAIN "('NAME',)"
Trailing KEY VALUE pairs override the config. See aqd_d2/train_net.py.
"""
import sys

# aqd_d2 first: it makes detectron2 v0.6 importable on current NumPy / Pillow (aqd_d2.compat)
# and registers the plugin's builders and datasets.
import aqd_d2  # noqa: F401  isort:skip
from aqd_d2.train_net import Trainer, build_parser, cli, load_config, main, setup  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())
