#!/usr/bin/env python
"""TP / FP / FN / TN counts of a detector (paper 001 appendix B.4, Table 3), as a table + JSON.

Run a model on a dataset (TN from the model's anchors, one candidate per anchor):

    python tools/count_detections.py --config-file configs/FasterRCNN/R18-FPN-shapes-voc-cpu-XNOR.yaml \
        --weights output/.../model_final.pth [--dataset aqd_shapes_voc_val] [KEY VALUE ...]

or count saved predictions (COCOEvaluator's instances_predictions.pth, or a COCO results json):

    python tools/count_detections.py --predictions output/.../inference/instances_predictions.pth \
        --dataset aqd_shapes_val [--candidates 8732]

Options: --iou (0.5), --score-thresh (0.01), --json out.json. Definitions:
:mod:`aqd_d2.analysis.detection_counts`.
"""
from __future__ import annotations

import argparse
import json
import sys

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from aqd_d2.analysis.detection_counts import (DEFAULT_SCORE_THRESH, AnchorCounter, DetectionCountEvaluator,
                                              count_detections, format_counts,
                                              predictions_from_coco_results)


def _counts_from_file(args) -> dict:
    """Counts of saved predictions (.pth from COCOEvaluator or a COCO results .json)."""
    if args.predictions.endswith(".json"):
        with open(args.predictions) as f:
            preds = predictions_from_coco_results(json.load(f))
    else:
        preds = torch.load(args.predictions, map_location="cpu", weights_only=False)
    meta = MetadataCatalog.get(args.dataset)
    id_map = meta.get("thing_dataset_id_to_contiguous_id")
    return count_detections(preds, DatasetCatalog.get(args.dataset), iou=args.iou,
                            score_thresh=args.score_thresh, num_candidates=args.candidates,
                            category_id_map=id_map, class_names=meta.get("thing_classes"))


def _counts_from_model(args) -> dict:
    """Counts of the model a config (+ weights) builds, run on ``--dataset``."""
    from detectron2.config import get_cfg
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import build_model

    from aqd_d2.engine import AQDCheckpointer

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(args.opts))
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    model = build_model(cfg)
    if args.weights:
        AQDCheckpointer(model).load(args.weights)
    candidates = args.candidates
    if candidates is None:
        try:
            candidates = AnchorCounter(model)
        except ValueError as e:
            print(f"TN not counted: {e}", file=sys.stderr)
    evaluator = DetectionCountEvaluator(dataset, iou=args.iou, score_thresh=args.score_thresh,
                                        num_candidates=candidates, distributed=False)
    # batch 1 (the test loader's): the anchor count is that of each image's own padded size
    inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)
    return evaluator.counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-file", help="build and run this detector")
    src.add_argument("--predictions", help="instances_predictions.pth or COCO results .json")
    p.add_argument("--weights", default="", help="checkpoint for --config-file")
    p.add_argument("--dataset", default="", help="registered dataset (default: cfg.DATASETS.TEST[0])")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--score-thresh", type=float, default=DEFAULT_SCORE_THRESH)
    p.add_argument("--candidates", type=int, default=None,
                   help="candidate boxes per image for TN (default: the model's anchors; none for files)")
    p.add_argument("--json", default="", help="also write the counts here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.predictions and not args.dataset:
        p.error("--predictions needs --dataset (the ground truth)")
    if args.predictions and args.opts:
        p.error("config overrides only apply with --config-file")
    counts = _counts_from_file(args) if args.predictions else _counts_from_model(args)
    print(format_counts(counts))
    text = json.dumps(counts, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
