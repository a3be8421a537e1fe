"""torchvision ResNet / VGG16 state_dicts converted to aqd_d2's backbone names give the same
backbone outputs (randomly initialised torchvision models, non-trivial BN statistics; issue 17
item 3). ShuffleNetV2: tests/modeling/test_lighthead.py. MobileNet: torchvision has no V1, the
converter says so."""
import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from aqd_d2.config import add_aqd_config
from aqd_d2.modeling.backbone.torchvision_weights import convert_torchvision_backbone


def _random_stats(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _cfg(**keys):
    cfg = add_aqd_config(get_cfg())
    for k, v in keys.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_same_outputs(depth):
    tv = _random_stats(getattr(torchvision.models, f"resnet{depth}")(weights=None))
    cfg = _cfg(MODEL__BACKBONE__NAME="build_resnet_backbone", MODEL__RESNETS__DEPTH=depth,
               MODEL__RESNETS__RES2_OUT_CHANNELS=64 if depth < 50 else 256,
               MODEL__RESNETS__NORM="BN", MODEL__RESNETS__OUT_FEATURES=["res4", "res5"],
               MODEL__RESNETS__STRIDE_IN_1X1=False, MODEL__BACKBONE__FREEZE_AT=0)
    ours = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    sd = convert_torchvision_backbone(tv.state_dict(), "resnet", prefix="")
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and not missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        r4 = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        out = ours(x)
        torch.testing.assert_close(out["res4"], r4, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["res5"], tv.layer4(r4), rtol=1e-4, atol=1e-4)


def test_resnet_c4_names():
    tv = torchvision.models.resnet18(weights=None)
    sd = convert_torchvision_backbone(tv.state_dict(), "resnet", prefix="backbone.",
                                      res5_prefix="roi_heads.box_head.res5.")
    assert "roi_heads.box_head.res5.0.shortcut.norm.running_var" in sd
    assert "backbone.res4.1.conv2.norm.weight" in sd and "backbone.stem.conv1.weight" in sd
    assert not any(k.startswith("backbone.res5") or "fc." in k for k in sd)


@pytest.mark.parametrize("arch, norm, conv4_3_end", [("vgg16", "", 23), ("vgg16_bn", "BN", 33)])
def test_vgg16_same_outputs_and_ssd_fc_layers(arch, norm, conv4_3_end):
    tv = _random_stats(getattr(torchvision.models, arch)(weights=None))
    cfg = _cfg(MODEL__BACKBONE__NAME="build_vgg16_ssd_backbone", MODEL__VGG__NORM=norm,
               MODEL__SSD__IN_FEATURES=["conv4_3", "fc7"])
    ours = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    sd = convert_torchvision_backbone(tv.state_dict(), arch, prefix="")
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and missing == ["conv4_3_norm.weight"]  # SSD's L2Norm scale
    assert sd["fc6.weight"].shape == ours.fc6.weight.shape == (1024, 512, 3, 3)
    assert torch.equal(sd["fc7.weight"][5, 7, 0, 0], tv.classifier[3].weight[20, 28])
    assert torch.equal(sd["fc6.weight"][1, 2, 1, 2], tv.classifier[0].weight.view(4096, 512, 7, 7)[4, 2, 3, 6])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["conv4_3"], ours.conv4_3_norm(tv.features[:conv4_3_end](x)),
                                   rtol=1e-4, atol=1e-4)


def test_unknown_arch_and_keys_are_named():
    with pytest.raises(ValueError, match="no MobileNetV1"):
        convert_torchvision_backbone({}, "mobilenet_v2")
    with pytest.raises(KeyError, match="layer9"):
        convert_torchvision_backbone({"layer9.0.conv1.weight": torch.zeros(1)}, "resnet")
    with pytest.raises(KeyError, match="expected 13 convs"):
        convert_torchvision_backbone({"features.0.weight": torch.zeros(1, 1, 1, 1)}, "vgg16")
