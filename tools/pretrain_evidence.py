#!/usr/bin/env python
"""Does a pretrained backbone help? (issue 17 item 5) On the embedded data, CPU-sized:

1. pretrain the float then the binary backbone of each detector on the embedded
   classification set (two stages, as paper 001 appendix B.1) with tools/pretrain_backbone.py;
2. train the binary detector twice per seed (``--seeds``, detectron2's SEED) on the same
   schedule, once from that checkpoint (MODEL.WEIGHTS) and once from scratch (MODEL.WEIGHTS ""),
   with train_net.py;
3. print a Markdown table of the pretraining top-1 / top-5 and the detectors' VOC AP50 / AP
   (mean [min, max] over the seeds, and in how many seeds the pretrained one won).

    python tools/pretrain_evidence.py --out output/evidence17            # everything (CPU)
    python tools/pretrain_evidence.py --out ... --only ssd --det-iters 200
    OMP_NUM_THREADS=1 python tools/pretrain_evidence.py --only faster_rcnn_c4 --det-iters 160 \
        --seeds 0 1 2 --jobs 2         # one pretrained + one scratch detector per seed

Runs the pretraining stages one at a time and ``--jobs`` detection runs at a time; a run whose
OUTPUT_DIR holds model_final.pth is not repeated (delete the folder to redo it). Extra
``KEY VALUE`` overrides after ``--`` go to every detection run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def _spread(values: List[float]) -> str:
    """``mean [min, max]`` of the seeds' values (one value: itself)."""
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="output/evidence17")
    p.add_argument("--only", choices=sorted(STUDIES), action="append")
    p.add_argument("--pretrain-iters", type=int, default=300)
    p.add_argument("--det-iters", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="detector seeds (SEED); each seed trains a pretrained and a scratch detector")
    p.add_argument("--jobs", type=int, default=1, help="detection runs at a time (processes)")
    p.add_argument("--pretrain-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override for both pretraining stages (repeatable)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for the detectors")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    extra = [o for o in args.opts if o != "--"]
    pre_extra = [x for kv in args.pretrain_opt for x in kv]
    rows = []
    for name in args.only or sorted(STUDIES):
        fp_cfg, bin_cfg, det_cfg = STUDIES[name]
        it = args.pretrain_iters
        sched = ["SOLVER.MAX_ITER", str(it), "SOLVER.STEPS", f"({int(it * 2 / 3)}, {int(it * 13 / 15)})"]
        sched += pre_extra
        fp_out = os.path.join(args.out, name, "pretrain_fp")
        bin_out = os.path.join(args.out, name, "pretrain_binary")
        fp = _run("tools/pretrain_backbone.py", f"configs/Pretrain/{fp_cfg}.yaml", fp_out, sched)
        binary = _run("tools/pretrain_backbone.py", f"configs/Pretrain/{bin_cfg}.yaml", bin_out,
                      sched + ["MODEL.WEIGHTS", os.path.join(fp_out, "model_final.pth")])
        d = args.det_iters
        det_sched = ["SOLVER.MAX_ITER", str(d), "SOLVER.STEPS", f"({int(d * 0.75)}, {int(d * 0.925)})",
                     "SOLVER.CHECKPOINT_PERIOD", str(d)]
        weights = os.path.join(bin_out, "model_final.pth")
        # one pretrained and one scratch detector per seed, the same schedule and data order
        jobs = []
        for seed in args.seeds:
            for kind, w in (("pretrained", weights), ("scratch", "")):
                out = os.path.join(args.out, name, f"det_{kind}_seed{seed}")
                jobs.append((kind, seed, out, det_sched + ["SEED", str(seed), "MODEL.WEIGHTS", w] + extra))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda j: _run("train_net.py", det_cfg, j[2], j[3]), jobs))
        per = {"pretrained": {}, "scratch": {}}
        for (kind, seed, _, _), r in zip(jobs, results):
            per[kind][seed] = r
        rows.append((name, det_cfg, d, fp, binary, per))
    nan = float("nan")
    print("\n| binary detector (Xnor-Net) | iterations | float backbone top-1 / top-5 | "
          "binary backbone top-1 / top-5 | AP50 from the binary backbone | AP50 from scratch | "
          "pretrained better (seeds) | AP pretrained / scratch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, det_cfg, d, fp, binary, per in rows:
        cells = [f"{r.get('top1', nan):.1f} / {r.get('top5', nan):.1f}" for r in (fp, binary)]
        pre = [per["pretrained"][s].get("AP50", nan) for s in args.seeds]
        scr = [per["scratch"][s].get("AP50", nan) for s in args.seeds]
        cells += [_spread(pre), _spread(scr), f"{sum(a > b for a, b in zip(pre, scr))} of {len(args.seeds)}"]
        cells.append(_spread([per["pretrained"][s].get("AP", nan) for s in args.seeds]) + " / "
                     + _spread([per["scratch"][s].get("AP", nan) for s in args.seeds]))
        print(f"| `{det_cfg}` | {d} | " + " | ".join(cells) + " |")
    print(f"\nseeds {args.seeds}; AP50 per seed (pretrained / scratch):")
    for name, _, _, _, _, per in rows:
        print(f"  {name}: " + ", ".join(
            f"{s}: {per['pretrained'][s].get('AP50', nan):.2f} / {per['scratch'][s].get('AP50', nan):.2f}"
            for s in args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
