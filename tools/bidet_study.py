#!/usr/bin/env python
"""BiDet study on the embedded VOC-layout data: float init, then Xnor-Net vs BiDet vs AutoBiDet
(paper 000 Table 2 rows; appendix 001 Table 3's false positives) for the Faster R-CNN ResNet-18
C4 and SSD300 VGG16 CPU twins, over several seeds (mean and spread), plus paper 000 Figure 7's
sweep of beta and gamma (SSD300 BiDet, as the paper's ablation) at a shorter schedule.

Every run trains a twin config with aqd_d2's Trainer on the device its config names
(``MODEL.DEVICE``; the twins say cpu, add ``MODEL.DEVICE cuda`` for a GPU), then evaluates it
with detectron2's ``PascalVOCDetectionEvaluator`` (VOC07 11-point AP50; "AP" is the mean over
IoU .50:.95) and :class:`~aqd_d2.analysis.detection_counts.DetectionCountEvaluator` (TP / FP /
FN at IoU 0.5 for detections with score >= ``--score-thresh``). The binary runs start from the
float run of their detector (``--init fp``; one float run per detector, seed ``--seeds[0]``).
Xnor-Net, BiDet and AutoBiDet train with the paper's Adam (lr 1e-3); BiDet / AutoBiDet at eq.
7's balance (beta 10, gamma 0.2; configs/BiDet/*). The sweep keeps eq. 7's balance:
``BETA = beta``, ``GAMMA = gamma / Z`` with the config's ``Z = 1 / FEATURE_WEIGHT``.

AutoBiDet's GAN round (two D steps and one G step, paper 000 sec. 4.1) runs every
``--gan-every k`` detector iterations (default 1, the paper's alternation; the estimator still
gives every image its beta = T(D(G(f))) each iteration). ``--gan-every auto`` picks the smallest k
with an AutoBiDet iteration at most 1.5x an Xnor-Net iteration, from ``--calibrate``'s timings.

Runs go ``--jobs`` at a time in separate processes (one GPU is shared well by several of these
small models); float runs first. Every run writes ``<out>/<detector>/<run>/seed<k>/result.json``
(reused unless ``--force``), the study ``<out>/study.json`` and ``<out>/study.md``.

Usage::

    # CPU smoke run (tests/modeling/test_bidet_study_cli.py)
    python tools/bidet_study.py --out /tmp/s --max-iter 2 --batch 2 --size 64 \
        --train-set aqd_shapes_voc_tiny_train --test-set aqd_shapes_voc_tiny_val
    # one H200, 10 minutes (tools/gpu_bidet_study.sh): time the configs, then size the study
    python tools/bidet_study.py --out out/s --calibrate --jobs 6 MODEL.DEVICE cuda
    python tools/bidet_study.py --out out/s --seeds 0 1 2 --sweep --budget-s 420 --jobs 6 \
        --gan-every auto MODEL.DEVICE cuda
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

# The runs are spawned processes, and so are their DataLoader workers (a spawned process
# starts its own children with spawn). A spawned worker re-imports this script as __mp_main__
# before it unpickles the loader's dataset: importing aqd_d2 here applies its detectron2 compat
# shims there first (detectron2 0.6's transforms need PIL.Image.LINEAR, gone from Pillow 10).
import aqd_d2  # noqa: E402,F401  isort:skip

REPO = Path(__file__).resolve().parent.parent

#: (run, method label, config) per detector; the float run first (it initialises the others)
RUNS: Dict[str, List[tuple]] = {
    "c4": [
        ("fp", "FP (init)", "configs/FasterRCNN/R18-C4-shapes-voc-cpu-FP.yaml"),
        ("xnor", "Xnor-Net", "configs/FasterRCNN/R18-C4-shapes-voc-cpu-XNOR.yaml"),
        ("bidet", "BiDet", "configs/BiDet/FasterRCNN-R18-C4-shapes-voc-cpu-BiDet.yaml"),
        ("autobidet", "AutoBiDet", "configs/BiDet/FasterRCNN-R18-C4-shapes-voc-cpu-AutoBiDet.yaml"),
    ],
    "ssd": [
        ("fp", "FP (init)", "configs/SSD/VGG16-shapes-voc-cpu-FP.yaml"),
        ("xnor", "Xnor-Net", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"),
        ("bidet", "BiDet", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml"),
        ("autobidet", "AutoBiDet", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-AutoBiDet.yaml"),
    ],
    "frcnn": [  # our FPN extension
        ("fp", "FP (init)", "configs/FasterRCNN/R18-FPN-shapes-voc-cpu-FP.yaml"),
        ("xnor", "Xnor-Net", "configs/FasterRCNN/R18-FPN-shapes-voc-cpu-XNOR.yaml"),
        ("bidet", "BiDet", "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-BiDet.yaml"),
        ("autobidet", "AutoBiDet", "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-AutoBiDet.yaml"),
    ],
}
#: paper 000 Figure 7's grid
SWEEP_BETAS = (0.1, 1.0, 10.0, 100.0)
SWEEP_GAMMAS = (0.02, 0.2, 2.0)
#: an AutoBiDet iteration may cost at most this many Xnor-Net iterations (issue 16)
AUTO_COST_LIMIT = 1.5
#: seconds to start a phase's worker processes (imports, CUDA context), for --budget-s
STARTUP_S = 30.0


# ==== one run =================================================================================
def build_cfg(spec: dict):
    """The run's config: the file plus the study's schedule / data / output overrides."""
    import aqd_d2
    from detectron2.config import get_cfg

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / spec["config"]))
    opts = ["OUTPUT_DIR", spec["out_dir"], "MODEL.WEIGHTS", spec["weights"],
            "DATASETS.TRAIN", f"('{spec['train_set']}',)", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", str(spec["workers"]), "SOLVER.CHECKPOINT_PERIOD", "1000000",
            "SEED", str(spec["seed"])]
    if spec.get("max_iter"):
        n = int(spec["max_iter"])
        scale = n / cfg.SOLVER.MAX_ITER
        steps = tuple(sorted({x for x in (int(s * scale) for s in cfg.SOLVER.STEPS) if 0 < x < n}))
        opts += ["SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", str(steps),
                 "SOLVER.WARMUP_ITERS", str(int(cfg.SOLVER.WARMUP_ITERS * scale))]
    if spec.get("batch"):
        opts += ["SOLVER.IMS_PER_BATCH", str(spec["batch"])]
    if spec.get("size"):
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({spec['size']},)", "INPUT.MIN_SIZE_TEST", str(spec["size"])]
    cfg.merge_from_list(opts + list(spec.get("run_opts", [])) + list(spec["opts"]))
    return cfg


def _gan_every(trainer, k: int) -> None:
    """Run the AutoBiDet loop's GAN round only on iterations divisible by ``k`` (k = 1: every
    iteration, the paper's alternation; k = 0: never, for timing the detector step alone)."""
    from detectron2.utils.events import get_event_storage

    from aqd_d2.engine.gan_loop import BiDetGANLoop

    loop = getattr(trainer, "_trainer", None)
    if k == 1 or not isinstance(loop, BiDetGANLoop):
        return
    step = loop.estimator_step

    def every_k(data):
        it = get_event_storage().iter
        return step(data) if k > 0 and it % k == 0 else {}

    loop.estimator_step = every_k


def run_one(spec: dict) -> dict:
    """Train + evaluate one run (its result.json is reused unless ``spec["force"]``)."""
    import torch

    import aqd_d2  # noqa: F401  (registrations)
    from detectron2.engine import HookBase
    from detectron2.evaluation import DatasetEvaluators, PascalVOCDetectionEvaluator

    from aqd_d2.analysis.detection_counts import DetectionCountEvaluator
    from aqd_d2.engine import Trainer

    out_dir = Path(spec["out_dir"])
    done = out_dir / "result.json"
    if done.exists() and not spec.get("force"):
        return json.loads(done.read_text())
    torch.manual_seed(spec["seed"])
    cfg = build_cfg(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    times: List[float] = []

    class IterTimer(HookBase):
        def after_step(self):
            if cfg.MODEL.DEVICE.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    start = time.time()
    trainer = Trainer(cfg)
    # a run stopped after a checkpoint (killed, or its evaluation failed after model_final)
    # continues from it, as train_net.py --resume does; --force starts over
    if spec.get("force"):
        for stale in out_dir.glob("*.pth"):
            stale.unlink()
        (out_dir / "last_checkpoint").unlink(missing_ok=True)
    trainer.resume_or_load(resume=True)
    _gan_every(trainer, int(spec.get("gan_every", 1)))
    trainer.register_hooks([IterTimer()])
    trainer.train()
    result: Dict[str, float] = {}
    warm = min(5, max(len(times) // 4, 0))
    if len(times) - warm >= 2:
        result["s_per_iter"] = (times[-1] - times[warm]) / (len(times) - 1 - warm)
    if spec.get("evaluate", True):
        trainer.checkpointer.save("model_final")
        test = cfg.clone()
        test.defrost()
        test.DATASETS.TEST = (spec["test_set"],)
        ev = DatasetEvaluators([PascalVOCDetectionEvaluator(spec["test_set"]),
                                DetectionCountEvaluator(spec["test_set"], iou=0.5,
                                                        score_thresh=spec["score_thresh"])])
        res = Trainer.test(test, trainer.model, evaluators=[ev])
        result.update({k: float(v) for k, v in res.get("bbox", {}).items()})
        result.update({k: float(v) for k, v in res.get("counts", {}).items()})
    result["minutes"] = (time.time() - start) / 60
    result["iters"] = int(cfg.SOLVER.MAX_ITER)
    done.write_text(json.dumps(result, indent=1))
    return result


def run_all(specs: List[dict], jobs: int) -> List[dict]:
    """Run ``specs`` ``jobs`` at a time (separate processes when jobs > 1), in order of their
    ``phase`` (all runs of a phase may run together). Returns the results in spec order."""
    results: List[Optional[dict]] = [None] * len(specs)
    for phase in sorted({s["phase"] for s in specs}):
        idx = [i for i, s in enumerate(specs) if s["phase"] == phase]
        if jobs <= 1:
            for i in idx:
                results[i] = run_one(specs[i])
            continue
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, specs[i]): i for i in idx}
            for f in cf.as_completed(futures):
                results[futures[f]] = f.result()
    return results  # type: ignore[return-value]


# ==== planning ================================================================================
def _base_spec(args, detector: str, run: str, config: str, seed: int, out: Path) -> dict:
    return {"detector": detector, "run": run, "config": config, "seed": seed, "out_dir": str(out),
            "weights": "", "train_set": args.train_set, "test_set": args.test_set,
            "workers": args.workers, "batch": args.batch, "size": args.size,
            "score_thresh": args.score_thresh, "opts": list(args.opts), "force": args.force,
            "max_iter": args.max_iter, "gan_every": 1, "phase": 1}


def study_specs(args, gan_every: int, iters: Dict[str, int]) -> List[dict]:
    """Float runs (phase 0), then every method x seed and the sweep (phase 1)."""
    out = Path(args.out)
    specs = []
    for det in args.detectors:
        fp_weights = ""
        for run, _, config in RUNS[det]:
            if run == "fp":
                if args.init == "scratch":
                    continue
                s = _base_spec(args, det, run, config, args.seeds[0], out / det / run / f"seed{args.seeds[0]}")
                s.update(phase=0, max_iter=iters.get("fp") or args.max_iter)
                specs.append(s)
                fp_weights = str(Path(s["out_dir"]) / "model_final.pth")
                continue
            if args.only and run not in args.only:
                continue
            for seed in args.seeds:
                s = _base_spec(args, det, run, config, seed, out / det / run / f"seed{seed}")
                s.update(weights=fp_weights, max_iter=iters.get("main") or args.max_iter,
                         gan_every=gan_every if run == "autobidet" else 1)
                specs.append(s)
    if args.sweep:
        det, (_, _, fp_cfg), (_, _, config) = args.sweep_detector, RUNS[args.sweep_detector][0], \
            RUNS[args.sweep_detector][2]
        fp = [s for s in specs if s["detector"] == det and s["run"] == "fp"]
        weights = str(Path(fp[0]["out_dir"]) / "model_final.pth") if fp else ""
        z = 1.0 / _feature_weight(config)
        for beta in args.sweep_betas:
            for gamma in args.sweep_gammas:
                name = f"beta{beta:g}_gamma{gamma:g}"
                s = _base_spec(args, det, "sweep", config, args.seeds[0],
                               out / det / "sweep" / name / f"seed{args.seeds[0]}")
                s.update(weights=weights, max_iter=iters.get("sweep") or args.sweep_iters or args.max_iter,
                         run_opts=["MODEL.BIDET.BETA", str(beta), "MODEL.BIDET.GAMMA", str(gamma / z)],
                         beta=beta, gamma=gamma, run=name)
                specs.append(s)
    return specs


def _feature_weight(config: str) -> float:
    import aqd_d2
    from detectron2.config import get_cfg

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / config))
    return float(cfg.MODEL.BIDET.FEATURE_WEIGHT)


def calibrate(args) -> dict:
    """s/iter of every config of the study (and AutoBiDet without GAN rounds), ``--jobs`` at
    a time as in the study, ``--calib-iters`` iterations each, no evaluation."""
    out = Path(args.out) / "calibration"
    specs = []
    for det in args.detectors:
        for run, _, config in RUNS[det]:
            for k in ([1, 0] if run == "autobidet" else [1]):
                s = _base_spec(args, det, run, config, 0, out / det / f"{run}_gan{k}")
                s.update(max_iter=args.calib_iters, evaluate=False, gan_every=k, phase=0)
                specs.append(s)
    res = run_all(specs, args.jobs)
    calib = {f"{s['detector']}/{Path(s['out_dir']).name}": r.get("s_per_iter") for s, r in zip(specs, res)}
    (Path(args.out) / "calibration.json").write_text(json.dumps(calib, indent=1))
    return calib


def choose_gan_every(calib: dict, detectors: List[str]) -> int:
    """Smallest k with ``c0 + (c1 - c0) / k <= 1.5 * c_xnor`` for every detector (c1, c0: an
    AutoBiDet iteration with a GAN round every iteration / never)."""
    k = 1
    for det in detectors:
        c1, c0, cx = (calib.get(f"{det}/{n}") for n in ("autobidet_gan1", "autobidet_gan0", "xnor_gan1"))
        if not (c1 and c0 and cx):
            continue
        limit = AUTO_COST_LIMIT * cx
        if c1 <= limit:
            continue
        if c0 >= limit:
            raise SystemExit(f"{det}: an AutoBiDet iteration without GAN rounds ({c0:.3f} s) already "
                             f"costs more than {AUTO_COST_LIMIT}x Xnor-Net's ({cx:.3f} s)")
        k = max(k, math.ceil((c1 - c0) / (limit - c0)))
    return k


def plan_iterations(calib: dict, args, gan_every: int) -> Dict[str, int]:
    """Iterations (float 2n, binary n, sweep n/2) that fill ``--budget-s`` with ``--jobs`` runs
    at a time, from the calibration's s/iter (measured ``--jobs`` at a time), ``--eval-s`` per
    run (set-up + evaluation) and ``STARTUP_S`` per phase (worker processes, CUDA)."""
    def cost(det, run):
        key = f"{det}/{run}_gan1"
        if run == "autobidet":
            c1, c0 = calib.get(f"{det}/autobidet_gan1"), calib.get(f"{det}/autobidet_gan0")
            if c1 and c0:
                return c0 + (c1 - c0) / max(gan_every, 1)
            key = f"{det}/autobidet_gan1"
        if not calib.get(key):
            raise SystemExit(f"calibration.json has no time for {key}: re-run --calibrate")
        return calib[key]
    runs = _binary_runs(args)
    fp = max(cost(d, "fp") for d in args.detectors) * 2.0  # float phase: detectors side by side
    main = sum(cost(d, r) for d in args.detectors for r in runs) * len(args.seeds)
    cells = len(args.sweep_betas) * len(args.sweep_gammas) if args.sweep else 0
    sweep = cost(args.sweep_detector, "bidet") * 0.5 * cells if cells else 0.0
    n_runs = len(args.detectors) * (1 + len(runs) * len(args.seeds)) + cells
    fixed = 2 * STARTUP_S + args.eval_s * (len(args.detectors) + (n_runs - len(args.detectors)) / args.jobs)
    per_iter = fp + (main + sweep) / args.jobs
    n = int(max(args.budget_s - fixed, 0) / per_iter)
    if n < 10:
        raise SystemExit(f"--budget-s {args.budget_s} leaves {n} iterations per run; give more time "
                         "or fewer seeds / detectors")
    return {"fp": 2 * n, "main": n, "sweep": max(n // 2, 1)}


def _binary_runs(args) -> List[str]:
    """The binary runs of the study (xnor, bidet, autobidet, or ``--only``'s)."""
    return [r for r, _, _ in RUNS["c4"][1:] if not args.only or r in args.only]


# ==== report ==================================================================================
def _stat(values: List[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarize(specs: List[dict], results: List[dict]) -> dict:
    """Per (detector, run): the seeds' metrics, their mean and sample std."""
    groups: Dict[tuple, dict] = {}
    for s, r in zip(specs, results):
        g = groups.setdefault((s["detector"], s["run"]), {
            "detector": s["detector"], "run": s["run"], "config": s["config"], "seeds": [],
            "metrics": [], "beta": s.get("beta"), "gamma": s.get("gamma"),
            "gan_every": s.get("gan_every", 1), "iters": r.get("iters")})
        g["seeds"].append(s["seed"])
        g["metrics"].append(r)
    for g in groups.values():
        keys = sorted({k for m in g["metrics"] for k in m})
        g["mean"] = {k: statistics.mean([m[k] for m in g["metrics"] if k in m]) for k in keys}
        g["std"] = {k: (statistics.stdev([m[k] for m in g["metrics"] if k in m])
                        if sum(k in m for m in g["metrics"]) > 1 else 0.0) for k in keys}
    return {"groups": list(groups.values())}


def table(summary: dict) -> str:
    """Markdown: methods (mean ± std over seeds), then the sweep grid."""
    labels = {r: m for runs in RUNS.values() for r, m, _ in runs}
    lines = ["| detector | method | seeds | iters | VOC07 AP50 | AP (.50:.95) | TP | FP | FN | s/iter |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sweep = []
    for g in summary["groups"]:
        if g["beta"] is not None:
            sweep.append(g)
            continue
        m = g["metrics"]
        col = {k: _stat([x.get(k) for x in m]) for k in ("AP50", "AP", "TP", "FP", "FN")}
        s_it = [x["s_per_iter"] for x in m if x.get("s_per_iter")]
        method = labels.get(g["run"], g["run"]) + (f" (GAN every {g['gan_every']})" if g["gan_every"] != 1 else "")
        lines.append(f"| {g['detector']} | {method} | {len(m)} | {g['iters']} | {col['AP50']} | {col['AP']} | "
                     f"{col['TP']} | {col['FP']} | {col['FN']} | "
                     f"{f'{statistics.mean(s_it):.3f}' if s_it else 'n/a'} |")
    if sweep:
        gammas = sorted({g["gamma"] for g in sweep})
        lines += ["", f"Figure 7 sweep ({sweep[0]['detector']} BiDet, {sweep[0]['iters']} iterations): "
                  "AP50 / FP / FN", "", "| beta \\ gamma | " + " | ".join(f"{x:g}" for x in gammas) + " |",
                  "|---|" + "---|" * len(gammas)]
        for beta in sorted({g["beta"] for g in sweep}):
            cells = []
            for gamma in gammas:
                g = [x for x in sweep if x["beta"] == beta and x["gamma"] == gamma]
                m = g[0]["metrics"] if g else []
                cells.append(" / ".join(_stat([x.get(k) for x in m]) for k in ("AP50", "FP", "FN")) if m else "")
            lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _make_datasets(args) -> None:
    """Generate the embedded datasets once, before parallel runs would race for them."""
    import aqd_d2  # noqa: F401
    from detectron2.data import DatasetCatalog

    for name in (args.train_set, args.test_set):
        DatasetCatalog.get(name)


# ==== command line ============================================================================
def parse_args(argv: Optional[List[str]] = None):
    from aqd_d2.analysis.detection_counts import DEFAULT_SCORE_THRESH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--detectors", nargs="+", choices=sorted(RUNS), default=["c4", "ssd"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every binary run")
    p.add_argument("--init", choices=["fp", "scratch"], default="fp",
                   help="binary runs start from the float run (fp) or from random weights")
    p.add_argument("--only", nargs="*", default=None,
                   help="binary runs to run (xnor bidet autobidet); end the list with another option "
                   "before KEY VALUE overrides")
    p.add_argument("--max-iter", type=int, default=0, help="scale every schedule to this many iterations")
    p.add_argument("--sweep", action="store_true", help="also run Figure 7's beta x gamma sweep")
    p.add_argument("--sweep-detector", choices=sorted(RUNS), default="ssd")
    p.add_argument("--sweep-betas", nargs="+", type=float, default=list(SWEEP_BETAS))
    p.add_argument("--sweep-gammas", nargs="+", type=float, default=list(SWEEP_GAMMAS))
    p.add_argument("--sweep-iters", type=int, default=0, help="iterations of a sweep run (default --max-iter)")
    p.add_argument("--gan-every", default="1",
                   help="AutoBiDet: GAN round every k iterations (1 = the paper), or 'auto' (needs "
                   "<out>/calibration.json): the smallest k with an iteration <= 1.5x Xnor-Net's")
    p.add_argument("--calibrate", action="store_true",
                   help="only time every config (--calib-iters each) into <out>/calibration.json")
    p.add_argument("--calib-iters", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="size the iterations (float 2n, binary n, sweep n/2) to fit this many seconds, "
                   "from <out>/calibration.json")
    p.add_argument("--eval-s", type=float, default=20.0, help="seconds per evaluation, for --budget-s")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    p.add_argument("--batch", type=int, default=0, help="images per batch (default: the configs')")
    p.add_argument("--size", type=int, default=0, help="train/test image size (default: the configs')")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--train-set", default="aqd_shapes_voc_train")
    p.add_argument("--test-set", default="aqd_shapes_voc_val")
    p.add_argument("--score-thresh", type=float, default=DEFAULT_SCORE_THRESH,
                   help="minimum score of a predicted positive for the TP/FP/FN counts")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    names = ["xnor", "bidet", "autobidet"]
    unknown = [n for n in (args.only or []) if n not in names]
    if unknown:  # argparse puts KEY VALUE overrides written after --only into --only
        raise SystemExit(f"--only: unknown run(s) {unknown}; runs are {names}. KEY VALUE overrides "
                         "written right after --only's names are taken as names: put another "
                         "option between them, e.g. --only xnor bidet --max-iter 500 KEY VALUE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        _make_datasets(args)
        calib = calibrate(args)
        print(json.dumps(calib, indent=1))
        return {"calibration": calib}
    calib_file = out / "calibration.json"
    calib = json.loads(calib_file.read_text()) if calib_file.exists() else None
    if args.gan_every == "auto":
        if calib is None:
            raise SystemExit(f"--gan-every auto needs {calib_file}: run with --calibrate first")
        gan_every = choose_gan_every(calib, args.detectors)
    else:
        gan_every = int(args.gan_every)
        if gan_every < 1:
            raise SystemExit(f"--gan-every must be >= 1 or 'auto', got {args.gan_every}")
    iters: Dict[str, int] = {}
    if args.budget_s:
        if calib is None:
            raise SystemExit(f"--budget-s needs {calib_file}: run with --calibrate first")
        iters = plan_iterations(calib, args, gan_every)
    specs = study_specs(args, gan_every, iters)
    _make_datasets(args)
    print(f"{len(specs)} runs, {args.jobs} at a time; AutoBiDet GAN round every {gan_every} "
          f"iteration(s); iterations {iters or args.max_iter or 'of the configs'}", flush=True)
    results = run_all(specs, args.jobs)
    summary = summarize(specs, results)
    summary.update(gan_every=gan_every, iterations=iters, calibration=calib)
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    md = table(summary)
    (out / "study.md").write_text(md + "\n")
    print(md)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
