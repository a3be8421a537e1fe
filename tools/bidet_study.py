#!/usr/bin/env python
"""BiDet mini-study on the embedded VOC-layout data: Xnor-Net vs BiDet vs AutoBiDet (paper 000
Table 2 rows, appendix 001 Table 3 false-positive claim) on the same short CPU schedule.

Every run trains one of the CPU twin configs with aqd_d2's Trainer, then evaluates it on the
test set with detectron2's ``PascalVOCDetectionEvaluator`` (VOC07 11-point AP50 because the
embedded dataset's metadata says year 2007; its "AP" is the mean over IoU 0.50:0.95) and
:class:`aqd_d2.analysis.detection_counts.DetectionCountEvaluator` (TP / FP / FN: per class,
IoU >= 0.5, highest score first, predicted positives are detections with score >=
``--score-thresh``). As in the paper, the binary runs start from the float run of the same
schedule (``--init fp``, the default; ``--init scratch`` trains all from random weights).

The BiDet / AutoBiDet configs use a 10x smaller SGD learning rate than the Xnor-Net one
because beta = 10 multiplies their class / location terms (the paper trains with Adam, which
is insensitive to that scale); everything else (iterations, batch, data) is the same.

Usage::

    .venv/bin/python tools/bidet_study.py --out output/bidet_study              # Faster R-CNN R18
    .venv/bin/python tools/bidet_study.py --out output/bidet_study_ssd --detector ssd
    .venv/bin/python tools/bidet_study.py --out /tmp/s --max-iter 2 --batch 2 --size 64 \
        --train-set aqd_shapes_voc_tiny_train --test-set aqd_shapes_voc_tiny_val  # smoke run

Writes ``<out>/study.json`` and ``<out>/study.md`` and prints the markdown table; a finished
run (``<out>/<run>/result.json``) is reused unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
import torch
from detectron2.config import get_cfg
from detectron2.evaluation import DatasetEvaluators, PascalVOCDetectionEvaluator

from aqd_d2.analysis.detection_counts import DEFAULT_SCORE_THRESH, DetectionCountEvaluator
from aqd_d2.engine import Trainer

REPO = Path(__file__).resolve().parent.parent

#: (run name, method label, config) per detector; the float run comes first (init of the rest)
RUNS: Dict[str, List[Tuple[str, str, str]]] = {
    "frcnn": [
        ("fp", "FP (init)", "configs/FasterRCNN/R18-FPN-shapes-voc-cpu-FP.yaml"),
        ("xnor", "Xnor-Net", "configs/FasterRCNN/R18-FPN-shapes-voc-cpu-XNOR.yaml"),
        ("bidet", "BiDet", "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-BiDet.yaml"),
        ("autobidet", "AutoBiDet", "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-AutoBiDet.yaml"),
    ],
    "ssd": [
        ("fp", "FP (init)", "configs/SSD/VGG16-shapes-voc-cpu-FP.yaml"),
        ("xnor", "Xnor-Net", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"),
        ("bidet", "BiDet", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml"),
        ("autobidet", "AutoBiDet", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-AutoBiDet.yaml"),
    ],
}


class StudyTrainer(Trainer):
    """aqd_d2's Trainer; the study evaluates explicitly after training (see :func:`evaluate`)."""


def build_cfg(config: str, out_dir: Path, args, weights: str):
    """The run's config: the file plus the study's schedule / data / output overrides."""
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / config))
    opts = ["OUTPUT_DIR", str(out_dir), "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
            "DATASETS.TRAIN", f"('{args.train_set}',)", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", str(args.workers), "SOLVER.CHECKPOINT_PERIOD", "100000",
            "SEED", str(args.seed)]
    if args.max_iter:
        scale = args.max_iter / cfg.SOLVER.MAX_ITER
        steps = tuple(x for x in (int(s * scale) for s in cfg.SOLVER.STEPS) if 0 < x < args.max_iter)
        opts += ["SOLVER.MAX_ITER", str(args.max_iter), "SOLVER.STEPS", str(steps),
                 "SOLVER.WARMUP_ITERS", str(int(cfg.SOLVER.WARMUP_ITERS * scale))]
    if args.batch:
        opts += ["SOLVER.IMS_PER_BATCH", str(args.batch)]
    if args.size:
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MIN_SIZE_TEST", str(args.size)]
    cfg.merge_from_list(opts + list(args.opts))
    return cfg


def evaluate(cfg, model, test_set: str, score_thresh: float) -> Dict[str, float]:
    """VOC AP (PascalVOCDetectionEvaluator) and TP / FP / FN (DetectionCountEvaluator)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (test_set,)
    evaluator = DatasetEvaluators([PascalVOCDetectionEvaluator(test_set),
                                   DetectionCountEvaluator(test_set, iou=0.5, score_thresh=score_thresh)])
    res = StudyTrainer.test(cfg, model, evaluators=[evaluator])
    out = {k: float(v) for k, v in res.get("bbox", {}).items()}
    out.update({k: float(v) for k, v in res.get("counts", {}).items()})
    return out


def run_one(name: str, config: str, args, weights: str) -> Dict[str, float]:
    """Train + evaluate one run (reused from ``<out>/<name>/result.json`` unless --force)."""
    out_dir = Path(args.out) / name
    done = out_dir / "result.json"
    if done.exists() and not args.force:
        return json.loads(done.read_text())
    torch.manual_seed(args.seed)
    cfg = build_cfg(config, out_dir, args, weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    trainer = StudyTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    trainer.checkpointer.save("model_final")
    result = evaluate(cfg, trainer.model, args.test_set, args.score_thresh)
    result["minutes"] = (time.time() - start) / 60
    done.write_text(json.dumps(result, indent=1))
    return result


def table(rows: List[dict]) -> str:
    """Markdown table of the study."""
    lines = ["| method | config | VOC07 AP50 (11-pt) | AP (.50:.95) | TP | FP | FN | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['method']} | `{r['config']}` | {m.get('AP50', float('nan')):.1f} | "
                     f"{m.get('AP', float('nan')):.1f} | {m.get('TP', 0):.0f} | {m.get('FP', 0):.0f} | "
                     f"{m.get('FN', 0):.0f} | {m.get('minutes', 0):.1f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--detector", choices=sorted(RUNS), default="frcnn")
    p.add_argument("--init", choices=["fp", "scratch"], default="fp",
                   help="binary runs start from the float run (fp) or from random weights")
    p.add_argument("--only", nargs="*", default=None,
                   help="run names to run (fp xnor bidet autobidet); end the list with another option "
                   "before KEY VALUE overrides (e.g. --only xnor --seed 0 KEY VALUE)")
    p.add_argument("--max-iter", type=int, default=0, help="scale the schedule to this many iterations")
    p.add_argument("--batch", type=int, default=0, help="images per batch (default: the configs')")
    p.add_argument("--size", type=int, default=0, help="train/test image size (default: the configs')")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-set", default="aqd_shapes_voc_train")
    p.add_argument("--test-set", default="aqd_shapes_voc_val")
    p.add_argument("--score-thresh", type=float, default=DEFAULT_SCORE_THRESH,
                   help="minimum score of a predicted positive for the TP/FP/FN counts")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    names = [n for n, _, _ in RUNS[args.detector]]
    unknown = [n for n in (args.only or []) if n not in names]
    if unknown:
        # argparse puts KEY VALUE overrides written after --only into --only
        raise SystemExit(f"--only: unknown run(s) {unknown}; runs are {names}. KEY VALUE overrides "
                         "written right after --only's names are taken as names: put another "
                         "option between them, e.g. --only fp xnor --seed 0 KEY VALUE")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    fp_weights = ""
    for name, method, config in RUNS[args.detector]:
        if name == "fp" and args.init == "scratch":
            continue
        if args.only is not None and name not in args.only and not (name == "fp" and args.init == "fp"):
            continue
        metrics = run_one(name, config, args, "" if name == "fp" else fp_weights)
        if name == "fp":
            fp_weights = str(Path(args.out) / "fp" / "model_final.pth")
        rows.append({"run": name, "method": method, "config": config, "metrics": metrics})
    (Path(args.out) / "study.json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    (Path(args.out) / "study.md").write_text(md + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
