"""SSD300 (Liu et al. 2016): default boxes, VGG16 backbone, matching, multibox loss with hard
negative mining (hand-computed), end-to-end train + inference through the registered builder,
binary policy (first / last layers float)."""
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import aqd_d2
from aqd_d2.config import ConfigError
from aqd_d2.layers import QConv2d
from aqd_d2.modeling.backbone.vgg import L2Norm, VGG16SSD
from aqd_d2.modeling.meta_arch.ssd import SSD
from tests.test_configs import load_test_config, tiny_batch, train_step


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def ssd_cfg(*opts):
    """A narrow float SSD300-VGG16 config (width 1/8, BN), plus ``opts``."""
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "QuantizedDetector", "MODEL.QUANT.META_ARCHITECTURE", "SSD",
        "MODEL.BACKBONE.NAME", "build_vgg16_ssd_backbone", "MODEL.DEVICE", "cpu",
        "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
        "MODEL.QUANT.COMPONENT_PREFIXES", "['backbone:backbone.', 'head:head.']",
        "MODEL.QUANT.SCOPE", "['backbone', 'head']",
        "MODEL.VGG.WIDTH_MULT", "0.125", "MODEL.VGG.NORM", "BN", "MODEL.SSD.NUM_CLASSES", "2"])
    cfg.MODEL.QUANT.LAST_LAYERS = [r"head\.(cls_score|bbox_pred)\.\d+"]
    cfg.merge_from_list(list(opts))
    return cfg


# ---- default boxes -----------------------------------------------------------------------
def test_default_boxes_count_and_positions_at_300():
    model = build_model(ssd_cfg())
    gen = model.default_boxes
    assert gen.num_cell_anchors == [4, 6, 6, 6, 4, 4]
    feats = [torch.zeros(1, 1, s, s) for s in (38, 19, 10, 5, 3, 1)]
    boxes = gen(feats)
    assert [len(b) for b in boxes] == [38 * 38 * 4, 19 * 19 * 6, 100 * 6, 25 * 6, 9 * 4, 4]
    assert sum(len(b) for b in boxes) == 8732
    # level 0, cell (0, 0): centre (4, 4); sizes 30, sqrt(30 * 60), 30 sqrt(2) x 30 / sqrt(2)
    r2 = math.sqrt(2)
    s1 = math.sqrt(30 * 60)
    expect = torch.tensor([
        [4 - 15, 4 - 15, 4 + 15, 4 + 15],
        [4 - s1 / 2, 4 - s1 / 2, 4 + s1 / 2, 4 + s1 / 2],
        [4 - 15 * r2, 4 - 15 / r2, 4 + 15 * r2, 4 + 15 / r2],
        [4 - 15 / r2, 4 - 15 * r2, 4 + 15 / r2, 4 + 15 * r2]]).clamp(0, 300)
    assert torch.allclose(boxes[0].tensor[:4], expect, atol=1e-4)
    # level 0, cell (row 0, col 1): centre x = 12 (step 8), box order (H, W, A)
    assert torch.allclose(boxes[0].tensor[4], torch.tensor([0.0, 0.0, 27.0, 19.0]))
    # level 5: one cell centred at 150, sides 264 and sqrt(264 * 315); ratio-2 boxes clipped
    s5 = math.sqrt(264 * 315)
    assert torch.allclose(boxes[5].tensor[0], torch.tensor([18.0, 18.0, 282.0, 282.0]))
    assert torch.allclose(boxes[5].tensor[1], torch.tensor([150 - s5 / 2, 150 - s5 / 2, 150 + s5 / 2, 150 + s5 / 2]))
    assert torch.allclose(boxes[5].tensor[2], torch.tensor([0.0, 150 - 132 / r2, 300.0, 150 + 132 / r2]))


def test_bad_default_box_config_is_rejected():
    with pytest.raises(ConfigError, match="MODEL.SSD.MIN_SIZES"):
        build_model(ssd_cfg("MODEL.SSD.MIN_SIZES", "[30.0, 60.0]"))
    with pytest.raises(ConfigError, match="MODEL.VGG.DOWNSAMPLE"):
        build_model(ssd_cfg("MODEL.VGG.DOWNSAMPLE", "avgpool"))


# ---- backbone ----------------------------------------------------------------------------
@pytest.mark.parametrize("shortcut,downsample", [(False, "maxpool"), (True, "strided_conv")])
def test_vgg_feature_map_sizes(shortcut, downsample):
    net = VGG16SSD(width_mult=0.125, norm="BN", shortcut=shortcut, downsample=downsample).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 300, 300))
    assert list(out) == ["conv4_3", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"]
    assert [o.shape[-1] for o in out.values()] == [38, 19, 10, 5, 3, 1]
    assert [o.shape[1] for o in out.values()] == [64, 128, 64, 32, 32, 32]
    names = [n for n, _ in net.named_children()]
    assert names[0] == "conv1_1"
    if downsample == "strided_conv":
        assert net.conv2_1.stride == (2, 2) and hasattr(net, "conv2_1_shortcut")
        assert net.conv4_1.stride == (2, 2) and net.conv5_1.stride == (2, 2)
    else:
        assert net.conv2_1.stride == (1, 1)


def test_vgg_full_width_channels_and_parameters():
    net = VGG16SSD()
    spec = net.output_shape()
    assert [spec[f].channels for f in net._out_features] == [512, 1024, 512, 256, 256, 256]
    assert net.fc6.dilation == (6, 6) and net.fc6.padding == (6, 6)
    # by hand: VGG16 conv1_1..conv5_3 14,714,688 + fc6 4,719,616 + fc7 1,049,600 + extras
    # conv8_1..conv11_2 2,459,520 + L2Norm 512
    assert sum(p.numel() for p in net.parameters()) == 22_943_936


def test_vgg_identity_shortcut_is_added():
    net = VGG16SSD(width_mult=0.125, norm="BN", shortcut=True).eval()
    plan = {name: sc for kind, name, sc in net._plan if kind == "conv"}
    assert plan["conv1_2"] == "identity" and plan["conv1_1"] is None
    assert plan["fc7"] == "identity" and plan["fc6"] is None  # 1x1, 1024 -> 1024
    assert plan["conv2_1"] is None  # 64 -> 128 channels
    assert plan["conv10_2"] is None  # valid conv changes the size


def test_l2norm_value():
    m = L2Norm(2, init_scale=20.0)
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    assert torch.allclose(m(x).flatten(), torch.tensor([12.0, 16.0]))
    assert m.weight.requires_grad and m.weight.tolist() == [20.0, 20.0]


# ---- matching and loss -------------------------------------------------------------------
def _four_anchors():
    return [Boxes(torch.tensor([[0.0, 0, 10, 10], [10, 10, 20, 20], [0, 10, 10, 20],
                                [10, 0, 20, 10], [20, 20, 30, 30]]))]


def test_matching_threshold_and_forced_best_box():
    model = build_model(ssd_cfg())
    inst = Instances((300, 300))
    # gt 0 = anchor 0 shifted by 1 (IoU 81/119 = 0.68); gt 1 overlaps anchor 4 with IoU 0.25
    inst.gt_boxes = Boxes(torch.tensor([[1.0, 1, 11, 11], [25.0, 25, 35, 35]]))
    inst.gt_classes = torch.tensor([1, 0])
    labels, boxes = model.label_default_boxes(_four_anchors(), [inst])
    assert labels[0].tolist() == [1, 2, 2, 2, 0]  # background = NUM_CLASSES = 2
    assert boxes[0][4].tolist() == [25.0, 25, 35, 35]


def test_multibox_loss_hand_computed_with_hard_negative_mining():
    model = build_model(ssd_cfg("MODEL.SSD.NEG_POS_RATIO", "2.0"))
    anchors = _four_anchors()
    labels = [torch.tensor([0, 2, 2, 2, 2])]
    # anchor 0: positive (class 0). Negatives' background CE: a1 log(1+2e^2) ... chosen so that
    # the two hardest negatives are anchors 3 and 1.
    logits = torch.tensor([[[1.0, 0, 0], [2, 0, 0], [0, 0, 3], [0, 3, 0], [0, 0, 0]]])
    ce = [math.log(math.e + 2) - 1, math.log(math.exp(2) + 2), math.log(2 + math.exp(3)) - 3,
          math.log(math.exp(3) + 2), math.log(3)]
    neg = model.hard_negative_mining(torch.tensor([ce]), torch.tensor([[True, False, False, False, False]]))
    assert neg.tolist() == [[False, True, False, True, False]]
    gt_boxes = [torch.tensor([[1.0, 1, 11, 11]] + [[0.0, 0, 0, 0]] * 4)]
    deltas = torch.zeros(1, 5, 4)
    losses = model.losses(anchors, [logits], labels, [deltas], gt_boxes)
    assert math.isclose(float(losses["loss_cls"]), ce[0] + ce[3] + ce[1], rel_tol=1e-5)
    # target deltas of anchor 0: (10 * 1/10, 10 * 1/10, 0, 0); smooth L1 (beta 1): 0.5 + 0.5
    assert math.isclose(float(losses["loss_box_reg"]), 1.0, rel_tol=1e-5)


def test_hard_negative_mining_caps_at_available_negatives_and_is_per_image():
    model = build_model(ssd_cfg())
    loss = torch.tensor([[5.0, 1, 2, 3], [1.0, 2, 3, 4]])
    pos = torch.tensor([[True, True, False, False], [False, False, False, False]])
    neg = model.hard_negative_mining(loss, pos)
    assert neg.tolist() == [[False, False, True, True], [False] * 4]


# ---- end to end --------------------------------------------------------------------------
def test_registered_builder_trains_and_infers_at_input_size():
    torch.manual_seed(0)
    cfg = ssd_cfg()
    model = build_model(cfg)
    assert isinstance(model, SSD)
    losses = train_step(cfg, model)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch(1, size=64, with_gt=False))
    inst = out[0]["instances"]
    assert inst.image_size == (64, 64) and len(inst) <= 200
    assert float(inst.pred_boxes.tensor.max()) <= 64.0


def test_resize_gt_scales_boxes_to_the_input_square():
    model = build_model(ssd_cfg())
    inst = Instances((100, 200))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 100.0, 50.0]]))
    inst.gt_classes = torch.tensor([1])
    out = model.resize_gt([inst])[0]
    assert out.image_size == (300, 300)
    assert out.gt_boxes.tensor.tolist() == [[30.0, 30.0, 150.0, 150.0]]
    assert out.gt_classes.tolist() == [1]


def test_binary_policy_keeps_first_and_last_layers_float():
    cfg = ssd_cfg("MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.W_METHOD", "xnor",
                  "MODEL.QUANT.A_METHOD", "xnor", "MODEL.QUANT.W_BITS", "1",
                  "MODEL.QUANT.A_BITS", "1", "MODEL.VGG.ACTIVATION", "none")
    model = build_model(cfg)
    assert not isinstance(model.backbone.conv1_1, QConv2d)
    for name in ("conv1_2", "conv4_3", "fc6", "fc7", "conv8_2", "conv11_2"):
        assert isinstance(getattr(model.backbone, name), QConv2d), name
    for convs in (model.head.cls_score, model.head.bbox_pred):
        assert not any(isinstance(c, QConv2d) for c in convs)
    report = model.quant_report
    assert report["head.cls_score.0"].reason.startswith("last layer")
    losses = train_step(cfg, model)
    assert all(math.isfinite(v) for v in losses.values())


# ---- backbones and configs ---------------------------------------------------------------
def test_mobilenet_ssd_feature_map_sizes():
    from aqd_d2.modeling.backbone.mobilenet_ssd import MOBILENET_SSD_FEATURES, MobileNetV1SSD

    net = MobileNetV1SSD(width_mult=0.25).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 300, 300))
    assert list(out) == MOBILENET_SSD_FEATURES
    assert [o.shape[-1] for o in out.values()] == [19, 10, 5, 3, 2, 1]
    assert [o.shape[1] for o in out.values()] == [net.output_shape()[f].channels for f in out]
    assert next(iter(net.named_children()))[0] == "conv1"


def test_xnor_config_binarizes_backbone_with_first_and_last_float():
    cfg = load_test_config("configs/SSD/VGG16-VOC-XNOR.yaml", narrow=True)
    model = build_model(cfg)
    bb = model.backbone
    assert not isinstance(bb.conv1_1, QConv2d)
    convs = [m for n, m in bb.named_children() if n.startswith(("conv", "fc")) and n != "conv1_1"
             and n != "conv4_3_norm"]
    assert len(convs) == 22 and all(isinstance(c, QConv2d) for c in convs)
    assert all(c.weight_quantizer.bits == 1 and c.input_quantizer.bits == 1 for c in convs)
    assert isinstance(bb.conv1_2.norm, torch.nn.modules.batchnorm._BatchNorm)  # BN after each conv
    head = list(model.head.cls_score) + list(model.head.bbox_pred)
    assert len(head) == 12 and not any(isinstance(c, QConv2d) for c in head)


def test_bireal_sc_config_strided_binary_convs_with_float_shortcuts():
    cfg = load_test_config("configs/SSD/VGG16-VOC-BiReal.yaml", narrow=True)
    model = build_model(cfg)
    bb = model.backbone
    for stage in (2, 3, 4, 5):
        conv = getattr(bb, f"conv{stage}_1")
        assert isinstance(conv, QConv2d) and conv.stride == (2, 2)
        assert not isinstance(getattr(bb, f"conv{stage}_1_shortcut")[1], QConv2d)
    kinds = {name: sc for kind, name, sc in bb._plan if kind == "conv"}
    assert kinds["conv3_2"] == "identity" and kinds["fc7"] == "identity"
    assert [k for k, _, _ in bb._plan].count("pool") == 1  # only pool5 (stride 1) is left


# ---- training on the embedded VOC dataset ------------------------------------------------
def test_short_cpu_run_on_tiny_voc_lowers_the_loss():
    """SSDMapper batches of the embedded VOC data; a few SGD steps on a fixed batch."""
    from detectron2.data import DatasetCatalog
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from aqd_d2.data.mappers import build_train_mapper

    torch.manual_seed(0)
    cfg = load_test_config("configs/SSD/VGG16-shapes-voc-cpu-FP.yaml", narrow=True,
                           extra=["SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0"])
    mapper = build_train_mapper(cfg)
    dicts = DatasetCatalog.get("aqd_shapes_voc_tiny_train")
    np.random.seed(0)
    batch = [mapper(d) for d in dicts[:4]]
    assert all(b["image"].shape == (3, 128, 128) for b in batch)
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    totals = []
    with EventStorage(0):
        for _ in range(8):
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(float(total))
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0], totals


def test_aqd_trainer_runs_the_ssd_mapper_and_evaluates(tmp_path):
    """aqd_d2's Trainer (DefaultTrainer) with INPUT.TRAIN_MAPPER SSDMapper, then VOC eval."""
    from aqd_d2.engine import Trainer
    from tests.conftest import tiny_train_opts

    cfg = load_test_config("configs/SSD/VGG16-shapes-voc-cpu-FP.yaml", narrow=True)
    opts = tiny_train_opts(tmp_path, max_iter=2)
    opts[1], opts[3] = "('aqd_shapes_voc_tiny_train',)", "('aqd_shapes_voc_tiny_val',)"
    cfg.merge_from_list(opts)
    trainer = Trainer(cfg)
    assert trainer.data_loader.dataset is not None
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "model_final.pth").exists()
    results = Trainer.test(cfg, trainer.model)
    assert "bbox" in results and "AP50" in results["bbox"]


def test_full_ssd300_vgg16_size_and_binary_packed_ratio():
    """SSD300-VGG16 for VOC: 26.29 M parameters (paper 000 Table 2: 100.28 MB at 32 bits);
    the Xnor-Net model packs to >= 6x smaller than its float state (issue 7)."""
    from aqd_d2.export import packed_size_report

    model = build_model(load_test_config("configs/SSD/VGG16-VOC-FP.yaml"))
    # backbone 22,943,936 (test above) + head: sum_k 3 * 3 * C_k * A_k * (21 + 4) + A_k * 25
    head = sum(9 * c * a * 25 + a * 25 for c, a in
               zip((512, 1024, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4)))
    assert head == 3_341_550
    assert sum(p.numel() for p in model.parameters()) == 22_943_936 + head == 26_285_486
    binary = build_model(load_test_config("configs/SSD/VGG16-VOC-XNOR.yaml"))
    assert packed_size_report(binary).ratio >= 6.0


def test_backbones_stop_after_the_last_used_feature_for_small_inputs():
    from aqd_d2.modeling.backbone.mobilenet_ssd import MobileNetV1SSD

    vgg = VGG16SSD(width_mult=0.125, norm="BN", out_features=["conv4_3", "fc7", "conv8_2", "conv9_2"])
    assert not hasattr(vgg, "conv10_1") and hasattr(vgg, "conv9_2")
    mob = MobileNetV1SSD(width_mult=0.125, out_features=["conv5", "conv6", "conv7_2", "conv8_2"])
    assert not hasattr(mob, "conv9_1") and hasattr(mob, "conv8_2")
    with torch.no_grad():
        v = vgg.eval()(torch.randn(1, 3, 128, 128))
        m = mob.eval()(torch.randn(1, 3, 128, 128))
    assert [o.shape[-1] for o in v.values()] == [16, 8, 4, 2]
    assert [o.shape[-1] for o in m.values()] == [8, 4, 2, 1]
    assert set(vgg.output_shape()) == set(v) and set(mob.output_shape()) == set(m)
    with pytest.raises(ValueError, match="conv12_2"):
        VGG16SSD(out_features=["conv12_2"])


def test_mobilenet_ssd_config_has_2268_default_boxes():
    model = build_model(load_test_config("configs/SSD/MobileNetV1-VOC-FP.yaml", narrow=True)).eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 300, 300))
    boxes = model.default_boxes([feats[f] for f in model.head_in_features])
    assert [b.tensor.shape[0] for b in boxes] == [19 * 19 * 4, 100 * 6, 25 * 6, 9 * 6, 4 * 4, 4]
    assert sum(len(b) for b in boxes) == 2268


@pytest.mark.parametrize("key,value", [("MODEL.SSD.STEPS", "[8.0]"),
                                       ("MODEL.SSD.ASPECT_RATIOS", "[[0.5], [2.0], [2.0], [2.0], [2.0], [2.0]]"),
                                       ("MODEL.SSD.NEG_POS_RATIO", "-1.0"),
                                       ("MODEL.VGG.ACTIVATION", "'tanh'"),
                                       ("MODEL.SSD.IN_FEATURES", "['conv4_3', 'res5', 'conv8_2', 'conv9_2', 'conv10_2', 'conv11_2']")])
def test_bad_ssd_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        build_model(ssd_cfg(key, value))
