#!/usr/bin/env python
"""RoI-level diagnostics of a two-stage detector's weights (:mod:`aqd_d2.analysis.roi_probe`):
RPN recall, the box classifier on ground-truth boxes, and linear probes of the RoI features on
objects / random background / partial background boxes. Compares initialisations, e.g. the C4
Faster R-CNN from scratch against from a pretrained backbone (README, "Pretraining a backbone"):

    python tools/probe_rcnn.py --config-file configs/FasterRCNN/R18-C4-shapes-voc-cpu-FP.yaml \
        --weights output/.../model_final.pth --weights "" [--json out.json] [KEY VALUE ...]

Each ``--weights`` (repeatable; "" = the config's random initialisation under SEED, default
``--seed-init 0``) gives one table row. Datasets: cfg.DATASETS.TRAIN[0] (probe fit) and
cfg.DATASETS.TEST[0] (probe score, detector diagnostics) unless --train-dataset / --test-dataset.
"""
from __future__ import annotations

import argparse
import json
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a two-stage detector's config")
    p.add_argument("--weights", action="append", default=None,
                   help="checkpoint to probe (repeatable); '' = random initialisation")
    p.add_argument("--train-dataset", default="", help="probe fit split (default DATASETS.TRAIN[0])")
    p.add_argument("--test-dataset", default="", help="probe score split (default DATASETS.TEST[0])")
    p.add_argument("--negatives", type=int, default=2, help="background boxes per object (default 2)")
    p.add_argument("--bn", choices=("train", "eval"), default="train",
                   help="BN statistics of the probed features (default: per batch, as in fine-tuning)")
    p.add_argument("--limit", type=int, default=0, help="at most this many images per split (0: all)")
    p.add_argument("--seed-init", type=int, default=0, help="torch seed of the random initialisation")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from aqd_d2.analysis.roi_probe import format_probe, probe_rcnn
    from aqd_d2.data.register import register_datasets_from_config
    from aqd_d2.engine import AQDCheckpointer

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(args.opts))
    register_datasets_from_config(cfg)
    results, tables = {}, []
    for weights in args.weights if args.weights is not None else [""]:
        torch.manual_seed(args.seed_init)
        model = build_model(cfg)
        if weights:
            AQDCheckpointer(model).load(weights)
        res = probe_rcnn(cfg, model, args.train_dataset or None, args.test_dataset or None,
                         negatives_per_object=args.negatives, bn=args.bn, limit=args.limit or None)
        name = weights or f"random init (seed {args.seed_init})"
        results[name] = res
        table = format_probe(res, name)
        tables.append(table if not tables else table.split("\n", 2)[2])
        print(table.split("\n")[-1], flush=True)
    print("\n".join(tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
