#!/usr/bin/env python
"""Every detector family through ``train_net.py`` as a user runs it: train, ``kill -9`` in the
middle, ``--resume`` to the end, then ``--eval-only`` on the final checkpoint.

Run it with the python of the environment to check (e.g. ``.venv/bin/python`` for detectron2
v0.6, ``.venv-detectron2-main-<commit>/bin/python`` for detectron2 main); it prints one row per
family (iterations reached before the kill, the iteration the resumed run started from, the
evaluation's first metrics) and exits non-zero when any family fails. Tiny settings: narrow
widths, the embedded ``*_tiny_*`` splits, 64-pixel images, 16 iterations, a checkpoint every 2,
score threshold 0 (an almost untrained model must still output boxes).

    .venv/bin/python tools/check_families.py [--only retinanet fcos ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_ITER = 16

# (family, config, extra overrides): one config per meta-architecture, the GAN loop included
FAMILIES = [
    ("retinanet_liq2", "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml", []),
    ("fcos_liq2", "configs/FCOS/R18-FPN-shapes-cpu-2bit.yaml", []),
    ("faster_rcnn_binary", "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml", []),
    # paper 000's C4 Faster R-CNN (res5 of Bi-Real blocks on each RoI) with the BiDet objective;
    # res2 width 16 and 16 RoIs per image keep its per-RoI res5 cheap
    ("faster_rcnn_c4_bidet", "configs/BiDet/FasterRCNN-R18-C4-shapes-voc-cpu-BiDet.yaml",
     ["MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
      "MODEL.RPN.POST_NMS_TOPK_TEST", "10"]),
    ("ssd_xnor", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml",
     ["MODEL.VGG.WIDTH_MULT", "0.125"]),
    ("bidet_ssd", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml",
     ["MODEL.VGG.WIDTH_MULT", "0.125"]),
    ("autobidet_frcnn_gan", "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-AutoBiDet.yaml", []),
    ("centernet_binary", "configs/CenterNet/q-shapes-cpu-binary.yaml", []),
    ("yolov2_bwn", "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml",
     ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.SCOPE", "['m0', 'm1', 'm2']",
      "MODEL.DARKNET.WIDTH_MULT", "0.125"]),
]


def _tiny(name: str) -> str:
    """``aqd_shapes_train`` -> ``aqd_shapes_tiny_train`` (the 8-16 image splits)."""
    prefix, _, split = name.rpartition("_")
    return name if prefix.endswith("_tiny") else f"{prefix}_tiny_{split}"


def _overrides(config: str, out: Path, extra) -> list:
    from detectron2.config import get_cfg

    import aqd_d2

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / config))
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
            "DATASETS.TRAIN", f"('{_tiny(cfg.DATASETS.TRAIN[0])}',)",
            "DATASETS.TEST", f"('{_tiny(cfg.DATASETS.TEST[0])}',)",
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
            "TEST.EVAL_PERIOD", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.FPN.OUT_CHANNELS", "64", "OUTPUT_DIR", str(out)]
    for key, node in cfg.MODEL.items():
        if hasattr(node, "keys") and "SCORE_THRESH_TEST" in node:
            opts += [f"MODEL.{key}.SCORE_THRESH_TEST", "0.0"]
    for role in ("W", "A"):  # data-based LIQ init is slow and pointless on random weights
        if getattr(cfg.MODEL.QUANT, f"{role}_METHOD") == "liq" and \
                not getattr(cfg.MODEL.QUANT, f"{role}_KWARGS"):
            opts += [f"MODEL.QUANT.{role}_KWARGS", "['init=max']"]
    return opts + list(extra)


def _train_net(config: str, opts, *extra_args, log: Path):
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / config),
           *extra_args, *opts]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def check_family(family: str, config: str, extra, out: Path, timeout: float = 600) -> dict:
    """Train, kill -9 once a checkpoint of iteration 4 or later exists, resume to the end,
    evaluate; returns a result row (raises on a failure)."""
    out.mkdir(parents=True, exist_ok=True)
    opts = _overrides(config, out, extra)
    proc = _train_net(config, opts, log=out / "run1.log")
    deadline = time.time() + timeout
    def saved_iters():
        return sorted(int(m.group(1)) + 1 for p in out.glob("model_*.pth")
                      if (m := re.fullmatch(r"model_(\d+)\.pth", p.name)))

    while not any(i >= 4 for i in saved_iters()):
        if proc.poll() is not None:
            raise RuntimeError(f"{family}: training exited with {proc.returncode} before its "
                               f"second checkpoint; see {out / 'run1.log'}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{family}: no checkpoint after {timeout} s")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (out / "model_final.pth").exists():
        raise RuntimeError(f"{family}: training finished before it could be killed")
    killed_after = saved_iters()
    resumed = _train_net(config, opts, "--resume", log=out / "run2.log")
    if resumed.wait(timeout) != 0:
        raise RuntimeError(f"{family}: --resume exited with {resumed.returncode}; "
                           f"see {out / 'run2.log'}")
    log2 = (out / "run2.log").read_text()
    m = re.search(r"Starting training from iteration (\d+)", log2)
    start = int(m.group(1)) if m else None
    if start is None or start < 4:
        raise RuntimeError(f"{family}: the resumed run did not continue from the checkpoint "
                           f"(started at {start}); see {out / 'run2.log'}")
    final = out / "model_final.pth"
    ev = _train_net(config, opts + ["MODEL.WEIGHTS", str(final)], "--eval-only",
                    log=out / "eval.log")
    if ev.wait(timeout) != 0:
        raise RuntimeError(f"{family}: --eval-only exited with {ev.returncode}; "
                           f"see {out / 'eval.log'}")
    m = re.search(r"copypaste: (AP[^\n]*)\n[^\n]*copypaste: ([^\n]*)", (out / "eval.log").read_text())
    metrics = dict(zip(m.group(1).split(","), m.group(2).split(","))) if m else {}
    if not metrics:
        raise RuntimeError(f"{family}: the evaluation printed no metrics; see {out / 'eval.log'}")
    return {"family": family, "checkpoints_at_kill": killed_after, "resumed_from": start,
            "metrics": {k: metrics[k] for k in list(metrics)[:2]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="family names to run")
    parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = parser.parse_args(argv)
    families = [f for f in FAMILIES if not args.only or f[0] in args.only]
    unknown = set(args.only or ()) - {f[0] for f in FAMILIES}
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {[f[0] for f in FAMILIES]}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aqd_families_"))
    import detectron2

    from aqd_d2 import compat

    print(f"detectron2 {detectron2.__version__} at {Path(detectron2.__file__).parent}, "
          f"compiled ops: {compat.has_compiled_ops()}")
    failures = 0
    for family, config, extra in families:
        t = time.time()
        try:
            row = check_family(family, config, extra, root / family)
            print(f"{family:22s} ok   {time.time() - t:5.0f} s  killed after "
                  f"iters {row['checkpoints_at_kill']}, resumed from iter {row['resumed_from']}, "
                  f"eval {json.dumps(row['metrics'])}", flush=True)
        except Exception as e:  # report every family, then fail
            failures += 1
            print(f"{family:22s} FAIL {time.time() - t:5.0f} s  {e}", flush=True)
    if not args.out and not failures:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{len(families) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
