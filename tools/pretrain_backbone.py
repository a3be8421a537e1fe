#!/usr/bin/env python
"""Pretrain a detector's backbone on image classification (ImageNet-layout folders or the
embedded aqd_shapes_cls set) with detectron2's engine. Same flags as train_net.py, plus
``--image-folder NAME DIRECTORY``. See aqd_d2/pretrain_backbone.py and README, "Pretraining a
backbone".

    python tools/pretrain_backbone.py --config-file configs/Pretrain/R18-shapes-cpu.yaml
    python tools/pretrain_backbone.py --config-file configs/Pretrain/R18.yaml --num-gpus 8 \\
        --image-folder imagenet_train /data/imagenet/train --image-folder imagenet_val /data/imagenet/val
    python tools/pretrain_backbone.py --config-file ... --resume
"""
import sys

# aqd_d2 first: it makes detectron2 v0.6 importable on current NumPy / Pillow (aqd_d2.compat)
# and registers the plugin's builders and datasets.
import aqd_d2  # noqa: F401  isort:skip
from aqd_d2.pretrain_backbone import cli

if __name__ == "__main__":
    sys.exit(cli())
