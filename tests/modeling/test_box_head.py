"""BiRealFCHead: binary box-head FCs see both signs; detectron2's head with a binary fc2 is refused."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

import aqd_d2
from aqd_d2.config import ConfigError
from aqd_d2.layers import QLinear
from aqd_d2.modeling.box_head import BiRealFCHead
from tests.conftest import REPO

SHAPE = ShapeSpec(channels=4, height=2, width=2)


def test_forward_matches_hand_composition():
    torch.manual_seed(0)
    head = BiRealFCHead(SHAPE, conv_dims=[], fc_dims=[5, 5], fc_norm="BN", fc_activation="none",
                        fc_shortcut=True).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 2, 2)
    bn1, bn2 = head.fc_relu1.norm, head.fc_relu2.norm
    h1 = bn1(head.fc1(x.flatten(1)))       # 16 -> 5: no shortcut (widths differ)
    h2 = bn2(head.fc2(h1)) + h1             # 5 -> 5: identity shortcut, no ReLU
    assert torch.allclose(head(x), h2, atol=1e-6)
    assert [n for n, _ in head.named_parameters()][:2] == ["fc1.weight", "fc1.bias"]


@pytest.mark.parametrize("act, cls", [("relu", torch.nn.ReLU), ("hardtanh", torch.nn.Hardtanh),
                                      ("prelu", torch.nn.PReLU)])
def test_activation_choices(act, cls):
    head = BiRealFCHead(SHAPE, conv_dims=[], fc_dims=[3], fc_norm="", fc_activation=act, fc_shortcut=False)
    assert isinstance(head.fc_relu1.act, cls) and isinstance(head.fc_relu1.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="FC_ACTIVATION"):
        BiRealFCHead(SHAPE, conv_dims=[], fc_dims=[3], fc_activation="gelu")


def _binary_frcnn(*opts):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "FasterRCNN" / "R18-FPN-shapes-cpu-binary-boxhead.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
                         "MODEL.FPN.OUT_CHANNELS", "16"] + list(opts))
    return cfg


def test_binary_fc2_of_detectron2_head_is_refused():
    cfg = _binary_frcnn("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead")
    with pytest.raises(ConfigError, match=r"roi_heads\.box_head\.fc2.*BiRealFCHead"):
        build_model(cfg)


def test_binary_box_head_gives_distinct_box_features():
    """With detectron2's ReLU the binarized fc2 input is all +1, so every ROI gets the same
    output; BiRealFCHead's fc2 sees both signs and the ROIs differ."""
    torch.manual_seed(0)
    model = build_model(_binary_frcnn()).eval()
    head = model.roi_heads.box_head
    assert isinstance(head, BiRealFCHead) and isinstance(head.fc2, QLinear)
    seen = {}
    head.fc2.register_forward_pre_hook(lambda m, inp: seen.__setitem__("x", inp[0]))
    out = head(torch.randn(6, 16, 7, 7))
    assert (seen["x"] < 0).any() and (seen["x"] > 0).any()
    assert not torch.allclose(out[0], out[1])
    # the same weights in detectron2's layout (ReLU, no BN / shortcut): fc2 sees no negatives
    plain = FastRCNNConvFCHead(ShapeSpec(channels=16, height=7, width=7), conv_dims=[], fc_dims=[16, 16])
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("fc_relu")},
                          strict=False)
    h = plain.fc_relu1(plain.fc1(plain.flatten(torch.randn(6, 16, 7, 7))))
    assert (h >= 0).all()
