"""Knowledge transfer wrapper (paper 004 eq. 3): zero for identical nets, student-only gradient,
lambdas, generic over meta-architectures."""
import pytest
import torch
from detectron2.modeling import build_model

from aqd_d2.config import ConfigError
from aqd_d2.convert import set_quantization_enabled
from tests.test_configs import load_test_config, tiny_batch, train_step

YOLO_KT = "configs/YOLOv2/DarkNet19-kitti-cpu-stagewise-KT.yaml"


def build(extra=()):
    torch.manual_seed(0)
    cfg = load_test_config(YOLO_KT, ["MODEL.KT.TEACHER_BN_MODE", "batch", *extra])
    model = build_model(cfg)
    kt = model.knowledge_transfer
    # the student starts as a copy of the teacher (the paper's initialization)
    missing = model.load_state_dict(kt.teacher.state_dict(), strict=False)
    assert not missing.unexpected_keys
    return cfg, model, kt


def test_teacher_outside_student_state_and_parameters():
    _, model, kt = build()
    assert not any(k.startswith("teacher") for k in model.state_dict())
    teacher_params = {id(p) for p in kt.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not kt.teacher.training and not any(p.requires_grad for p in kt.teacher.parameters())
    assert "head.conv7_1" in kt.layer_names and len(kt.layer_names) == 20  # the 20 BWN layers
    assert "backbone.conv5_1.norm" not in kt.layer_names
    assert model.quant_report is not None  # the student is the quantized detector itself


def test_kt_loss_zero_when_student_equals_teacher():
    _, model, _ = build()
    set_quantization_enabled(model, False)  # student == float teacher
    model.train()
    losses = model(tiny_batch())
    assert "loss_kt" in losses and float(losses["loss_kt"]) == 0.0


def test_kt_gradient_reaches_only_the_student():
    cfg, model, kt = build()
    before = {k: v.clone() for k, v in kt.teacher.state_dict().items()}
    model.train()
    losses = model(tiny_batch())
    assert float(losses["loss_kt"]) > 0  # binary student differs from the float teacher
    losses["loss_kt"].backward()
    assert all(p.grad is None for p in kt.teacher.parameters())
    assert model.head.conv7_1.weight.grad is not None
    assert model.head.conv7_1.weight.grad.abs().sum() > 0
    assert model.head.pred.weight.grad is None  # after every K layer: no KT gradient there
    train_step(cfg, model)
    after = kt.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen (BN stats too)


def test_lambdas_scale_cls_and_loc_losses():
    _, model, _ = build()
    model.train()
    torch.manual_seed(1)
    base = {k: float(v) for k, v in model(tiny_batch()).items()}
    _, model2, _ = build(["MODEL.KT.LAMBDA_CLS", "2.0", "MODEL.KT.LAMBDA_LOC", "3.0",
                          "MODEL.KT.LAMBDA_KT", "0.5"])
    model2.train()
    torch.manual_seed(1)
    scaled = {k: float(v) for k, v in model2(tiny_batch()).items()}
    for k in ("loss_obj", "loss_noobj", "loss_class"):
        assert scaled[k] == pytest.approx(2 * base[k], rel=1e-5)
    assert scaled["loss_coord"] == pytest.approx(3 * base["loss_coord"], rel=1e-5)
    assert scaled["loss_kt"] == pytest.approx(0.5 * base["loss_kt"], rel=1e-5)


def test_generic_retinanet_student_and_bad_layers():
    cfg = load_test_config("configs/KT/RetinaNet-R18-shapes-cpu-2bit-KT.yaml", narrow=True)
    model = build_model(cfg)
    assert model.knowledge_transfer.layer_names == [
        "backbone.fpn_output3", "backbone.fpn_output4", "backbone.fpn_output5", "backbone.top_block"]
    losses = train_step(cfg, model)
    assert losses["loss_kt"] > 0 and {"loss_cls", "loss_box_reg"} <= set(losses)
    cfg = load_test_config(YOLO_KT, ["MODEL.KT.LAYERS", "['nothing\\\\.here']"])
    with pytest.raises(ConfigError, match="matches no module"):
        build_model(cfg)
