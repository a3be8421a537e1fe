#!/usr/bin/env python
"""MACs, binarization ratio r_b, equivalent FLOP (paper 003 eq. 1) and model size (paper 004
Tables I-II) of the detector a config builds (:mod:`aqd_d2.analysis.equivalent_flops`, a view of
the same counting core as ``tools/analyze_model.py``: both tools print the same numbers).

    python tools/equivalent_flops.py --config-file configs/CenterNet/q0.yaml [--input-size H [W]] \
        [--num-proposals R] [--per-layer] [KEY VALUE ...]

Default input: the config's test input (:func:`aqd_d2.analysis.config_model.default_input_size`:
MODEL.CENTERNET.INPUT_SIZE / MODEL.SSD.INPUT_SIZE squared, else INPUT.MIN_SIZE_TEST x
INPUT.MAX_SIZE_TEST). Binary MACs are those of layers with 1-bit weights and 1-bit inputs; with
AQD.STAGE_BINARIZATION the fully binarized (last) stage is counted.
"""
from __future__ import annotations

import argparse
import json
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)

from aqd_d2.analysis.config_model import build_from_config, input_shape
from aqd_d2.analysis.equivalent_flops import count_macs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input-size", type=int, nargs="+", default=[],
                   help="H [W] of the input; default: the config's test input")
    p.add_argument("--num-proposals", type=int, default=None,
                   help="R-CNN: boxes per image for the ROI head (default: RPN test top-k)")
    p.add_argument("--per-layer", action="store_true", help="also print MACs per layer")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    cfg, model = build_from_config(args.config_file, args.opts)
    shape = input_shape(cfg, args.input_size)
    report = count_macs(model, shape, num_proposals=args.num_proposals)
    out = dict(report.summary(), input=list(shape[1:]), size_MB=report.size_mb)
    if args.per_layer:
        for name, macs in report.layer_macs.items():
            print(f"{name:50s} {macs:>14d}{'  binary' if name in report.binary_layers else ''}")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
