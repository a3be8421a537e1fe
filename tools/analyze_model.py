#!/usr/bin/env python
"""Parameters, storage at real bit widths, MACs / FLOPs / BOPs, equivalent FLOPs and the
binarization ratio of the detector a config builds (per-layer table + totals; JSON on request).

    python tools/analyze_model.py --config-file configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml \
        [--weights model.pth] [--input-size 320 320] [--json stats.json] [--max-rows 40] [KEY VALUE ...]

Counting rules: :mod:`aqd_d2.analysis.model_stats`. Without ``--weights`` the model is
randomly initialised (the counts do not depend on the weights, except learned quantizer
state that some methods initialise from data).
"""
from __future__ import annotations

import argparse
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqd_d2.analysis.model_stats import analyze_model


def build_from_config(config_file: str, opts=(), weights: str = ""):
    """The model of ``config_file`` (+ ``opts``) on CPU, eval mode, loaded from ``weights``."""
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    model = build_model(cfg)
    if weights:
        from aqd_d2.engine import AQDCheckpointer

        AQDCheckpointer(model).load(weights)
    return cfg, model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default="", help="optional checkpoint (.pth)")
    p.add_argument("--input-size", type=int, nargs="+", default=[320],
                   help="H [W] of the (padded) input image; default 320")
    p.add_argument("--num-proposals", type=int, default=None,
                   help="R-CNN: boxes per image for the ROI head (default: RPN test top-k)")
    p.add_argument("--json", default="", help="write the statistics as JSON here")
    p.add_argument("--max-rows", type=int, default=None, help="rows of the per-layer table")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    h = args.input_size[0]
    w = args.input_size[1] if len(args.input_size) > 1 else h
    _, model = build_from_config(args.config_file, args.opts, args.weights)
    stats = analyze_model(model, (3, h, w), num_proposals=args.num_proposals)
    print(stats.table(max_rows=args.max_rows))
    for note in stats.notes:
        print("note:", note)
    if args.json:
        with open(args.json, "w") as f:
            f.write(stats.to_json())
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
