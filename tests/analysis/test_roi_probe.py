"""RoI-level diagnostics (aqd_d2.analysis.roi_probe, tools/probe_rcnn.py)."""
import json
import math
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou

import aqd_d2
from aqd_d2.analysis.roi_probe import (KINDS, format_probe, head_diagnostics, linear_probe, probe_rcnn,
                                       sample_background_boxes)

from ..conftest import REPO

C4_FP = str(REPO / "configs/FasterRCNN/R18-C4-shapes-voc-cpu-FP.yaml")
TINY = ["DATASETS.TRAIN", "('aqd_shapes_voc_tiny_train',)", "DATASETS.TEST", "('aqd_shapes_voc_tiny_val',)",
        "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64"]


def _cfg(opts=()):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(C4_FP)
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def test_background_boxes_are_background_and_alternate():
    gt = torch.tensor([[10.0, 10.0, 40.0, 30.0], [60.0, 50.0, 90.0, 100.0]])
    g = torch.Generator().manual_seed(3)
    boxes, kinds = sample_background_boxes(gt, (128, 120), 6, g, max_iou=0.5)
    assert boxes.shape == (6, 4) and kinds.tolist() == [1, 2, 1, 2, 1, 2]
    assert float(pairwise_iou(Boxes(boxes), Boxes(gt)).max()) < 0.5
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 120).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 128).all()
    # partial boxes overlap their object (they are the hard negatives), random ones need not
    assert float(pairwise_iou(Boxes(boxes[kinds == 2]), Boxes(gt)).max(1).values.min()) > 0


def test_background_boxes_without_objects_are_random():
    boxes, kinds = sample_background_boxes(torch.zeros(0, 4), (64, 64), 3, torch.Generator().manual_seed(0))
    assert kinds.tolist() == [1, 1, 1] and boxes.shape == (3, 4)


def test_linear_probe_scores_by_kind():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(3).repeat(40)
    x = centers[y] + 0.3 * torch.randn(len(y), 2, generator=g)
    kinds = torch.tensor([0, 1, 2]).repeat(40)
    res = linear_probe(x[:60], y[:60], x[60:], y[60:], kinds[60:])
    assert res["train"] == 100.0 and res["test"] == 100.0
    assert {f"test_{k}" for k in KINDS} <= set(res)
    # one test sample of each class moved onto another class's center: exactly those are wrong
    x2 = x[60:].clone()
    x2[0] = centers[1]  # a class-0 sample (kind 0) at class 1
    res = linear_probe(x[:60], y[:60], x2, y[60:], kinds[60:])
    assert math.isclose(res["test"], 100 * 59 / 60, rel_tol=1e-6)
    assert math.isclose(res["test_object"], 100 * 19 / 20, rel_tol=1e-6)
    assert res["test_random_background"] == 100.0
    with pytest.raises(ValueError, match="at least one"):
        linear_probe(x[:0], y[:0], x, y)


def test_probe_rcnn_on_tiny_c4_restores_bn_statistics():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = probe_rcnn(cfg, model, limit=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "probing changed the model"
    assert model.training  # mode restored
    model.eval()
    probe_rcnn(cfg, model, limit=2)
    assert not any(m.training for m in model.modules()), "an eval-mode model came back with BN training"
    n_obj = res["detector"]["objects"]
    assert n_obj > 0 and res["boxes"]["test"] == 3 * n_obj  # two negatives per object
    for level in ("pooled", "head"):
        p = res[f"probe_{level}"]
        assert 0 <= p["test"] <= 100 and "test_object" in p and "test_partial_background" in p
    d = res["detector"]
    assert all(0 <= d[k] <= 100 for k in ("rpn_recall", "head_right", "head_right_among_objects"))
    assert 0 < d["p_right"] < 1
    table = format_probe(res, "init")
    assert table.count("\n") == 2 and "| init |" in table
    # the probe is deterministic for the same weights
    again = probe_rcnn(cfg, model, limit=4)
    assert again["probe_head"] == res["probe_head"] and again["detector"] == res["detector"]


def test_head_right_is_the_heads_argmax():
    """head_diagnostics counts what the box predictor says: a predictor biased to class 0
    is right exactly on the class-0 objects."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    pred = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        pred.weight.zero_()
        pred.bias.zero_()
        pred.bias[0] = 10.0
    from aqd_d2.analysis.roi_probe import _images
    imgs = _images(cfg, "aqd_shapes_voc_tiny_val", 4)
    classes = torch.cat([d["classes"] for d in imgs])
    d = head_diagnostics(model, imgs)
    expect = 100 * float((classes == 0).float().mean())
    assert math.isclose(d["head_right"], expect, rel_tol=1e-6)
    assert math.isclose(d["head_right_among_objects"], expect, rel_tol=1e-6)
    p0 = math.exp(10) / (math.exp(10) + cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    p_other = 1 / (math.exp(10) + cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    expect_p = float((classes == 0).float().mean()) * p0 + float((classes != 0).float().mean()) * p_other
    assert math.isclose(d["p_right"], expect_p, rel_tol=1e-5)


def test_probe_refuses_a_one_stage_detector():
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    with pytest.raises(ValueError, match="two-stage detector"):
        probe_rcnn(cfg, model)
    with pytest.raises(ValueError, match="bn = 'x'"):
        from aqd_d2.analysis.roi_probe import roi_features
        roi_features(build_model(_cfg()), [], bn="x")
    with pytest.raises(ValueError, match="at least one image"):
        roi_features(build_model(_cfg()), [])


def test_probe_without_test_resize():
    """INPUT.MIN_SIZE_TEST 0 keeps the images' own size (detectron2's test-time meaning)."""
    from aqd_d2.analysis.roi_probe import _images
    cfg = _cfg(["INPUT.MIN_SIZE_TEST", "0"])
    imgs = _images(cfg, "aqd_shapes_voc_tiny_val", 2)
    assert all(tuple(d["image"].shape[1:]) == (128, 128) for d in imgs)
    resized = _images(_cfg(), "aqd_shapes_voc_tiny_val", 2)
    assert all(tuple(d["image"].shape[1:]) == (64, 64) for d in resized)
    assert torch.allclose(resized[0]["boxes"], imgs[0]["boxes"] / 2)


def test_probe_cli_writes_json(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(REPO / "tools/probe_rcnn.py"), "--config-file", C4_FP,
                        "--weights", "", "--limit", "3", "--json", str(out), *TINY],
                       cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| random init (seed 0) |" in r.stdout and "RPN recall@0.5" in r.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"random init (seed 0)"}
    assert set(res["random init (seed 0)"]["detector"]) >= {"rpn_recall", "head_right", "p_right"}
