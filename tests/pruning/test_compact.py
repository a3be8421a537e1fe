"""Hard pruning (aqd_d2.pruning.compact): removing the masked filters and the consumers'
input channels gives a smaller model that computes exactly what the masked model computes."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from torch import nn

from aqd_d2.engine.pruning import build_pruning_hook
from aqd_d2.pruning import apply_filter_masks
from aqd_d2.pruning.compact import masks_from_checkpoint, remove_pruned_channels
from tests.test_configs import load_test_config


def _block():
    m = nn.Module()
    m.conv1 = Conv2d(3, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8), activation=F.relu)
    m.conv2 = Conv2d(8, 5, 3, padding=1, bias=True)
    return m


def _run(m, x):
    return m.conv2(m.conv1(x))


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_compact_block_equals_masked_block():
    torch.manual_seed(0)
    m = _block()
    with torch.no_grad():
        m.conv1.norm.running_mean.uniform_(-1, 1)
        m.conv1.norm.bias.uniform_(-1, 1)
    keep = torch.tensor([True, False, True, True, False, True, False, True])
    apply_filter_masks(m, {"conv1": keep})
    m.eval()
    x = torch.randn(2, 3, 6, 6)
    ref = _run(m, x)
    before = _params(m)
    report = remove_pruned_channels(m, {"conv1": keep}, ["conv1$=>conv2"])
    assert report == [("conv1", 8, 5)]
    assert m.conv1.weight.shape == (5, 3, 3, 3) and m.conv1.norm.running_mean.shape == (5,)
    assert m.conv2.weight.shape == (5, 5, 3, 3) and m.conv2.in_channels == 5
    # 3 filters of 27 weights + 2 x 3 BN affine + 3 input channels of conv2 (5 x 9 each)
    assert before - _params(m) == 3 * 27 + 3 * 2 + 3 * 5 * 9
    assert torch.allclose(_run(m, x), ref, atol=1e-6)


def test_unmasked_consumer_rule_errors_and_depthwise_needs_coupling():
    m = _block()
    with pytest.raises(ValueError, match="conv9"):
        remove_pruned_channels(m, {"conv1": torch.ones(8, dtype=torch.bool)}, ["conv1$=>conv9"])
    m.conv2 = Conv2d(8, 8, 3, padding=1, groups=8)
    keep = torch.arange(8) % 2 == 0
    with pytest.raises(ValueError, match="COUPLED"):
        remove_pruned_channels(m, {"conv1": keep}, ["conv1$=>conv2"])


@pytest.mark.parametrize("rel_path,feature,channels", [
    ("configs/Pruned/R18-FPN-shapes-voc-cpu-PFEC.yaml", "p2", {"backbone.bottom_up.res2.0.conv1": 45,
                                                               "backbone.bottom_up.res5.1.conv1": 359}),
    ("configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-PFEC.yaml", "conv5",
     {"backbone.stage2.0.branch_main.0": 17, "backbone.stage2.0.branch_main.1": 17,
      "backbone.stage4.3.branch_main.0": 68}),
])
def test_pfec_configs_compact_to_an_equal_smaller_detector(rel_path, feature, channels):
    torch.manual_seed(0)
    cfg = load_test_config(rel_path)
    model = build_model(cfg)
    masks = build_pruning_hook(cfg).prune(model, 0)
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.backbone(x)[feature]
    before = _params(model)
    report = remove_pruned_channels(model, masks, cfg.AQD.PRUNING.CONSUMERS)
    assert len(report) == len(masks)
    mods = dict(model.named_modules())
    for name, n in channels.items():
        assert mods[name].out_channels == n, name
    assert _params(model) < before
    with torch.no_grad():
        assert torch.allclose(model.backbone(x)[feature], ref, atol=1e-5)
        out = model([{"image": x[0] * 255, "height": 64, "width": 64}])
    assert len(out) == 1 and "instances" in out[0]


def test_masks_from_checkpoint(tmp_path):
    keep = torch.tensor([True, False])
    torch.save({"model": {}, "trainer": {"hooks": {"FilterPruningHook": {"masks": {"a": keep}}}}},
               tmp_path / "m.pth")
    assert torch.equal(masks_from_checkpoint(str(tmp_path / "m.pth"))["a"], keep)
    torch.save({"model": {}}, tmp_path / "n.pth")
    with pytest.raises(KeyError, match="n.pth"):
        masks_from_checkpoint(str(tmp_path / "n.pth"))


def test_masks_from_a_checkpoint_of_a_detector_carrying_its_schedule(tmp_path):
    keep = torch.tensor([True, False, True])
    torch.save({"model": {"filter_pruning.backbone/res2/0/conv1": keep,
                          "filter_pruning.last_prune_iter": torch.tensor(4),
                          "filter_pruning.last_train_iter": torch.tensor(9),
                          "backbone.res2.0.conv1.weight": torch.zeros(3, 1, 1, 1)}},
               tmp_path / "m.pth")
    masks = masks_from_checkpoint(str(tmp_path / "m.pth"))
    assert list(masks) == ["backbone.res2.0.conv1"] and torch.equal(masks["backbone.res2.0.conv1"], keep)


def test_compacting_a_trained_detector_keeps_its_schedule_consistent():
    """After training steps driven by the model's own schedule, the compact model (masks from
    ``model.filter_pruning``) runs, and its schedule's masks follow the smaller convs."""
    from detectron2.utils.events import EventStorage

    from tests.test_configs import tiny_batch

    torch.manual_seed(0)
    cfg = load_test_config("configs/Pruned/R18-FPN-shapes-voc-cpu-PFEC.yaml", narrow=True)
    model = build_model(cfg).train()
    with EventStorage(0), torch.no_grad():
        model(tiny_batch())  # the PFEC step at iteration 0
    sched = model.filter_pruning
    masks = {n: m.clone() for n, m in sched.masks().items()}
    assert sched.last_prune == 0 and any(not bool(m.all()) for m in masks.values())
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.backbone(x)["p2"]
    report = remove_pruned_channels(model, masks, cfg.AQD.PRUNING.CONSUMERS)
    mods = dict(model.named_modules())
    for name, before, after in report:
        assert mods[name].out_channels == after < before
        assert sched.masks()[name].shape == (after,) and bool(sched.masks()[name].all())
    with torch.no_grad():
        assert torch.allclose(model.backbone(x)["p2"], ref, atol=1e-5)
        out = model([{"image": x[0] * 255, "height": 64, "width": 64}])  # schedule catches up
    assert "instances" in out[0]
    state = model.state_dict()
    assert all(state["filter_pruning." + n.replace(".", "/")].numel() == mods[n].out_channels
               for n in sched.conv_names)
