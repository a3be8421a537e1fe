#!/usr/bin/env python
"""Does a pretrained backbone help? (issue 17 item 5) On the embedded data, CPU-sized:

1. pretrain the float then the binary backbone of each detector on the embedded
   classification set (two stages, as paper 001 appendix B.1) with tools/pretrain_backbone.py;
2. train the binary detector twice on the same schedule, once from that checkpoint
   (MODEL.WEIGHTS) and once from scratch (MODEL.WEIGHTS ""), with train_net.py;
3. print a Markdown table of the pretraining top-1 / top-5 and the detectors' VOC AP50.

    python tools/pretrain_evidence.py --out output/evidence17            # everything (CPU)
    python tools/pretrain_evidence.py --out ... --only ssd --det-iters 200

Runs one process at a time; a run whose OUTPUT_DIR holds model_final.pth is not repeated
(delete the folder to redo it). Extra ``KEY VALUE`` overrides after ``--`` go to every
detection run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: detector -> (float pretraining twin, binary pretraining twin, binary detection twin)
STUDIES = {
    "faster_rcnn_c4": ("R18-C4-shapes-cpu", "BiReal-R18-C4-XNOR-shapes-cpu",
                       "configs/FasterRCNN/R18-C4-shapes-voc-cpu-XNOR.yaml"),
    "ssd": ("VGG16-shapes-cpu", "VGG16-XNOR-shapes-cpu", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"),
}


def _copypaste(log: str) -> Dict[str, float]:
    """The last ``copypaste:`` block of a detectron2 log ("Task: x", names, values)."""
    with open(log, encoding="utf-8") as f:
        lines = [ln.split("copypaste: ", 1)[1].strip() for ln in f if "copypaste: " in ln]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Task:") and i + 2 < len(lines)]
    if not starts:
        return {}
    names, values = lines[starts[-1] + 1].split(","), lines[starts[-1] + 2].split(",")
    return dict(zip(names, (float(v) for v in values)))


def _run(tool: str, config: str, out: str, opts: List[str]) -> Dict[str, float]:
    if not os.path.isfile(os.path.join(out, "model_final.pth")):
        cmd = [sys.executable, os.path.join(REPO, tool), "--config-file", config, "--resume",
               *opts, "OUTPUT_DIR", out]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    else:
        print(f"= {out} done already", flush=True)
    return _copypaste(os.path.join(out, "log.txt"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="output/evidence17")
    p.add_argument("--only", choices=sorted(STUDIES), action="append")
    p.add_argument("--pretrain-iters", type=int, default=300)
    p.add_argument("--det-iters", type=int, default=400)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for the detectors")
    args = p.parse_args(argv)
    extra = [o for o in args.opts if o != "--"]
    rows = []
    for name in args.only or sorted(STUDIES):
        fp_cfg, bin_cfg, det_cfg = STUDIES[name]
        it = args.pretrain_iters
        sched = ["SOLVER.MAX_ITER", str(it), "SOLVER.STEPS", f"({int(it * 2 / 3)}, {int(it * 13 / 15)})"]
        fp_out = os.path.join(args.out, name, "pretrain_fp")
        bin_out = os.path.join(args.out, name, "pretrain_binary")
        fp = _run("tools/pretrain_backbone.py", f"configs/Pretrain/{fp_cfg}.yaml", fp_out, sched)
        binary = _run("tools/pretrain_backbone.py", f"configs/Pretrain/{bin_cfg}.yaml", bin_out,
                      sched + ["MODEL.WEIGHTS", os.path.join(fp_out, "model_final.pth")])
        d = args.det_iters
        det_sched = ["SOLVER.MAX_ITER", str(d), "SOLVER.STEPS", f"({int(d * 0.75)}, {int(d * 0.925)})",
                     "SOLVER.CHECKPOINT_PERIOD", str(d)] + extra
        weights = os.path.join(bin_out, "model_final.pth")
        pre = _run("train_net.py", det_cfg, os.path.join(args.out, name, "det_pretrained"),
                   det_sched + ["MODEL.WEIGHTS", weights])
        scratch = _run("train_net.py", det_cfg, os.path.join(args.out, name, "det_scratch"),
                       det_sched + ["MODEL.WEIGHTS", ""])
        rows.append((name, det_cfg, d, fp, binary, pre, scratch))
    nan = float("nan")
    print("\n| binary detector (Xnor-Net) | iterations | float backbone top-1 / top-5 | "
          "binary backbone top-1 / top-5 | AP50 / AP from the binary backbone | "
          "AP50 / AP from scratch |")
    print("|---|---|---|---|---|---|")
    for name, det_cfg, d, fp, binary, pre, scratch in rows:
        cells = [f"{r.get('top1', nan):.1f} / {r.get('top5', nan):.1f}" for r in (fp, binary)]
        cells += [f"{r.get('AP50', nan):.2f} / {r.get('AP', nan):.2f}" for r in (pre, scratch)]
        print(f"| `{det_cfg}` | {d} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
