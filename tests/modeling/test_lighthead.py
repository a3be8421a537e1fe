"""ShuffleNetV2 backbone and Light-Head R-CNN (aqd_d2.modeling.backbone.shufflenetv2,
aqd_d2.modeling.meta_arch.lighthead): architecture against the ShuffleNetV2 paper / torchvision,
PS-RoIAlign and the large separable conv against hand-computed values, one training step and
inference of the CPU configs, and the layers the pruning configs select."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.modeling import build_model

from aqd_d2.config import ConfigError
from aqd_d2.pruning import select_prunable_layers
from aqd_d2.modeling.backbone.shufflenetv2 import (
    ShuffleNetV2,
    channel_shuffle,
    convert_torchvision_shufflenetv2,
    stage_channels,
)
from aqd_d2.modeling.meta_arch.lighthead import (
    LargeSeparableConv,
    LightHeadROIHeads,
    LightHeadRoIWarp,
    PSRoIAlign,
)
from tests.test_configs import load_test_config, tiny_batch, train_step

CPU_FP = "configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-FP.yaml"


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_shufflenetv2_x05_stages_strides_and_shapes():
    m = ShuffleNetV2(0.5, ["stem", "stage2", "stage3", "stage4", "conv5"])
    assert stage_channels(m) == [24, 48, 96, 192, 1024]  # ShuffleNetV2 paper, Table 5
    out = m(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stem": (1, 24, 16, 24), "stage2": (1, 48, 8, 12), "stage3": (1, 96, 4, 6),
        "stage4": (1, 192, 2, 3), "conv5": (1, 1024, 2, 3)}
    assert {k: s.stride for k, s in m.output_shape().items()} == {
        "stem": 4, "stage2": 8, "stage3": 16, "stage4": 32, "conv5": 32}
    assert [len(m.stage2), len(m.stage3), len(m.stage4)] == [4, 8, 4]


@pytest.mark.parametrize("width", [0.5, 1.0, 1.5, 2.0])
def test_parameter_count_equals_torchvision_without_classifier(width):
    # x0.5: 341,792 parameters = the paper's 1.4 M minus the 1024x1000 classifier
    ours = _params(ShuffleNetV2(width, ["conv5"]))
    tv = getattr(torchvision.models, f"shufflenet_v2_x{str(width).replace('.', '_')}")()
    assert ours == _params(tv) - _params(tv.fc)
    if width == 0.5:
        assert ours == 341_792


def test_torchvision_weights_give_the_same_features():
    torch.manual_seed(0)
    tv = torchvision.models.shufflenet_v2_x0_5().eval()
    for mod in tv.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial statistics
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    ours = ShuffleNetV2(0.5, ["stage3", "conv5"]).eval()
    ours.load_state_dict(convert_torchvision_shufflenetv2(tv.state_dict(), prefix=""), strict=True)
    x = torch.randn(2, 3, 64, 64)
    s3 = tv.stage3(tv.stage2(tv.maxpool(tv.conv1(x))))
    out = ours(x)
    assert torch.equal(out["stage3"], s3)
    assert torch.equal(out["conv5"], tv.conv5(tv.stage4(s3)))
    with pytest.raises(KeyError, match="layer9"):
        convert_torchvision_shufflenetv2({"layer9.0.weight": torch.zeros(1)})


def test_channel_shuffle_hand_example():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_ps_roi_align_reads_one_channel_group_per_bin():
    p, alpha = 3, 2
    # channel k is the constant k: bin (i, j) of output channel c must read channel (c*p+i)*p+j
    x = torch.arange(alpha * p * p, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 12, 12)
    rois = torch.tensor([[0.0, 0.0, 0.0, 48.0, 48.0], [0.0, 8.0, 4.0, 40.0, 30.0]])
    out = PSRoIAlign(p, spatial_scale=0.25, sampling_ratio=2)(x.contiguous(), rois)
    assert out.shape == (2, alpha, p, p)
    expected = torch.arange(alpha * p * p, dtype=torch.float32).view(alpha, p, p)
    assert torch.allclose(out[0], expected) and torch.allclose(out[1], expected)
    with pytest.raises(ValueError, match="divisible by p\\*p = 9"):
        PSRoIAlign(p, 0.25)(torch.zeros(1, 10, 4, 4), rois)


def test_large_separable_conv_is_the_sum_of_two_separable_paths():
    torch.manual_seed(0)
    m = LargeSeparableConv(6, 4, 18, kernel_size=5, relu=False)
    # Light-Head R-CNN Fig. 3: k x 1 then 1 x k, plus 1 x k then k x 1
    assert _params(m) == 2 * (5 * 6 * 4 + 4) + 2 * (5 * 4 * 18 + 18)
    x = torch.randn(2, 6, 9, 7)
    a = F.conv2d(F.conv2d(x, m.col_conv.weight, m.col_conv.bias, padding=(2, 0)),
                 m.col_row_conv.weight, m.col_row_conv.bias, padding=(0, 2))
    b = F.conv2d(F.conv2d(x, m.row_conv.weight, m.row_conv.bias, padding=(0, 2)),
                 m.row_col_conv.weight, m.row_col_conv.bias, padding=(2, 0))
    assert m.col_conv.weight.shape == (4, 6, 5, 1) and m.row_conv.weight.shape == (4, 6, 1, 5)
    assert torch.allclose(m(x), a + b, atol=1e-6)
    m.relu = True
    assert torch.allclose(m(x), F.relu(a + b), atol=1e-6)


def test_lighthead_builds_trains_and_infers():
    torch.manual_seed(0)
    cfg = load_test_config(CPU_FP)
    model = build_model(cfg)
    rh = model.roi_heads
    assert isinstance(rh, LightHeadROIHeads) and isinstance(rh.box_pooler, LightHeadRoIWarp)
    assert rh.box_in_features == ["conv5"] and model.proposal_generator.in_features == ["stage3"]
    thin = rh.box_pooler.thin_feature
    assert thin.col_conv.weight.shape == (64, 1024, 15, 1)   # C_mid 64, k 15 (setting "S")
    assert thin.col_row_conv.weight.shape == (490, 64, 1, 15)  # 10 * 7 * 7 thin channels
    assert [fc.out_features for fc in rh.box_head.fcs] == [2048]  # one 2048-d FC
    assert model.proposal_generator.rpn_head.conv.out_channels == 256
    losses = train_step(cfg, model)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("roi_heads.box_pooler.thin_feature.") for n in grads)
    assert any(n.startswith("backbone.conv5.") for n in grads)
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch(1, with_gt=False))
    inst = out[0]["instances"]
    assert inst.image_size == (64, 64) and inst.pred_boxes.tensor.shape[1] == 4


def test_lighthead_pooled_features_shape_in_the_detector():
    cfg = load_test_config(CPU_FP)
    model = build_model(cfg).eval()
    from detectron2.structures import Boxes

    feats = model.backbone(torch.rand(2, 3, 64, 64))
    boxes = [Boxes(torch.tensor([[0.0, 0.0, 32.0, 32.0]])), Boxes(torch.tensor([[8.0, 8.0, 60.0, 40.0],
                                                                             [1.0, 2.0, 3.0, 4.0]]))]
    with torch.no_grad():
        pooled = model.roi_heads.box_pooler([feats["conv5"]], boxes)
    assert pooled.shape == (3, 10, 7, 7)


def test_lighthead_config_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.IN_FEATURES"):
        build_model(load_test_config(CPU_FP, ["MODEL.ROI_HEADS.IN_FEATURES", "['stage3', 'conv5']"]))
    with pytest.raises(ConfigError, match="MODEL.SHUFFLENETV2.WIDTH_MULT"):
        build_model(load_test_config(CPU_FP, ["MODEL.SHUFFLENETV2.WIDTH_MULT", "0.75"]))
    with pytest.raises(ConfigError, match="MODEL.LIGHT_HEAD.KERNEL_SIZE"):
        build_model(load_test_config(CPU_FP, ["MODEL.LIGHT_HEAD.KERNEL_SIZE", "14"]))


@pytest.mark.parametrize("rel_path,expected", [
    ("configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-PFEC.yaml", 16),  # branch_main.0 per unit
    ("configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-SFP.yaml", 13 * 3 + 3 * 5 + 1),
    ("configs/Pruned/R18-FPN-shapes-voc-cpu-PFEC.yaml", 8),   # conv1 of the 8 basic blocks
    ("configs/Pruned/R18-FPN-shapes-voc-cpu-SFP.yaml", 16),   # conv1 + conv2, no shortcuts
])
def test_pruning_configs_select_the_intended_layers(rel_path, expected):
    cfg = load_test_config(rel_path)
    names = [n for n, _ in select_prunable_layers(build_model(cfg), cfg.AQD.PRUNING.LAYERS,
                                                 cfg.AQD.PRUNING.EXCLUDE)]
    assert len(names) == expected, names
    assert not any("shortcut" in n or n.startswith("backbone.stem") for n in names)


def test_pfec_shufflenet_config_zeroes_pruned_channels_through_the_depthwise_conv():
    from aqd_d2.engine.pruning import build_pruning_hook

    rel = "configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-PFEC.yaml"
    cfg = load_test_config(rel)
    model = build_model(cfg)
    hook = build_pruning_hook(cfg)
    masks = hook.prune(model, 0)
    assert len(masks) == 32  # 16 ranked 1x1 convs + their 16 coupled depthwise convs
    unit = model.backbone.stage3[2]
    keep = masks["backbone.stage3.2.branch_main.0"]
    assert torch.equal(masks["backbone.stage3.2.branch_main.1"], keep)
    assert int((~keep).sum()) == int(48 * 0.3)  # floor(0.3 * 48) of the 48 branch channels
    seen = {}
    unit.branch_main[1].register_forward_hook(lambda m, i, o: seen.setdefault("dw", o))
    model.eval()
    with torch.no_grad():
        model.backbone(torch.rand(1, 3, 64, 64))
    assert torch.all(seen["dw"][:, ~keep] == 0) and torch.any(seen["dw"][:, keep] != 0)


def test_lighthead_with_bidet_objective_has_gaussian_ib_and_sop_losses():
    from aqd_d2.modeling.meta_arch.lighthead import LightHeadBiDetROIHeads

    torch.manual_seed(0)
    cfg = load_test_config("configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-BiDet.yaml")
    model = build_model(cfg)
    assert isinstance(model.roi_heads, LightHeadBiDetROIHeads)
    assert isinstance(model.roi_heads.box_pooler, LightHeadRoIWarp)
    assert model.bidet.bottleneck.prior == "gaussian"
    losses = train_step(cfg, model)
    assert {"loss_ib_feature", "loss_cls", "loss_box_ib", "loss_sop"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model.eval()
    with torch.no_grad():
        a = model(tiny_batch(1, with_gt=False))[0]["instances"]
        b = model(tiny_batch(1, with_gt=False))[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)  # deterministic features in eval


def test_freeze_at_freezes_the_first_blocks():
    from detectron2.layers import FrozenBatchNorm2d

    m = ShuffleNetV2(0.5, ["conv5"], freeze_at=2)
    assert not any(p.requires_grad for p in m.stem.parameters())
    assert not any(p.requires_grad for p in m.stage2.parameters())
    assert all(p.requires_grad for p in m.stage3.parameters())
    assert isinstance(m.stage2[0].branch_main[0].norm, FrozenBatchNorm2d)
    assert isinstance(m.stage3[0].branch_main[0].norm, torch.nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="MODEL.SHUFFLENETV2.OUT_FEATURES"):
        build_model(load_test_config(CPU_FP, ["MODEL.SHUFFLENETV2.OUT_FEATURES", "['res4']"]))
