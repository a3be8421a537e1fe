#!/usr/bin/env python
"""AQD mini-study on the embedded shapes dataset: FP / 4 / 3 / 2-bit RetinaNet-R18 and FCOS-R18,
and 2-bit with shared vs multi-level head BN, all on the same short CPU schedule.

It checks, at demo scale, two claims of AQD (paper 002): 4-bit within about 1 AP of float
(Tables 1-2) and multi-level BN better than shared BN at 2 bits (Table 3). Every run is
``train_net.py`` (aqd_d2's Trainer: train, then COCO evaluation on ``aqd_shapes_val``) in its own
process, with a configs/{RetinaNet,FCOS}/R18-FPN-shapes-cpu-*.yaml file. As in the paper, each
quantized run starts from the float run's final checkpoint (MODEL.WEIGHTS) and uses the same
schedule as the float run (lr 0.01, SGD momentum 0.9, weight decay 1e-4; the configs' 800
iterations of batch 8 unless ``--max-iter`` scales it).

Usage::

    .venv/bin/python tools/aqd_study.py --out output/aqd_study            # all 12 runs
    .venv/bin/python tools/aqd_study.py --out output/aqd_study --only fcos   # FCOS runs only
    .venv/bin/python tools/aqd_study.py --out /tmp/s --max-iter 4 --batch 2 \
        --train-set aqd_shapes_tiny_train --test-set aqd_shapes_tiny_val      # smoke run

Finished runs (their metrics in ``<out>/<run>/metrics.json``) are reused unless ``--force``.
Writes ``<out>/study.json`` and ``<out>/study.md`` and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    name: str  # output sub-directory and --only key
    detector: str  # "RetinaNet" | "FCOS"
    precision: str  # "FP" | "4-bit" ...
    head_bn: str  # "multi-level" | "shared"
    config: str  # path relative to the repository
    init_from: Optional[str] = None  # name of the run whose model_final.pth initializes this one


def study_runs() -> List[Run]:
    """The 12 runs, float ones first (quantized runs start from them)."""
    runs = []
    for det in ("RetinaNet", "FCOS"):
        key = det.lower()
        base = f"configs/{det}/R18-FPN-shapes-cpu"
        runs.append(Run(f"{key}_fp", det, "FP", "multi-level", f"{base}-FP.yaml"))
        # Control: the float model trained once more on the same schedule, so that it has seen
        # as many iterations as the quantized runs (FP schedule + quantized schedule).
        runs.append(Run(f"{key}_fp_ft", det, "FP (x2 schedule)", "multi-level", f"{base}-FP.yaml",
                        f"{key}_fp"))
        for bits in (4, 3, 2):
            runs.append(Run(f"{key}_{bits}bit", det, f"{bits}-bit", "multi-level",
                            f"{base}-{bits}bit.yaml", f"{key}_fp"))
        runs.append(Run(f"{key}_2bit_sharedBN", det, "2-bit", "shared", f"{base}-2bit-sharedBN.yaml",
                        f"{key}_fp"))
    return runs


def schedule_opts(max_iter: Optional[int]) -> List[str]:
    """Overrides scaling the configs' schedule (steps at 75% and 92.5%, as 300/370 of 400)."""
    if not max_iter:
        return []
    steps = sorted({s for s in (round(0.75 * max_iter), round(0.925 * max_iter)) if 0 < s < max_iter})
    return [
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "(" + "".join(f"{s}," for s in steps) + ")",
        "SOLVER.WARMUP_ITERS", str(min(50, max(max_iter // 8, 1))),
        "SOLVER.CHECKPOINT_PERIOD", str(max_iter),
    ]


def read_metrics(run_dir: Path) -> Optional[Dict[str, float]]:
    """The last COCO bbox results written to ``run_dir/metrics.json`` (None if absent)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "bbox/AP" in row:
            found = {m: float(row.get(f"bbox/{m}", math.nan)) for m in METRICS}
    return found


def train(run: Run, out: Path, args) -> Dict[str, float]:
    """Run ``train_net.py`` for ``run`` (unless finished) and return its bbox metrics."""
    run_dir = out / run.name
    metrics = read_metrics(run_dir)
    if metrics is not None and not args.force:
        print(f"[study] {run.name}: reusing {run_dir}/metrics.json", flush=True)
        return metrics
    if run_dir.exists() and args.force:
        for f in ("metrics.json", "last_checkpoint"):
            (run_dir / f).unlink(missing_ok=True)
    weights = ""
    if run.init_from:
        weights = str(out / run.init_from / "model_final.pth")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{run.name} starts from {weights}: run {run.init_from} first")
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / run.config),
           "--num-gpus", "0", "OUTPUT_DIR", str(run_dir), "MODEL.WEIGHTS", weights,
           "SEED", str(args.seed), "TEST.EVAL_PERIOD", "0"]
    cmd += schedule_opts(args.max_iter)
    if args.train_set:
        cmd += ["DATASETS.TRAIN", f"('{args.train_set}',)"]
    if args.test_set:
        cmd += ["DATASETS.TEST", f"('{args.test_set}',)"]
    if args.batch:
        cmd += ["SOLVER.IMS_PER_BATCH", str(args.batch)]
    if args.device:
        cmd += ["MODEL.DEVICE", args.device]
    cmd += list(args.opts)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"[study] {run.name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(out / f"{run.name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{run.name} failed (exit {rc}); see {out / (run.name + '.log')}")
    metrics = read_metrics(run_dir)
    if metrics is None:
        raise RuntimeError(f"{run.name}: no bbox metrics in {run_dir}/metrics.json")
    print(f"[study] {run.name}: AP {metrics['AP']:.1f} in {time.time() - start:.0f}s", flush=True)
    return metrics


def markdown(rows: List[dict]) -> str:
    """Results table in markdown."""
    head = "| Detector | Precision | Head BN | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for r in rows:
        vals = " | ".join(f"{r['metrics'][m]:.1f}" for m in METRICS)
        lines.append(f"| {r['detector']} | {r['precision']} | {r['head_bn']} | {vals} |")
    return "\n".join(lines)


def claims(rows: List[dict]) -> List[str]:
    """AQD's claims checked on the measured numbers (one line each, with the deltas)."""
    by = {r["name"]: r["metrics"]["AP"] for r in rows}
    out = []
    for det in ("retinanet", "fcos"):
        q4 = by.get(f"{det}_4bit")
        for fp_name, what in ((f"{det}_fp", "FP"), (f"{det}_fp_ft", "FP trained as long")):
            fp = by.get(fp_name)
            if fp is not None and q4 is not None:
                ok = q4 >= fp - 1.0
                out.append(f"- {det}: 4-bit AP {q4:.1f} vs {what} {fp:.1f} (delta {q4 - fp:+.1f}): "
                           f"{'within' if ok else 'NOT within'} 1 AP of float")
        ml, sh = by.get(f"{det}_2bit"), by.get(f"{det}_2bit_sharedBN")
        if ml is not None and sh is not None:
            out.append(f"- {det}: 2-bit multi-level BN AP {ml:.1f} vs shared BN {sh:.1f} "
                       f"(delta {ml - sh:+.1f}): multi-level BN {'better' if ml > sh else 'NOT better'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/aqd_study", help="directory of the runs and results")
    p.add_argument("--only", default="",
                   help="comma-separated run names (exact) or substrings of run names to run")
    p.add_argument("--max-iter", type=int, default=0, help="scale the schedule to N iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="OMP threads per training process")
    p.add_argument("--batch", type=int, default=0, help="override SOLVER.IMS_PER_BATCH (0: config's 8)")
    p.add_argument("--train-set", default="", help="override DATASETS.TRAIN (default aqd_shapes_train)")
    p.add_argument("--test-set", default="", help="override DATASETS.TEST (default aqd_shapes_val)")
    p.add_argument("--device", default="", help="override MODEL.DEVICE (e.g. cuda on a GPU machine)")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="further KEY VALUE config overrides applied to every run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in args.only.split(",") if k]
    names = {r.name for r in study_runs()}
    # A key equal to a run name selects that run only; any other key is a substring.
    selected = [r for r in study_runs()
                if not keys or any(k == r.name if k in names else k in r.name for k in keys)]
    rows = []
    for run in selected:
        metrics = train(run, out, args)
        rows.append({"name": run.name, "detector": run.detector, "precision": run.precision,
                     "head_bn": run.head_bn, "config": run.config, "metrics": metrics})
    table = markdown(rows)
    checks = claims(rows)
    setup = {"max_iter": args.max_iter or "config (800)", "batch": args.batch or "config (8)",
             "device": args.device or "config (cpu)", "opts": list(args.opts),
             "seed": args.seed, "train_set": args.train_set or "aqd_shapes_train",
             "test_set": args.test_set or "aqd_shapes_val"}
    (out / "study.json").write_text(json.dumps({"setup": setup, "runs": rows, "claims": checks}, indent=2))
    (out / "study.md").write_text(table + "\n\n" + "\n".join(checks) + "\n")
    print(table)
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
