"""tools/bidet_study.py (issue 16): the command end to end with tiny CPU settings (float init,
then AutoBiDet for the C4 Faster R-CNN and SSD300 twins, one Figure 7 sweep cell), and its
pieces without training: the device comes from the config / command line (cuda is not forced
to cpu), seeds are summarised as mean and spread, Figure 7's sweep keeps eq. 7's balance, the
GAN round every k iterations, and the sizing of a GPU run from a calibration."""
import importlib.util
import json
import math

import pytest

from tests.conftest import REPO

TINY = ["--batch", "2", "--size", "64", "--train-set", "aqd_shapes_voc_tiny_train",
        "--test-set", "aqd_shapes_voc_tiny_val", "MODEL.VGG.WIDTH_MULT", "0.125",
        "MODEL.BIDET.AUTO.CHANNELS", "8", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "10"]


def _study():
    spec = importlib.util.spec_from_file_location("bidet_study", REPO / "tools" / "bidet_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_smoke_c4_and_ssd(tmp_path):
    study = _study()
    summary = study.main(["--out", str(tmp_path), "--detectors", "c4", "ssd", "--only", "autobidet",
                          "--sweep", "--sweep-betas", "10", "--sweep-gammas", "2", "--max-iter", "1", *TINY])
    groups = {(g["detector"], g["run"]): g for g in summary["groups"]}
    assert set(groups) == {("c4", "fp"), ("c4", "autobidet"), ("ssd", "fp"), ("ssd", "autobidet"),
                           ("ssd", "beta10_gamma2")}
    n_gt = None
    for g in groups.values():
        m = g["metrics"][0]
        assert {"AP50", "AP", "TP", "FP", "FN", "minutes", "iters"} <= set(m)
        assert 0.0 <= m["AP50"] <= 100.0 or math.isnan(m["AP50"])
        n_gt = n_gt or m["TP"] + m["FN"]
        assert m["TP"] + m["FN"] == n_gt  # every run sees the same ground truth
    # binary runs start from their detector's float run
    assert (tmp_path / "c4" / "fp" / "seed0" / "model_final.pth").exists()
    sweep = groups[("ssd", "beta10_gamma2")]
    assert (sweep["beta"], sweep["gamma"]) == (10.0, 2.0)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["gan_every"] == 1 and len(saved["groups"]) == 5
    md = (tmp_path / "study.md").read_text()
    assert "| c4 | AutoBiDet |" in md and "Figure 7 sweep" in md and "| 10 |" in md


def test_device_comes_from_the_config_and_command_line(tmp_path):
    study = _study()
    args = study.parse_args(["--out", str(tmp_path), "MODEL.DEVICE", "cuda"])
    spec = study.study_specs(args, 1, {})[1]  # c4 xnor, seed 0
    cfg = study.build_cfg(spec)
    assert cfg.MODEL.DEVICE == "cuda"  # not forced to cpu
    assert cfg.MODEL.WEIGHTS.endswith("c4/fp/seed0/model_final.pth")
    assert study.build_cfg(study.study_specs(study.parse_args(["--out", str(tmp_path)]), 1, {})[1]).MODEL.DEVICE == "cpu"


def test_seeds_and_sweep_specs(tmp_path):
    study = _study()
    args = study.parse_args(["--out", str(tmp_path), "--seeds", "0", "1", "2", "--sweep", "--max-iter", "7"])
    specs = study.study_specs(args, 3, {})
    # per detector: one float run (phase 0), 3 methods x 3 seeds (phase 1); 12 sweep cells
    assert [s["run"] for s in specs if s["phase"] == 0] == ["fp", "fp"]
    binary = [s for s in specs if s["run"] in ("xnor", "bidet", "autobidet")]
    assert len(binary) == 2 * 3 * 3 and {s["seed"] for s in binary} == {0, 1, 2}
    assert {s["gan_every"] for s in binary if s["run"] == "autobidet"} == {3}
    assert {s["gan_every"] for s in binary if s["run"] != "autobidet"} == {1}
    sweep = [s for s in specs if "beta" in s]
    assert len(sweep) == 12 and {s["beta"] for s in sweep} == {0.1, 1.0, 10.0, 100.0}
    # eq. 7's balance in the sweep: GAMMA = gamma / Z, Z = 1 / FEATURE_WEIGHT of the config
    z = 1.0 / study._feature_weight(study.RUNS["ssd"][2][2])
    cell = [s for s in sweep if s["beta"] == 0.1 and s["gamma"] == 2.0][0]
    cfg = study.build_cfg(cell)
    assert cfg.MODEL.BIDET.BETA == 0.1 and cfg.MODEL.BIDET.GAMMA == pytest.approx(2.0 / z)
    assert cfg.SOLVER.MAX_ITER == 7 and cell["weights"].endswith("ssd/fp/seed0/model_final.pth")


def test_summary_mean_and_spread():
    study = _study()
    specs = [{"detector": "c4", "run": "xnor", "config": "x", "seed": s} for s in (0, 1, 2)]
    results = [{"AP50": 40.0, "FP": 10.0, "iters": 5}, {"AP50": 42.0, "FP": 14.0, "iters": 5},
               {"AP50": 44.0, "FP": 12.0, "iters": 5}]
    g = study.summarize(specs, results)["groups"][0]
    assert g["seeds"] == [0, 1, 2] and g["mean"]["AP50"] == 42.0 and g["std"]["AP50"] == 2.0
    assert g["mean"]["FP"] == 12.0 and g["std"]["FP"] == 2.0
    assert "| c4 | Xnor-Net | 3 | 5 | 42.0 ± 2.0 |" in study.table({"groups": [g]})


def test_gan_every_auto_and_budget_from_calibration(tmp_path):
    study = _study()
    calib = {f"{d}/{r}": v for d in ("c4", "ssd") for r, v in (
        ("fp_gan1", 0.05), ("xnor_gan1", 0.10), ("bidet_gan1", 0.11),
        ("autobidet_gan1", 0.25), ("autobidet_gan0", 0.12))}
    # c0 + (c1 - c0) / k <= 1.5 * 0.10: k >= 0.13 / 0.03 -> 5
    assert study.choose_gan_every(calib, ["c4", "ssd"]) == 5
    assert 0.12 + 0.13 / 5 <= 1.5 * 0.10 < 0.12 + 0.13 / 4
    with pytest.raises(SystemExit, match="without GAN rounds"):
        study.choose_gan_every(dict(calib, **{"c4/autobidet_gan0": 0.2}), ["c4"])
    args = study.parse_args(["--out", str(tmp_path), "--seeds", "0", "1", "2", "--sweep", "--budget-s", "600",
                             "--jobs", "6", "--eval-s", "20"])
    it = study.plan_iterations(calib, args, 5)
    n = it["main"]
    assert it == {"fp": 2 * n, "main": n, "sweep": n // 2}
    # the plan's own estimate of the run fits the budget: startup + evals + iterations
    auto = 0.12 + 0.13 / 5
    per_iter = 2 * 0.05 + (2 * 3 * (0.10 + 0.11 + auto) + 0.11 * 0.5 * 12) / 6
    fixed = 2 * study.STARTUP_S + 20 * (2 + (2 * 10 + 12 - 2) / 6)
    assert fixed + n * per_iter <= 600 < fixed + (n + 1) * per_iter
    with pytest.raises(SystemExit, match="iterations per run"):
        study.plan_iterations(calib, study.parse_args(["--out", str(tmp_path), "--budget-s", "50"]), 1)


def test_budget_needs_only_the_calibrated_detectors_without_sweep(tmp_path):
    # a C4-only study calibrates c4 alone; without --sweep the sweep detector's time is not needed
    study = _study()
    calib = {"c4/fp_gan1": 4.0, "c4/xnor_gan1": 5.76, "c4/bidet_gan1": 5.78,
             "c4/autobidet_gan1": 7.21, "c4/autobidet_gan0": 5.81}
    args = study.parse_args(["--out", str(tmp_path), "--detectors", "c4", "--seeds", "0", "1", "2",
                             "--jobs", "2", "--budget-s", "4600"])
    # per n: float 2 x 4.0, binary 3 seeds x (5.76 + 5.78 + 7.21) / 2 jobs = 36.125 s;
    # fixed: 2 x 30 s start-up + 20 s x (1 + 9 / 2) evaluations = 170 s -> n = 4430 / 36.125 = 122
    assert study.plan_iterations(calib, args, 1) == {"fp": 244, "main": 122, "sweep": 61}
    with pytest.raises(SystemExit, match="no time for ssd/bidet_gan1"):
        study.plan_iterations(calib, study.parse_args(
            ["--out", str(tmp_path), "--detectors", "c4", "--sweep", "--budget-s", "4600"]), 1)


def test_overrides_swallowed_by_only_are_an_error(tmp_path):
    study = _study()
    args = study.parse_args(["--out", str(tmp_path), "--only", "xnor", "--max-iter", "3", "SOLVER.BASE_LR", "0.1"])
    assert args.only == ["xnor"] and args.opts == ["SOLVER.BASE_LR", "0.1"]
    with pytest.raises(SystemExit, match=r"unknown run\(s\) \['SOLVER.BASE_LR', '0.1'\]"):
        study.main(["--out", str(tmp_path), "--only", "xnor", "SOLVER.BASE_LR", "0.1"])
    with pytest.raises(SystemExit, match="--calibrate first"):
        study.main(["--out", str(tmp_path), "--gan-every", "auto"])
    assert not any(p.suffix == ".json" for p in tmp_path.rglob("*"))  # nothing ran


def test_spawned_dataloader_workers_get_the_compat_shims():
    """A run's DataLoader workers are spawned and re-import tools/bidet_study.py as __mp_main__
    before unpickling detectron2 objects: in a fresh interpreter, that import alone must make
    detectron2.data importable (on detectron2 0.6 + Pillow >= 10 it needs aqd_d2's shim;
    the study's evaluation loader died with "PIL.Image has no attribute LINEAR")."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import runpy; runpy.run_path(%r, run_name='__mp_main__'); "
            "import detectron2.data; from detectron2.data.transforms import ExtentTransform; print('ok')"
            % str(REPO / "tools" / "bidet_study.py"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_spawned_runs_with_a_dataloader_worker_evaluate_and_resume(tmp_path):
    """The study's own path, as a command: runs in spawned processes (--jobs 2), one DataLoader
    worker each, evaluation at the end. A run whose result is missing but whose model_final
    exists (its evaluation failed) is evaluated again without retraining."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "tools" / "bidet_study.py"), "--out", str(tmp_path), "--detectors", "c4",
           "--only", "xnor", "--seeds", "0", "--max-iter", "2", "--workers", "1", "--jobs", "2", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    fp = tmp_path / "c4" / "fp" / "seed0"
    first = json.loads((fp / "result.json").read_text())
    assert "AP50" in first and first["TP"] + first["FN"] > 0
    assert "AP50" in json.loads((tmp_path / "c4" / "xnor" / "seed0" / "result.json").read_text())
    (fp / "result.json").unlink()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    import re

    starts = [int(x) for x in re.findall(r"Starting training from iteration (\d+)", res.stdout + res.stderr)]
    assert starts and min(starts) >= 2, starts  # resumed after the last iteration: nothing retrained
    again = json.loads((fp / "result.json").read_text())
    assert again["AP50"] == first["AP50"] and again["TP"] == first["TP"]
