#!/usr/bin/env python
"""Parameters, storage at real bit widths, MACs / FLOPs / BOPs, equivalent FLOPs and the
binarization ratio of the detector a config builds (per-layer table + totals; JSON on request).

    python tools/analyze_model.py --config-file configs/FasterRCNN/R18-C4-VOC-XNOR.yaml \
        [--weights model.pth] [--input-size H [W]] [--num-proposals R] [--json stats.json] \
        [--max-rows 40] [KEY VALUE ...]

    python tools/analyze_model.py --paper-table bidet   # paper 000 Table 2 vs ours (README)

Default input: the config's test input (:func:`aqd_d2.analysis.config_model.default_input_size`:
``MODEL.SSD.INPUT_SIZE`` squared for SSD300, ``INPUT.MIN_SIZE_TEST x INPUT.MAX_SIZE_TEST``, e.g.
600 x 1000, for Faster R-CNN), the same as ``tools/equivalent_flops.py``. Counting rules:
:mod:`aqd_d2.analysis.model_stats` (one counting core for both tools). Without ``--weights``
the model is randomly initialised (the counts do not depend on the weights, except learned
quantizer state that some methods initialise from data).
"""
from __future__ import annotations

import argparse
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)

from aqd_d2.analysis.config_model import build_from_config, input_shape
from aqd_d2.analysis.model_stats import analyze_model


def paper_table() -> str:
    """Paper 000 Table 2 next to analyze_model on every row's shipped config (markdown)."""
    from aqd_d2.analysis.paper_tables import BIDET_TABLE2, FRCNN_FIT, count_row, table2_markdown

    results = []
    for row in BIDET_TABLE2:
        s = count_row(row)
        r = {"mb": s.storage_mb, "mflops": s.equivalent_flops / 1e6}
        if row.is_rcnn:
            h, w, rois = FRCNN_FIT
            r["mflops_fit"] = count_row(row, (h, w), rois).equivalent_flops / 1e6
        results.append(r)
        print(f"{row.detector} {row.method}: {r}", file=sys.stderr, flush=True)
    return table2_markdown(results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="")
    p.add_argument("--paper-table", choices=["bidet"], default="",
                   help="print paper 000 Table 2 next to our counts of its shipped configs "
                   "(aqd_d2.analysis.paper_tables; slow: every row at full size)")
    p.add_argument("--weights", default="", help="optional checkpoint (.pth)")
    p.add_argument("--input-size", type=int, nargs="+", default=[],
                   help="H [W] of the (padded) input image; default: the config's test input")
    p.add_argument("--num-proposals", type=int, default=None,
                   help="R-CNN: boxes per image for the ROI head (default: RPN test top-k)")
    p.add_argument("--json", default="", help="write the statistics as JSON here")
    p.add_argument("--max-rows", type=int, default=None, help="rows of the per-layer table")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.paper_table:
        print(paper_table())
        return 0
    if not args.config_file:
        p.error("--config-file is required (or --paper-table)")
    cfg, model = build_from_config(args.config_file, args.opts, args.weights)
    stats = analyze_model(model, input_shape(cfg, args.input_size), num_proposals=args.num_proposals)
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
