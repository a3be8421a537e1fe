"""Bi-Real-Net style ResNet backbone (aqd_d2/modeling/backbone/bireal_resnet.py)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, build_resnet_backbone

import aqd_d2
from aqd_d2.config import ConfigError
from aqd_d2.layers import QConv2d
from aqd_d2.modeling.backbone.bireal_resnet import (BiRealBasicBlock, BiRealStem, build_bireal_resnet_backbone)
from tests.conftest import REPO, tiny_train_opts
from tests.test_configs import load_test_config, tiny_batch, train_step

BINARY = "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml"
FLOAT = "configs/FasterRCNN/R18-FPN-shapes-cpu-FP.yaml"


@pytest.mark.parametrize("mode", ["every_conv", "every_block"])
@pytest.mark.parametrize("act", ["none", "hardtanh", "prelu"])
@pytest.mark.parametrize("down", ["avgpool", "conv"])
def test_block_shapes(mode, act, down):
    x = torch.randn(2, 8, 9, 9)
    block = BiRealBasicBlock(8, 16, stride=2, shortcut_mode=mode, activation=act, downsample=down)
    assert block(x).shape == (2, 16, 5, 5)  # ceil(9 / 2), as the stride-2 3x3 conv
    same = BiRealBasicBlock(8, 8, shortcut_mode=mode, activation=act, downsample=down)
    assert same.shortcut is None and same(x).shape == x.shape
    assert (block.act1 is None) == (act == "none")


def test_parameter_names_are_those_of_detectron2_basic_block():
    """So a float detectron2 ResNet-18 checkpoint loads into the Bi-Real backbone."""
    ours = BiRealBasicBlock(8, 16, stride=2, norm="BN")
    theirs = BasicBlock(8, 16, stride=2, norm="BN")
    sd = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ours.load_state_dict(sd)


def _eval_block(**kw):
    """A block in eval mode whose BNs are the identity (fresh running stats, affine 1 / 0)."""
    torch.manual_seed(0)
    return BiRealBasicBlock(**kw).eval()


def test_every_conv_forward_equals_hand_formula():
    b = _eval_block(in_channels=2, out_channels=4, stride=2, shortcut_mode="every_conv", activation="hardtanh")
    x = torch.randn(1, 2, 6, 6)
    eps = b.conv1.norm.eps
    bn = lambda t: t / (1 + eps) ** 0.5  # noqa: E731  identity BN up to eps
    s = bn(F.conv2d(F.avg_pool2d(x, 2), b.shortcut.weight))
    y1 = torch.clamp(bn(F.conv2d(x, b.conv1.weight, stride=2, padding=1)), -1, 1) + s
    y2 = torch.clamp(bn(F.conv2d(y1, b.conv2.weight, padding=1)), -1, 1) + y1
    torch.testing.assert_close(b(x), y2)
    # every_block: one shortcut around both convs
    b = _eval_block(in_channels=2, out_channels=2, shortcut_mode="every_block")
    y1 = bn(F.conv2d(x, b.conv1.weight, padding=1))
    torch.testing.assert_close(b(x), bn(F.conv2d(y1, b.conv2.weight, padding=1)) + x)


def test_avgpool_shortcut_hand_values():
    """x = [[1, 2], [3, 4]], 1x1 weights (1, 2): avg 2.5 -> (2.5, 5.0) (BN identity in eval)."""
    b = _eval_block(in_channels=1, out_channels=2, stride=2)
    with torch.no_grad():
        b.shortcut.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = b._shortcut(x).flatten()
    torch.testing.assert_close(out, torch.tensor([2.5, 5.0]) / (1 + b.shortcut.norm.eps) ** 0.5)
    # "conv": ResNet's strided 1x1 conv samples the top-left pixel instead
    b = _eval_block(in_channels=1, out_channels=2, stride=2, downsample="conv")
    with torch.no_grad():
        b.shortcut.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(b._shortcut(x).flatten(), torch.tensor([1.0, 2.0]) / (1 + b.shortcut.norm.eps) ** 0.5)


def test_stem_relu_is_optional():
    x = torch.randn(1, 3, 16, 16)
    torch.manual_seed(0)
    stem = BiRealStem(3, 8, "BN", relu=False).eval()
    assert stem(x).min() < 0 < stem(x).max() and stem(x).shape == (1, 8, 4, 4)
    stem.relu = True
    assert stem(x).min() >= 0


def _cfg(path=FLOAT, extra=()):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(extra))
    return cfg


def test_stages_match_resnet18_and_its_checkpoint_loads():
    cfg = _cfg()
    ours = build_bireal_resnet_backbone(cfg, ShapeSpec(channels=3))
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert ours.output_shape() == theirs.output_shape()
    assert {n: (s.channels, s.stride) for n, s in ours.output_shape().items()} == {
        "res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}
    assert [len(s) for s in ours.stages] == [2, 2, 2, 2]
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    x = torch.randn(1, 3, 64, 64)
    assert {k: v.shape for k, v in ours(x).items()} == {k: v.shape for k, v in theirs(x).items()}


def _binary_conv_inputs(cfg):
    """min / max of the input of every binarized backbone conv in one inference."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = {}

    def hook(name):
        def fn(module, inputs, output):
            seen[name] = (float(inputs[0].min()), float(inputs[0].max()))
        return fn

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QConv2d)
             and n.startswith("backbone.bottom_up.") and m.input_quantizer is not None]
    for n, m in convs:
        m.register_forward_hook(hook(n))
    with torch.no_grad():
        model(tiny_batch(1, with_gt=False))
    assert len(seen) == len(convs) > 0
    return seen


def test_binary_convs_see_both_signs():
    """Regression: with detectron2's BasicBlock (ReLU before every conv) every binary conv of a
    binary ResNet-18 gets inputs >= 0 (sign() = all +1); with the Bi-Real blocks all 16 see
    both signs."""
    seen = _binary_conv_inputs(load_test_config(BINARY, narrow=True))
    assert len(seen) == 16  # the 1x1 shortcuts stay float (OVERRIDES), the stem is the first layer
    assert all(lo < 0 < hi for lo, hi in seen.values()), seen
    old = load_test_config(BINARY, narrow=True, extra=[
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.QUANT.OVERRIDES", "[]"])
    assert all(lo >= 0 for lo, _ in _binary_conv_inputs(old).values())


def test_float_bireal_frcnn_trains_and_infers(tmp_path):
    """The float Faster R-CNN with the Bi-Real R18 backbone: one step of aqd_d2's Trainer on the
    tiny dataset (loss finite, weights change), then inference."""
    from aqd_d2.engine import Trainer

    cfg = _cfg(extra=tiny_train_opts(tmp_path, max_iter=1) + [
        "MODEL.BACKBONE.NAME", "build_bireal_resnet_fpn_backbone", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64"])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    w = trainer.model.backbone.bottom_up.res2[0].conv1.weight
    before = w.detach().clone()
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert not w.detach().equal(before)
    assert torch.isfinite(torch.tensor(trainer.storage.history("total_loss").latest()))
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(tiny_batch(1, with_gt=False))
    assert out[0]["instances"].image_size == (64, 64)


def test_binary_config_trains_a_step():
    cfg = load_test_config(BINARY, narrow=True)
    torch.manual_seed(0)
    losses = train_step(cfg, build_model(cfg))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize("key, value, match", [
    ("MODEL.BIREAL.ACTIVATION", "relu", "MODEL.BIREAL.ACTIVATION"),
    ("MODEL.BIREAL.SHORTCUT", "every_two", "every_conv"),
    ("MODEL.BIREAL.DOWNSAMPLE", "maxpool", "avgpool"),
    ("MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.DEPTH"),
])
def test_bad_config_values_name_the_key(key, value, match):
    cfg = _cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(ConfigError, match=match):
        build_bireal_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_basicblock_binary_detector_is_blind_and_bireal_is_not():
    """Consequence of the defect: with BasicBlock every binary conv sees a constant (+1), so
    the binary FPN features are the same for any two images; the Bi-Real ones differ."""
    for extra, blind in (([], False), (["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
                                        "MODEL.QUANT.OVERRIDES", "[]"], True)):
        torch.manual_seed(0)
        model = build_model(load_test_config(BINARY, narrow=True, extra=extra)).eval()
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
        with torch.no_grad():
            feats = model.backbone((x - model.pixel_mean) / model.pixel_std)
        diffs = [float((f[0] - f[1]).abs().max()) for f in feats.values()]
        assert (max(diffs) == 0.0) == blind, diffs
