#!/usr/bin/env python
"""MACs, binarization ratio r_b, equivalent FLOP (paper 003 eq. 1) and model size (paper 004
Tables I-II) of the detector a config builds, counted over its whole forward pass
(:mod:`aqd_d2.analysis.equivalent_flops`; works for every meta-architecture, CenterNet and
YOLOv2 included).

    python tools/equivalent_flops.py --config-file configs/CenterNet/q0.yaml [--input-size H W] \
        [--per-layer] [KEY VALUE ...]

Default input: MODEL.CENTERNET.INPUT_SIZE squared for CenterNet configs, else
INPUT.MIN_SIZE_TEST x INPUT.MAX_SIZE_TEST. Binary MACs are those of layers with 1-bit weights
and 1-bit inputs; with AQD.STAGE_BINARIZATION the fully binarized (last) stage is counted.
"""
from __future__ import annotations

import argparse
import json
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqd_d2.analysis.equivalent_flops import count_macs, model_size_mb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--per-layer", action="store_true", help="also print MACs per layer")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(args.opts))
    if args.input_size:
        h, w = args.input_size
    elif cfg.MODEL.QUANT.META_ARCHITECTURE == "CenterNet" or cfg.MODEL.META_ARCHITECTURE == "CenterNet":
        h = w = cfg.MODEL.CENTERNET.INPUT_SIZE
    else:
        h, w = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    model = build_model(cfg)
    batch = [{"image": torch.rand(3, h, w) * 255, "height": h, "width": w}]
    report = count_macs(model, batch)
    out = dict(report.summary(), input=[h, w], size_MB=model_size_mb(model))
    if args.per_layer:
        for name, macs in report.layer_macs.items():
            print(f"{name:50s} {macs:>14d}{'  binary' if name in report.binary_layers else ''}")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
