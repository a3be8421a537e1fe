"""AQD RetinaNet / FCOS: conversion counts per component, the per-level BN invariant, FCOS
options (size ranges, center sampling, box losses, per-level scale), head norms, FPN with BN +
ReLU, checkpoint compatibility between multi-level and shared BN, config validation."""
import math

import pytest
import torch

import aqd_d2  # noqa: I100  (compat shims before detectron2 is imported)
from aqd_d2.config import ConfigError
from aqd_d2.layers.multilevel_bn import MultiLevelBatchNorm
from aqd_d2.modeling.meta_arch.fcos import FCOS, aligned_iou
from aqd_d2.modeling.meta_arch.head_norm import HEAD_NORMS
from aqd_d2.modeling.meta_arch.retinanet import AQDRetinaNet
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from tests.test_configs import load_test_config, tiny_batch, train_step

FCOS_CPU = "configs/FCOS/R18-FPN-shapes-cpu-FP.yaml"
RETINA_CPU = "configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml"


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _build(rel_path, extra=(), narrow=True):
    torch.manual_seed(0)
    cfg = load_test_config(rel_path, extra, narrow=narrow)
    return cfg, build_model(cfg)


# ---- conversion ------------------------------------------------------------------------------
# ResNet-18: stem conv + 8 BasicBlocks x 2 convs + 3 projection shortcuts (res3, res4, res5).
R18_CONVS = 1 + 16 + 3
FPN_CONVS = 3 + 3 + 2  # lateral + output for res3..res5, P6, P7
TOWER_CONVS = 2 * 4  # cls + bbox towers of 4 convs


@pytest.mark.parametrize("arch,last,suffix,scope", [
    ("FCOS", 3, "2bit", ("backbone", "fpn", "head")),
    ("RetinaNet", 2, "2bit", ("backbone", "fpn", "head")),
    ("FCOS", 3, "2bit-backbone", ("backbone",)),  # AQD Table 4 rows
    ("FCOS", 3, "2bit-backbone_fpn", ("backbone", "fpn")),
])
def test_quantized_layer_count_per_component_matches_policy(arch, last, suffix, scope):
    path = f"configs/{arch}/R18-FPN-shapes-cpu-{suffix}.yaml"
    cfg, model = _build(path, narrow=False)
    assert tuple(cfg.MODEL.QUANT.SCOPE) == scope
    counts = model.quant_report.counts()
    # first backbone conv and the last head layers (cls_score, bbox_pred[, ctrness]) stay float
    expected = {
        "backbone": {"quantized": R18_CONVS - 1, "float": 1} if "backbone" in scope
        else {"quantized": 0, "float": R18_CONVS},
        "fpn": {"quantized": FPN_CONVS, "float": 0} if "fpn" in scope
        else {"quantized": 0, "float": FPN_CONVS},
        "head": {"quantized": TOWER_CONVS, "float": last} if "head" in scope
        else {"quantized": 0, "float": TOWER_CONVS + last},
    }
    assert counts == expected
    report = model.quant_report
    assert not report["backbone.bottom_up.stem.conv1"].quantized
    assert not report["head.cls_score"].quantized
    if "head" in scope:
        assert report["head.cls_subnet.0"].precision.w_bits == 2


# ---- the per-level BN invariant --------------------------------------------------------------
@pytest.mark.parametrize("rel_path", [FCOS_CPU, RETINA_CPU])
def test_each_level_bn_sees_only_its_level_and_statistics_differ(rel_path):
    cfg, model = _build(rel_path, ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.W_BITS", "2",
                                   "MODEL.QUANT.A_BITS", "2"])
    norms = {n: m for n, m in model.head.named_modules() if isinstance(m, MultiLevelBatchNorm)}
    assert len(norms) == TOWER_CONVS and all(m.num_levels == 5 for m in norms.values())
    seen = {}
    hooks = [
        m[lv].register_forward_hook(lambda mod, inp, out, key=(n, lv): seen.setdefault(key, []).append(inp[0].shape[-2:]))
        for n, m in norms.items() for lv in range(m.num_levels)
    ]
    train_step(cfg, model)  # 64x64 images: levels P3..P7 are 8x8, 4x4, 2x2, 1x1, 1x1
    for h in hooks:
        h.remove()
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    for (name, lv), shapes in seen.items():
        assert shapes == [torch.Size(sizes[lv])], (name, lv, shapes)
    assert len(seen) == TOWER_CONVS * 5
    # after one step on inputs whose levels differ, each level has its own statistics
    for m in norms.values():
        means = torch.stack([m[lv].running_mean for lv in range(3)])
        assert (means[0] - means[1]).abs().max() > 1e-4 and (means[1] - means[2]).abs().max() > 1e-4


def test_head_rejects_a_wrong_number_of_levels():
    _, model = _build(FCOS_CPU)
    feats = [torch.zeros(1, 64, 4, 4)] * 4
    with pytest.raises(ValueError, match="5 levels"):
        model.head(feats)


# ---- head norms --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", HEAD_NORMS)
def test_every_head_norm_trains_and_infers(norm):
    cfg, model = _build(RETINA_CPU, ["MODEL.RETINANET.HEAD_NORM", norm])
    assert isinstance(model, AQDRetinaNet)
    kinds = {type(m).__name__ for m in model.head.cls_subnet}
    expected = {"": set(), "GN": {"GroupNorm"}, "BN": {"BatchNorm2d"}, "SyncBN": {"NaiveSyncBatchNorm"}}
    assert kinds - {"Conv2d", "ReLU"} == expected.get(norm, {"MultiLevelBatchNorm"})
    losses = train_step(cfg, model)
    assert all(math.isfinite(v) for v in losses.values())


def test_multilevel_checkpoint_loads_into_shared_bn_head():
    _, fp = _build(FCOS_CPU)
    train_step(load_test_config(FCOS_CPU, narrow=True), fp)
    _, shared = _build(FCOS_CPU, ["MODEL.FCOS.HEAD_NORM", "BN"])
    result = shared.load_state_dict(fp.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    ml = fp.head.cls_subnet[1]
    bn = shared.head.cls_subnet[1]
    assert isinstance(bn, nn.BatchNorm2d)
    expected = torch.stack([ml[lv].running_mean for lv in range(5)]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)


def test_retinanet_norm_key_of_detectron2_is_rejected():
    with pytest.raises(ConfigError, match="HEAD_NORM"):
        _build(RETINA_CPU, ["MODEL.RETINANET.NORM", "BN"])


# ---- FCOS options ------------------------------------------------------------------------------
def test_plain_detectron2_config_builds_registered_fcos():
    cfg = load_test_config(FCOS_CPU, ["MODEL.META_ARCHITECTURE", "FCOS"], narrow=True)
    model = build_model(cfg)
    assert type(model) is FCOS and model.sizes_of_interest == (16.0, 32.0, 64.0, 128.0)
    assert [s.scale.item() for s in model.head.scales] == [1.0] * 5


def _anchors_and_gt(model, box):
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 128, 128))
    anchors = model.anchor_generator([feats[f] for f in model.head_in_features])
    gt = Instances((128, 128))
    gt.gt_boxes = Boxes(torch.tensor([box]))
    gt.gt_classes = torch.tensor([1])
    return anchors, gt


@pytest.mark.parametrize("radius", [0.0, 1.5])
def test_fcos_size_ranges_and_center_sampling(radius):
    # COCO's ranges (8x the stride) on a 128-pixel image, so that center sampling matters
    _, model = _build(FCOS_CPU, ["MODEL.FCOS.CENTER_SAMPLING_RADIUS", str(radius),
                                 "MODEL.FCOS.SIZES_OF_INTEREST", "[64, 128, 256, 512]"])
    x0, y0, x1, y1 = 10.0, 10.0, 110.0, 100.0
    anchors, gt = _anchors_and_gt(model, [x0, y0, x1, y1])
    idx = model.match_anchors(anchors, [gt])[0]
    counts = [len(a) for a in anchors]
    level = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    stride = torch.cat([a.tensor[:, 2] - a.tensor[:, 0] for a in anchors])
    points = torch.cat([a.get_centers() for a in anchors])
    ltrb = torch.cat([points - torch.tensor([x0, y0]), torch.tensor([x1, y1]) - points], dim=1)
    extent = ltrb.max(dim=1).values
    bounds = torch.tensor([0.0, 64.0, 128.0, 256.0, 512.0, math.inf])
    expected = (ltrb.min(dim=1).values > 0) & (extent >= bounds[level]) & (extent <= bounds[level + 1])
    assert expected.sum() > 4 and set(level[expected].tolist()) == {0, 1}
    if radius > 0:
        offset = (points - torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2])).abs().max(dim=1).values
        near = offset < radius * stride
        assert (expected & ~near).any()  # center sampling removes some candidates here
        expected &= near
    assert torch.equal(idx >= 0, expected)
    labels, _ = model.label_anchors(anchors, [gt])
    assert torch.equal(labels[0] == 1, expected) and (labels[0][~expected] == model.num_classes).all()


def test_fcos_image_without_boxes_is_all_background():
    _, model = _build(FCOS_CPU)
    anchors, _ = _anchors_and_gt(model, [0.0, 0.0, 1.0, 1.0])
    empty = Instances((128, 128), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    labels, boxes = model.label_anchors(anchors, [empty])
    assert (labels[0] == model.num_classes).all() and len(boxes[0]) == len(labels[0])


@pytest.mark.parametrize("loss", ["iou", "giou", "smooth_l1"])
def test_fcos_box_losses_and_options_train(loss):
    cfg, model = _build(FCOS_CPU, ["MODEL.FCOS.BOX_LOSS_TYPE", loss, "MODEL.FCOS.PER_LEVEL_SCALE",
                                   str(loss != "iou"), "MODEL.FCOS.CENTERNESS_ON_REG", str(loss != "giou")])
    assert (model.head.scales is None) == (loss == "iou")
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch())
        sum(losses.values()).backward()
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    if model.head.scales is not None:
        assert all(s.scale.grad is not None for s in model.head.scales)


def test_aligned_iou_and_iou_loss_value():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([50.0 / 150.0, 1.0]))


# ---- FPN --------------------------------------------------------------------------------------
def test_fpn_relu_norm_and_top_block_input():
    cfg = load_test_config(FCOS_CPU, narrow=True)
    backbone = build_backbone(cfg)
    assert backbone.top_block.in_feature == "p5"
    out = backbone(torch.randn(2, 3, 64, 64))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert all((v >= 0).all() for v in out.values())  # ReLU after every FPN conv
    names = dict(backbone.named_modules())
    for n in ("fpn_lateral3", "fpn_output5", "top_block.p6", "top_block.p7"):
        assert isinstance(names[n + ".norm"], nn.BatchNorm2d) and names[n].bias is None


def test_fpn_without_aqd_options_matches_detectron2_retinanet_backbone():
    cfg = load_test_config("configs/RetinaNet/R18-FPN-shapes-cpu.yaml", narrow=True)
    torch.manual_seed(0)
    d2 = build_backbone(cfg)
    cfg.defrost()
    cfg.MODEL.BACKBONE.NAME = "build_aqd_resnet_fpn_backbone"
    ours = build_backbone(cfg)
    assert {k: v.shape for k, v in d2.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(d2.state_dict())
    d2.eval(), ours.eval()
    x = torch.randn(1, 3, 64, 64)
    expected, got = d2(x), ours(x)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,match", [
    (["MODEL.FCOS.HEAD_NORM", "LN"], "HEAD_NORM"),
    (["MODEL.RETINANET.HEAD_NORM", "bn"], "HEAD_NORM"),
    (["MODEL.FCOS.SIZES_OF_INTEREST", "[64, 128]"], "SIZES_OF_INTEREST"),
    (["MODEL.FCOS.SIZES_OF_INTEREST", "[64, 32, 256, 512]"], "increasing"),
    (["MODEL.FCOS.BOX_LOSS_TYPE", "l1"], "BOX_LOSS_TYPE"),
    (["MODEL.FCOS.CENTER_SAMPLING_RADIUS", "-1.0"], "CENTER_SAMPLING_RADIUS"),
])
def test_bad_detector_keys_raise_config_error(opts, match):
    cfg = load_test_config(FCOS_CPU, opts)
    with pytest.raises(ConfigError, match=match):
        aqd_d2.validate_aqd_config(cfg)


def test_fcos_centerness_targets_hand_values():
    """FCOS eq. 3: centerness = sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)); matched boxes are
    plain (R, 4) tensors (detectron2 main's FCOS convention; v0.6 passed Boxes)."""
    _, model = _build(FCOS_CPU)
    # two locations: centers (10, 20) and (20, 15) (anchor boxes of side 8 around them)
    anchors = [Boxes(torch.tensor([[6.0, 16.0, 14.0, 24.0]])), Boxes(torch.tensor([[16.0, 11.0, 24.0, 19.0]]))]
    box = torch.tensor([0.0, 0.0, 40.0, 30.0])
    gt = [torch.stack([box, box])]  # one image, both locations matched to the same box
    ctr = model.compute_ctrness_targets(anchors, gt)
    # (10, 20): l 10, r 30, t 20, b 10 -> sqrt(1/3 * 1/2); (20, 15): l = r = 20, t = b = 15 -> 1
    assert ctr.shape == (1, 2)
    assert torch.allclose(ctr, torch.tensor([[math.sqrt(1 / 6), 1.0]]), atol=1e-7)
    labels, boxes = model.label_anchors(anchors, [Instances(
        (64, 64), gt_boxes=Boxes(box[None]), gt_classes=torch.tensor([2]))])
    assert isinstance(boxes[0], torch.Tensor) and boxes[0].shape == (2, 4)
