"""detectron2's own build_model builds quantized detectors through "QuantizedDetector"."""
import pytest
import torch

import aqd_d2  # noqa: F401  (registers QuantizedDetector)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from aqd_d2.config import ConfigError, add_aqd_config
from aqd_d2.convert import ConversionReport
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import available_quantizers

pytestmark = pytest.mark.skipif(
    not {"liq", "dorefa"} <= set(available_quantizers()), reason="quantization methods not registered"
)


def r18_cfg(meta_arch="RetinaNet", **quant):
    cfg = add_aqd_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "QuantizedDetector"
    cfg.MODEL.QUANT.META_ARCHITECTURE = meta_arch
    cfg.MODEL.QUANT.ENABLED = True
    for k, v in quant.items():
        cfg.MODEL.QUANT[k] = v
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    if meta_arch == "RetinaNet":
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = 3
        cfg.MODEL.RETINANET.NUM_CONVS = 1
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    return cfg


def batch():
    torch.manual_seed(0)
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    return [{"image": torch.rand(3, 64, 64) * 255, "instances": inst, "height": 64, "width": 64}]


def train_and_infer(model):
    model.train()
    with EventStorage():
        losses = model(batch())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.bottom_up.res2[0].conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    assert len(out) == 1 and "instances" in out[0]


def test_retinanet_r18_quantized_end_to_end():
    cfg = r18_cfg()
    model = build_model(cfg)
    assert type(model) is RetinaNet  # the float detector itself, converted in place
    report = model.quant_report
    assert isinstance(report, ConversionReport)
    # R18: stem + 8 blocks x 2 convs + 3 shortcuts = 20 convs; stem stays float (KEEP_FIRST_FP)
    # FPN: 3 lateral + 3 output + p6/p7; head: 1+1 subnet convs + cls_score/bbox_pred (float)
    assert report.counts() == {
        "fpn": {"quantized": 8, "float": 0},
        "backbone": {"quantized": 19, "float": 1},
        "head": {"quantized": 2, "float": 2},
    }
    stem = model.backbone.bottom_up.stem.conv1
    assert not isinstance(stem, QConv2d)
    assert isinstance(model.backbone.bottom_up.res3[0].conv1, QConv2d)
    assert model.backbone.bottom_up.res3[0].conv1.weight_quantizer.method == "liq"
    assert isinstance(model.head.cls_subnet[0], QConv2d) and not isinstance(model.head.cls_score, QConv2d)
    assert all(isinstance(c, QConv2d) for c in model.backbone.lateral_convs + model.backbone.output_convs)
    train_and_infer(model)

    # a float RetinaNet checkpoint loads; only quantizer entries are missing
    float_cfg = r18_cfg()
    float_cfg.MODEL.QUANT.ENABLED = False
    float_model = build_model(float_cfg)
    assert float_model.quant_report is None
    assert not any(isinstance(m, QConv2d) for m in float_model.modules())
    fresh = build_model(cfg)
    res = fresh.load_state_dict(float_model.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all("_quantizer." in k for k in res.missing_keys)
    assert set(float_model.state_dict()) <= set(fresh.state_dict())


def test_scope_backbone_only_and_overrides():
    cfg = r18_cfg(SCOPE=["backbone"], OVERRIDES=[r"head\.cls_subnet\.0:dorefa:2:dorefa:2"],
                  FIRST_LAST_BITS=8)
    model = build_model(cfg)
    c = model.quant_report.counts()
    assert c["backbone"] == {"quantized": 20, "float": 0}  # stem at 8 bits
    assert c["fpn"] == {"quantized": 0, "float": 8}
    assert c["head"] == {"quantized": 1, "float": 3}
    assert model.backbone.bottom_up.stem.conv1.weight_quantizer.bits == 8
    assert model.head.cls_subnet[0].weight_quantizer.method == "dorefa"


def test_generalized_rcnn_r18_converts_and_trains():
    # DoReFa: no data initialisation on the first batch, which keeps this test fast
    model = build_model(r18_cfg("GeneralizedRCNN", W_METHOD="dorefa", A_METHOD="dorefa"))
    assert type(model) is GeneralizedRCNN
    report = model.quant_report
    last = {d.name for d in report.layers if d.reason.startswith("last layer")}
    assert last == {
        "proposal_generator.rpn_head.objectness_logits", "proposal_generator.rpn_head.anchor_deltas",
        "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
    }
    assert isinstance(model.roi_heads.box_head.fc1, QLinear)
    assert isinstance(model.proposal_generator.rpn_head.conv, QConv2d)
    assert report.counts()["head"] == {"quantized": 3, "float": 4}
    train_and_infer(model)


def test_builder_errors():
    with pytest.raises(ConfigError, match="MODEL.QUANT.META_ARCHITECTURE"):
        build_model(r18_cfg("NoSuchArch"))
    with pytest.raises(ConfigError, match="MODEL.QUANT.W_BITS"):
        build_model(r18_cfg(W_BITS=9))
    # SCOPE names a component this model does not have
    cfg = r18_cfg(SCOPE=["backbone", "fpn"], COMPONENT_PREFIXES=["backbone:backbone.", "fpn:neck."])
    with pytest.raises(ConfigError, match="MODEL.QUANT.SCOPE"):
        build_model(cfg)
