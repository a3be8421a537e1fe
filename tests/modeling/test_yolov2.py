"""Binary-weight YOLOv2 (paper 004): reorg, region loss targets, decoding, Tables I-II."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from aqd_d2.analysis.equivalent_flops import model_size_mb
from aqd_d2.modeling.meta_arch.yolov2 import reorg
from tests.test_configs import load_test_config

CPU = "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml"


def test_reorg_stacks_neighbourhoods():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = reorg(x)
    assert y.shape == (1, 4, 2, 2)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def _perfect_output(model, inst, h, w):
    """Raw outputs whose decoded boxes, objectness and classes match ``inst`` exactly."""
    a, c = len(model.anchors), model.num_classes
    out = torch.zeros(1, a, 5 + c, h, w)
    out[:, :, 4] = -30.0  # no object anywhere ...
    for box, cls in zip(inst.gt_boxes.tensor / model.stride, inst.gt_classes.tolist()):
        gw, gh = float(box[2] - box[0]), float(box[3] - box[1])
        gx, gy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        inter = torch.minimum(torch.tensor([gw, gh]), model.anchors).prod(1)
        k = int((inter / (gw * gh + model.anchors.prod(1) - inter)).argmax())
        cx, cy = int(gx), int(gy)
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        out[0, k, :4, cy, cx] = torch.tensor([logit(gx - cx), logit(gy - cy),
                                              math.log(gw / model.anchors[k, 0]),
                                              math.log(gh / model.anchors[k, 1])])
        out[0, k, 4, cy, cx] = 30.0  # ... but at the assigned prediction
        out[0, k, 5 + cls, cy, cx] = 30.0
    return out


def test_region_loss_zero_for_perfect_prediction_and_decoding():
    cfg = load_test_config(CPU)
    model = build_model(cfg)
    inst = Instances((128, 384))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 50.0, 60.0], [200.0, 40.0, 290.0, 100.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    out = _perfect_output(model, inst, 4, 12)
    losses = model.losses(out, [inst])
    assert set(losses) == {"loss_coord", "loss_obj", "loss_noobj", "loss_class"}
    for v in losses.values():
        assert float(v) < 1e-6
    # a wrong class and a shifted box are penalized
    bad = out.clone()
    bad[0, :, 5:] = 0.0
    bad[0, :, 0] += 1.0
    worse = model.losses(bad, [inst])
    assert worse["loss_class"] > 0.1 and worse["loss_coord"] > 0.01
    # decoding: the two boxes come back with their classes
    model.eval()
    images = type("I", (), {"image_sizes": [(128, 384)]})()
    res = model.inference(out, images, [{"height": 128, "width": 384}])[0]["instances"]
    assert sorted(res.pred_classes.tolist()) == [0, 2]
    order = res.pred_classes.argsort()
    assert torch.allclose(res.pred_boxes.tensor[order], inst.gt_boxes.tensor, atol=1e-3)


@pytest.mark.parametrize("config,quantized,size_mb", [
    ("DarkNet19-kitti-FP", 0, 257), ("DarkNet19-kitti-M1", 13, 12),
    ("MobileNet-kitti-FP", 0, 193), ("MobileNet-kitti-M2", 10, 7.9),
])
def test_table_layers_and_model_sizes(config, quantized, size_mb):
    """Tables I-II: binary-weight layer sets and sizes (20 classes = the paper's 125 outputs)."""
    cfg = load_test_config(f"configs/YOLOv2/{config}.yaml", ["MODEL.YOLO.NUM_CLASSES", "20"])
    model = build_model(cfg)
    assert model.head.pred.out_channels == 125
    names = model.quant_report.quantized_names() if model.quant_report else []
    assert len(names) == quantized
    assert model_size_mb(model) == pytest.approx(size_mb, rel=0.05)
    if config == "DarkNet19-kitti-M1":
        assert "backbone.conv5_1" in names and "head.conv8_1" in names
        assert not any(n.startswith(("backbone.conv4", "backbone.conv1", "head.pred")) for n in names)


def test_losses_without_objects():
    model = build_model(load_test_config(CPU))
    empty = Instances((64, 64))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    losses = model.losses(torch.zeros(1, 5, 8, 2, 2), [empty])
    assert float(losses["loss_coord"]) == 0 and float(losses["loss_noobj"]) > 0
