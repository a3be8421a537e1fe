"""TP / FP / FN / TN counts (paper 001 appendix B.4) against hand counts on small examples."""
import importlib.util
import json

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from aqd_d2.analysis.detection_counts import (AnchorCounter, DetectionCountEvaluator, count_detections,
                                              count_image, format_counts, predictions_from_coco_results)
from tests.conftest import REPO


def _ann(box, cls, **extra):
    return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls, **extra}


# Image 1: objects A (class 0), B (class 1), C (class 0).
#   p1 on A, class 0, 0.9           -> TP
#   p2 on A (IoU 0.9), class 0, 0.8 -> FP (duplicate)
#   p3 on B with class 0, 0.7       -> FP, and B stays unmatched -> FN (wrong class)
#   p4 on background, class 1, 0.6  -> FP
#   p5 on C, class 0, 0.005         -> below the 0.01 threshold: not a positive; C -> FN
# Image 2: no objects; one detection -> FP.
# Image 3: one "difficult" object found by one detection -> neither TP nor FP nor FN.
# Totals: TP 1, FP 4, FN 2; with 100 candidates per image TN = 300 - 7 = 293.
DATASET = [
    {"image_id": 1, "height": 80, "width": 80, "annotations": [
        _ann([0, 0, 10, 10], 0), _ann([20, 20, 30, 30], 1), _ann([40, 40, 50, 50], 0)]},
    {"image_id": 2, "height": 80, "width": 80, "annotations": []},
    {"image_id": 3, "height": 80, "width": 80, "annotations": [_ann([0, 0, 10, 10], 1, difficult=1)]},
]
PREDS = {
    1: ([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70], [40, 40, 50, 50]],
        [0.9, 0.8, 0.7, 0.6, 0.005], [0, 0, 0, 1, 0]),
    2: ([[5, 5, 20, 20]], [0.5], [0]),
    3: ([[0, 0, 10, 10]], [0.9], [1]),
}


def _instances(boxes, scores, classes):
    inst = Instances((80, 80))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _records():
    return [{"image_id": k, "instances": _instances(*v)} for k, v in PREDS.items()]


def test_hand_counted_example():
    c = count_detections(_records(), DATASET, num_candidates=100, class_names=["circle", "square"])
    assert (c["TP"], c["FP"], c["FN"], c["TN"]) == (1, 4, 2, 293)
    assert c["per_class"] == {"circle": {"TP": 1, "FP": 3, "FN": 1}, "square": {"TP": 0, "FP": 1, "FN": 1}}
    assert c["num_gt"] == 3 and c["num_images"] == 3
    table = format_counts(c)
    assert "circle" in table and "293" in table
    # without candidates there is no TN; a lower threshold lets p5 find C
    c = count_detections(_records(), DATASET, score_thresh=0.001)
    assert (c["TP"], c["FP"], c["FN"], c["TN"]) == (2, 4, 1, None)
    # per-image candidate counts
    c = count_detections(_records(), DATASET, num_candidates={1: 10, 2: 1, 3: 0})
    assert c["TN"] == (10 - 6) + (1 - 1) + 0


def test_iou_threshold_is_inclusive_and_best_box_rule():
    gt, cls = [[0, 0, 10, 20]], [0]
    det = [[0, 0, 10, 10]]  # IoU = 100 / 200 = 0.5 exactly
    assert count_image(det, [0.9], [0], gt, cls, iou=0.5)["TP"] == 1
    r = count_image(det, [0.9], [0], gt, cls, iou=0.6)
    assert (r["TP"], r["FP"], r["FN"]) == (0, 1, 1)
    # VOC rule: a detection is judged against its best-IoU box only. d2's best box is g1 (IoU
    # 0.82 > 0.67 with g2), already taken by d1, so d2 is a duplicate even though g2 is free.
    gts = [[0, 0, 10, 10], [3, 0, 13, 10]]
    dets = [[0, 0, 10, 10], [1, 0, 11, 10]]
    r = count_image(dets, [0.9, 0.8], [0, 0], gts, [0, 0])
    assert (r["TP"], r["FP"], r["FN"]) == (1, 1, 1)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not in the dataset"):
        count_detections([{"image_id": 99, "instances": _instances([], [], [])}], DATASET)
    with pytest.raises(ValueError, match="candidates"):
        count_detections(_records(), DATASET, num_candidates=2)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        count_image([[0, 0, 1, 1]], [0.5, 0.6], [0], [], [])


def _coco_results(id_offset=0):
    out = []
    for img, (boxes, scores, classes) in PREDS.items():
        for b, s, c in zip(boxes, scores, classes):
            out.append({"image_id": img, "category_id": c + id_offset, "score": s,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    return out


def test_coco_results_with_category_map():
    preds = predictions_from_coco_results(_coco_results(id_offset=1))
    c = count_detections(preds, DATASET, category_id_map={1: 0, 2: 1}, num_candidates=100)
    assert (c["TP"], c["FP"], c["FN"], c["TN"]) == (1, 4, 2, 293)


@pytest.fixture
def registered():
    name = "aqd_test_detection_counts"
    DatasetCatalog.register(name, lambda: DATASET)
    MetadataCatalog.get(name).set(thing_classes=["circle", "square"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_evaluator_matches_function(registered):
    ev = DetectionCountEvaluator(registered, num_candidates=100, distributed=False)
    ev.reset()
    for k, v in PREDS.items():
        ev.process([{"image_id": k}], [{"instances": _instances(*v)}])
    assert ev.evaluate() == {"counts": {"TP": 1.0, "FP": 4.0, "FN": 2.0, "TN": 293.0}}
    # only the processed images are counted (image 1 alone: TP 1, FP 3, FN 2)
    ev.reset()
    ev.process([{"image_id": 1}], [{"instances": _instances(*PREDS[1])}])
    assert ev.evaluate()["counts"] == {"TP": 1.0, "FP": 3.0, "FN": 2.0, "TN": 94.0}


def test_anchor_counter_counts_rpn_anchors():
    """Faster R-CNN R18-FPN on a 64x64 image: P2-P6 maps 16^2 + 8^2 + 4^2 + 2^2 + 1^2 = 341
    cells with 3 anchors each = 1023 candidate boxes."""
    from detectron2.modeling import build_model

    from tests.test_configs import load_test_config, tiny_batch

    cfg = load_test_config("configs/FasterRCNN/R18-FPN-shapes-cpu-FP.yaml", narrow=True)
    model = build_model(cfg).eval()
    counter = AnchorCounter(model)
    with torch.no_grad():
        model(tiny_batch(1, with_gt=False))
    assert counter.last == 1023
    counter.remove()
    with pytest.raises(ValueError, match="anchor_generator"):
        AnchorCounter(torch.nn.Linear(2, 2))


def test_tool_on_coco_results_json(tmp_path, registered, capsys):
    spec = importlib.util.spec_from_file_location("count_tool", REPO / "tools" / "count_detections.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    res = tmp_path / "results.json"
    res.write_text(json.dumps(_coco_results()))
    out = tmp_path / "counts.json"
    assert tool.main(["--predictions", str(res), "--dataset", registered, "--candidates", "100",
                      "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    assert (counts["TP"], counts["FP"], counts["FN"], counts["TN"]) == (1, 4, 2, 293)
    assert "circle" in capsys.readouterr().out
    # COCOEvaluator's instances_predictions.pth holds the same records
    pth = tmp_path / "instances_predictions.pth"
    torch.save(predictions_from_coco_results(_coco_results()), pth)
    assert tool.main(["--predictions", str(pth), "--dataset", registered, "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    assert (counts["TP"], counts["FP"], counts["FN"], counts["TN"]) == (1, 4, 2, None)


def test_tool_runs_a_config(tmp_path, capsys):
    """Config mode: builds the detector, runs it on the dataset, TN from its RPN anchors."""
    spec = importlib.util.spec_from_file_location("count_tool", REPO / "tools" / "count_detections.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "counts.json"
    torch.manual_seed(0)
    assert tool.main(["--config-file", str(REPO / "configs/FasterRCNN/R18-FPN-shapes-voc-cpu-FP.yaml"),
                      "--dataset", "aqd_shapes_voc_tiny_val", "--json", str(out),
                      "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                      "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]) == 0
    c = json.loads(out.read_text())
    assert c["num_images"] == 8 and c["num_gt"] > 0
    assert c["TP"] + c["FN"] == c["num_gt"]
    # 64x64 inputs: 1023 RPN anchors per image (see test_anchor_counter_counts_rpn_anchors)
    assert c["TN"] == 8 * 1023 - c["TP"] - c["FP"] - c["FN"]
