#!/usr/bin/env python
"""Convert a torchvision ImageNet checkpoint (ResNet, VGG16 / VGG16-BN, ShuffleNetV2) to the
backbone names of aqd_d2's detectors, for their MODEL.WEIGHTS (README, "Pretraining a
backbone"). torchvision has no MobileNetV1: pretrain it with tools/pretrain_backbone.py.

    python tools/convert_torchvision_backbone.py --arch resnet resnet18.pth r18_fpn.pth \\
        --prefix backbone.bottom_up.                         # FPN detectors (RetinaNet, FCOS, ...)
    python tools/convert_torchvision_backbone.py --arch resnet resnet18.pth r18_c4.pth \\
        --prefix backbone. --res5-prefix roi_heads.box_head.res5.   # C4 Faster R-CNN
    python tools/convert_torchvision_backbone.py --arch vgg16 vgg16.pth vgg16_ssd.pth
"""
import argparse
import sys

import aqd_d2  # noqa: F401  isort:skip
import torch

from aqd_d2.modeling.backbone.torchvision_weights import (TORCHVISION_ARCHS,
                                                          convert_torchvision_backbone)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input", help="torchvision state_dict (.pth)")
    p.add_argument("output", help="checkpoint to write ({'model': ...})")
    p.add_argument("--arch", required=True, choices=TORCHVISION_ARCHS)
    p.add_argument("--prefix", default="backbone.", help="prepended to every key")
    p.add_argument("--res5-prefix", default="", help="resnet: res5's prefix (C4 detectors)")
    args = p.parse_args(argv)
    state = torch.load(args.input, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model = convert_torchvision_backbone(state, args.arch, args.prefix, args.res5_prefix)
    except (KeyError, ValueError) as e:
        print(f"convert_torchvision_backbone: error: {e}", file=sys.stderr)
        return 2
    torch.save({"model": model, "__author__": "torchvision", "matching_heuristics": False},
               args.output)
    print(f"wrote {len(model)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
