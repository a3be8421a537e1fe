#!/usr/bin/env python
"""Run an exported (packed) detector with its real binary / int8 kernels on images and draw
the detections into one PNG.

    python tools/infer_packed.py --config-file configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml \
        --packed model.packed --input img1.png img2.png --output detections.png
    python tools/infer_packed.py --config-file ... --packed model.packed \
        --dataset aqd_shapes_val --num-images 6 --output detections.png   # with ground truth

``--int8 auto`` times each k-bit layer on the int8 GEMM path against float on the first
image and keeps the faster (:mod:`aqd_d2.export.routing`); ``on`` (default) uses int8 for every
qualifying layer, ``off`` none.

Images are resized as at test time (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST); boxes are drawn in
the original image. Class names come from the dataset's metadata (``--dataset``, else the
config's first DATASETS.TEST entry, else class ids).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from aqd_d2.analysis.visualize import draw_boxes, save_grid
from aqd_d2.export.deploy import load_for_inference


def _class_names(dataset: str, num: int):
    try:
        return list(MetadataCatalog.get(dataset).thing_classes)
    except (AttributeError, KeyError):
        return [str(i) for i in range(num)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--packed", required=True, help="file written by tools/export_model.py")
    p.add_argument("--input", nargs="*", default=[], help="image files")
    p.add_argument("--dataset", default="", help="registered dataset to take images (and GT) from")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--output", default="detections.png")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--int8", choices=["on", "off", "auto"], default="on",
                   help="k-bit layers: int8 GEMM (on), frozen fake-quant float (off), or per layer "
                        "whichever is measured faster on the first image (auto)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(args.opts))
    records = [{"file_name": f} for f in args.input]
    if args.dataset:
        records += DatasetCatalog.get(args.dataset)[: args.num_images]
    if not records:
        p.error("give --input images or --dataset")
    names_from = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    def load(rec):
        image = read_image(rec["file_name"], format=cfg.INPUT.FORMAT)
        resized = aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
        return image, tensor

    int8 = {"on": True, "off": False, "auto": "auto"}[args.int8]
    example = None
    if int8 == "auto":
        image, tensor = load(records[0])
        example = [{"image": tensor, "height": image.shape[0], "width": image.shape[1]}]
    model, report = load_for_inference(build_model(cfg), args.packed, int8=int8, example_inputs=example)
    kinds = {k: report.count(k) for k in ("binary", "int8", "fake-quant weight frozen")}
    print(f"loaded {args.packed}: deployed layers {kinds}")
    tiles, seconds = [], []
    for rec in records:
        image, tensor = load(rec)
        h, w = image.shape[:2]
        t = time.perf_counter()
        with torch.no_grad():
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        seconds.append(time.perf_counter() - t)
        anns = rec.get("annotations", [])
        gt = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
              for a in anns] if anns else None  # dataset dicts are XYWH_ABS
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        names = _class_names(names_from, int(inst.pred_classes.max()) + 1 if len(inst) else 1)
        tiles.append(draw_boxes(
            np.ascontiguousarray(rgb), names, gt_boxes=gt,
            gt_classes=[a["category_id"] for a in anns] if anns else None,
            pred_boxes=inst.pred_boxes.tensor.numpy(), pred_classes=inst.pred_classes.numpy(),
            pred_scores=inst.scores.numpy(), score_thresh=args.score_thresh,
        ))
        print(f"{rec['file_name']}: {int((inst.scores >= args.score_thresh).sum())} detections "
              f">= {args.score_thresh} ({seconds[-1] * 1e3:.1f} ms)")
    save_grid(tiles, args.output)
    print(f"wrote {args.output} ({len(tiles)} images, median {np.median(seconds) * 1e3:.1f} ms per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
