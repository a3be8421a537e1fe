"""tools/bidet_study.py end to end with smoke settings: Xnor-Net, BiDet and AutoBiDet (Faster
R-CNN R18 twins, from scratch) train 1 iteration each and are evaluated with the VOC evaluator and
the TP/FP/FN counter on the tiny VOC-layout dataset."""
import importlib.util
import json
import math

from tests.conftest import REPO


def _study():
    spec = importlib.util.spec_from_file_location("bidet_study", REPO / "tools" / "bidet_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bidet_study_smoke(tmp_path):
    study = _study()
    rows = study.main(["--out", str(tmp_path), "--init", "scratch", "--max-iter", "1", "--batch", "2", "--size", "64",
                       "--train-set", "aqd_shapes_voc_tiny_train", "--test-set", "aqd_shapes_voc_tiny_val",
                       "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.BIDET.AUTO.CHANNELS", "8"])
    assert [r["run"] for r in rows] == ["xnor", "bidet", "autobidet"]
    n_gt = 0
    for r in rows:
        m = r["metrics"]
        assert {"AP50", "AP", "TP", "FP", "FN"} <= set(m)
        assert 0.0 <= m["AP50"] <= 100.0 or math.isnan(m["AP50"])
        n_gt = n_gt or m["TP"] + m["FN"]
        assert m["TP"] + m["FN"] == n_gt  # every run sees the same ground truth
    assert (tmp_path / "autobidet" / "model_final.pth").exists()
    saved = json.loads((tmp_path / "study.json").read_text())
    assert [r["method"] for r in saved] == ["Xnor-Net", "BiDet", "AutoBiDet"]
    md = (tmp_path / "study.md").read_text()
    assert "| AutoBiDet |" in md and "| Xnor-Net |" in md


def test_overrides_swallowed_by_only_are_an_error(tmp_path):
    import pytest

    study = _study()
    args = study.parse_args(["--out", str(tmp_path), "--only", "fp", "xnor", "--seed", "0", "SOLVER.BASE_LR", "0.1"])
    assert args.only == ["fp", "xnor"] and args.opts == ["SOLVER.BASE_LR", "0.1"]
    with pytest.raises(SystemExit, match=r"unknown run\(s\) \['SOLVER.BASE_LR', '0.1'\]"):
        study.main(["--out", str(tmp_path), "--only", "fp", "SOLVER.BASE_LR", "0.1"])
    assert not any(tmp_path.iterdir())  # nothing ran
