#!/usr/bin/env python
"""The README's main job: train the CPU RetinaNet-R18 on the embedded dataset, evaluate it,
print COCO AP / AP50 / AP75 and draw ground truth + predictions for a few validation images.

    python3 tools/run.py demo [--config-file F] [--num-images N] [KEY VALUE ...]

By default: the float AQD RetinaNet-R18-FPN (configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml),
800 iterations of batch 8 on 128-pixel images, from scratch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2.data)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

REPO = Path(__file__).resolve().parent.parent
# The AQD float architecture (BN after every conv of backbone, FPN and head, multi-level BN
# in the head): normalisation everywhere lets it learn from scratch within minutes on a CPU.
DEFAULT_CONFIG = REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-FP.yaml"


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw_predictions(cfg, model, dataset_name: str, num_images: int, path: str) -> str:
    """Run ``model`` on the first ``num_images`` images of ``dataset_name``; save a PNG grid."""
    from aqd_d2.analysis.visualize import draw_boxes, save_grid
    from detectron2.data import transforms as T

    names = MetadataCatalog.get(dataset_name).thing_classes
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    tiles = []
    model.eval()
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        resized = aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        gt = [a["bbox"] for a in record.get("annotations", [])]
        gt_xyxy = [[x, y, x + bw, y + bh] for x, y, bw, bh in gt]  # COCO records are XYWH_ABS
        tiles.append(draw_boxes(
            rgb.copy(), names,
            gt_boxes=gt_xyxy, gt_classes=[a["category_id"] for a in record.get("annotations", [])],
            pred_boxes=inst.pred_boxes.tensor.numpy(), pred_classes=inst.pred_classes.numpy(),
            pred_scores=inst.scores.numpy(),
        ))
    return save_grid(tiles, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    train_net = _load_train_net()
    targs = train_net.build_parser().parse_args(
        ["--config-file", args.config_file, *args.opts]
    )
    start = time.time()
    cfg = train_net.setup(targs)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None) or train_net.Trainer.test(cfg, trainer.model)
    wall = time.time() - start

    dataset = cfg.DATASETS.TEST[0]
    bbox = results.get("bbox", results.get(dataset, {}).get("bbox", {})) if results else {}
    png = draw_predictions(cfg, trainer.model, dataset, args.num_images,
                           os.path.join(cfg.OUTPUT_DIR, "demo_predictions.png"))
    print("\n== aqd_d2 demo ==")
    print(f"config      : {args.config_file}")
    print(f"train+eval  : {wall:.0f} s on {torch.get_num_threads()} threads")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        if key in bbox:
            print(f"bbox {key:<5}: {bbox[key]:.2f}")
    print(f"predictions : {png} (green: ground truth, red: predictions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
