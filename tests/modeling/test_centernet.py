"""Binary CenterNet (paper 003): decoder, targets, QuickNet structure, conversion, accounting."""
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from aqd_d2.analysis.equivalent_flops import count_macs
from aqd_d2.modeling.meta_arch.centernet import decode_centernet, draw_gaussian
from tests.test_configs import load_test_config, tiny_batch, train_step

BINARY = "configs/CenterNet/q-shapes-cpu-binary.yaml"


def test_decoder_recovers_boxes_from_synthetic_heatmap():
    stride, h, w = 4, 16, 16
    gt = torch.tensor([[8.0, 12.0, 40.0, 30.0], [30.0, 34.0, 58.0, 62.0]])
    classes = [2, 0]
    heat = torch.zeros(1, 3, h, w)
    size = torch.zeros(1, 2, h, w)
    off = torch.zeros(1, 2, h, w)
    for box, c in zip(gt / stride, classes):
        cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        ix, iy = int(cx), int(cy)
        draw_gaussian(heat[0, c], ix, iy, 2)
        size[0, :, iy, ix] = torch.stack([box[2] - box[0], box[3] - box[1]])
        off[0, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
    heat[0, 1, 10, 3] = 0.3  # a lone weaker peak of another class
    (boxes, scores, cls), = decode_centernet(heat, size, off, stride, topk=10, score_thresh=0.5)
    assert cls.tolist() == [2, 0] or cls.tolist() == [0, 2]
    order = [classes.index(c) for c in cls.tolist()]
    assert torch.allclose(boxes, gt[order], atol=1e-5)
    assert torch.allclose(scores, torch.ones(2))
    # with a lower threshold the weaker peak appears, neighbours of peaks never do
    (_, scores, cls), = decode_centernet(heat, size, off, stride, topk=10, score_thresh=0.1)
    assert sorted(cls.tolist()) == [0, 1, 2]


def test_targets_round_trip_through_decoder():
    cfg = load_test_config("configs/CenterNet/q-shapes-cpu-FP.yaml")
    model = build_model(cfg)
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [33.0, 20.0, 61.0, 50.0]]))
    inst.gt_classes = torch.tensor([1, 4])
    shape = (1, 6, 64 // model.stride, 64 // model.stride)
    heat, bidx, cells, sizes, offs = model.build_targets([inst], shape)
    assert heat.max() == 1 and int(heat.eq(1).sum()) == 2
    size = torch.zeros(1, 2, *shape[2:])
    off = torch.zeros(1, 2, *shape[2:])
    size.flatten(2)[bidx, :, cells] = sizes
    off.flatten(2)[bidx, :, cells] = offs
    (boxes, _, cls), = decode_centernet(heat, size, off, model.stride, topk=2)
    order = [0, 1] if cls.tolist() == [1, 4] else [1, 0]
    assert torch.allclose(boxes, inst.gt_boxes.tensor[order], atol=1e-4)


def test_quicknet_structure_and_binary_layers():
    cfg = load_test_config(BINARY)
    model = build_model(cfg)
    assert model.stride == 4 and model.backbone.output_shape()["enc"].stride == 32
    quantized = set(model.quant_report.quantized_names())
    blocks = {f"backbone.scale{i}.block1.conv" for i in range(1, 4)}
    assert quantized == blocks
    assert not model.backbone.scale1.transition.blur.weight.requires_grad
    bn = model.backbone.scale1.block1.norm
    assert bn.momentum == 0.1 and bn.eps == 1e-5
    losses = train_step(cfg, model)
    assert set(losses) == {"loss_heatmap", "loss_size", "loss_offset"}
    r = count_macs(model, tiny_batch(1, with_gt=False))
    assert r.binary_layers == blocks and 0 < r.binarization_ratio < 1
    assert r.equivalent_flops < r.macs


def test_losses_without_objects():
    model = build_model(load_test_config("configs/CenterNet/q-shapes-cpu-FP.yaml"))
    empty = Instances((64, 64))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    preds = {"heatmap": torch.zeros(1, 6, 16, 16), "size": torch.zeros(1, 2, 16, 16),
             "offset": torch.zeros(1, 2, 16, 16)}
    losses = model.losses(preds, [empty])
    assert float(losses["loss_size"]) == 0 and float(losses["loss_heatmap"]) > 0
