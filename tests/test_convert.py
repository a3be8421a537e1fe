"""The conversion pass: policy rules, report, validation, on/off switching."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aqd_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.layers import Conv2d

from aqd_d2.config import ConfigError, add_aqd_config, validate_aqd_config
from aqd_d2.convert import (
    QuantPolicy,
    quantize_model,
    quantized_layers,
    set_quantization_enabled,
)
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import Quantizer, available_quantizers, registry
from tests.quant_helpers import ExactSTE


# ---- test-only methods, registered for one test at a time via monkeypatch ------------------


class TUniform(Quantizer):
    """k-bit max-abs uniform quantizer; records the ``weight_norm`` option it was given."""

    allowed_bits = tuple(range(1, 9))

    def __init__(self, bits, role="weight", weight_norm=False):
        super().__init__(bits, role)
        self.weight_norm = weight_norm

    def quantize(self, x):
        hi = x.detach().abs().max().clamp_min(1e-8)
        n = 2 ** self.bits - 1
        q = torch.round((x.detach() + hi) / (2 * hi / n)).clamp(0, n) * (2 * hi / n) - hi
        return ExactSTE.apply(x, q)


class TBinary(Quantizer):
    allowed_bits = (1,)

    def quantize(self, x):
        return ExactSTE.apply(x, torch.where(x >= 0, 1.0, -1.0))


@pytest.fixture
def methods(monkeypatch):
    for name, cls in (("t_uniform", TUniform), ("t_binary", TBinary)):
        monkeypatch.setattr(cls, "method", name)
        monkeypatch.setitem(registry._REGISTRY, name, cls)


def policy(**kw):
    base = dict(w_method="t_uniform", a_method="t_uniform", w_bits=4, a_bits=4)
    base.update(kw)
    return QuantPolicy(**base)


# ---- a tiny detector with detectron2's module names ------------------------------------------
class TinyBottomUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = Conv2d(3, 8, 3, stride=2, padding=1, bias=False, norm=nn.BatchNorm2d(8))
        self.res3 = nn.Sequential(Conv2d(8, 8, 3, padding=1), Conv2d(8, 16, 3, stride=2, padding=1))

    def forward(self, x):
        x = F.relu(self.stem.conv1(x))
        return {"res3": self.res3(x)}


class TinyFPN(nn.Module):
    """Registers its convs before bottom_up and keeps them in plain lists, as detectron2's FPN."""

    def __init__(self):
        super().__init__()
        self.fpn_lateral3 = Conv2d(16, 8, 1)
        self.fpn_output3 = Conv2d(8, 8, 3, padding=1)
        self.lateral_convs = [self.fpn_lateral3]
        self.output_convs = [self.fpn_output3]
        self.bottom_up = TinyBottomUp()

    def forward(self, x):
        f = self.bottom_up(x)["res3"]
        return self.output_convs[0](self.lateral_convs[0](f))


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyFPN()
        self.head = nn.Module()
        self.head.cls_subnet = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head.cls_score = nn.Conv2d(8, 3, 3, padding=1)
        self.head.bbox_pred = nn.Conv2d(8, 4, 3, padding=1)
        self.head.upsample = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.extra = nn.Linear(4, 4)  # outside every component

    def forward(self, x):
        f = self.head.cls_subnet(self.backbone(x))
        return self.head.cls_score(f), self.head.bbox_pred(f)


def test_default_rules_counts_and_report(methods):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    report = quantize_model(model, policy())
    assert report.counts() == {
        "fpn": {"quantized": 2, "float": 0},
        "backbone": {"quantized": 2, "float": 1},
        "head": {"quantized": 1, "float": 3},
        "other": {"quantized": 0, "float": 1},
    }
    assert report["backbone.bottom_up.stem.conv1"].reason == "first layer (KEEP_FIRST_FP)"
    assert report["head.cls_score"].reason == "last layer (KEEP_LAST_FP)"
    assert "not converted" in report["head.upsample"].reason
    assert report["extra"].reason == "component 'other' not in SCOPE"
    assert isinstance(model.backbone.bottom_up.res3[1], QConv2d)
    assert type(model.backbone.bottom_up.stem.conv1) is Conv2d
    assert type(model.head.cls_score) is nn.Conv2d
    # FPN's plain lists point at the new layers, so they are the ones used in forward
    assert model.backbone.lateral_convs[0] is model.backbone.fpn_lateral3
    assert isinstance(model.backbone.output_convs[0], QConv2d)
    table = report.table()
    assert "component" in table and "t_uniform/4" in table and "backbone: 2 quantized, 1 float" in table
    out = model(x)
    assert not torch.equal(out[0], ref[0])
    # every quantizer off -> exactly the float model
    set_quantization_enabled(model, False)
    assert all(torch.equal(a, b) for a, b in zip(model(x), ref))


def test_scope_first_last_bits_and_overrides(methods):
    model = TinyDetector()
    pol = policy(
        scope=("backbone",), first_last_bits=8,
        overrides=(
            # last matching entry wins; overrides apply outside SCOPE too
            r"head\.cls_subnet\.0::2::2", r"head\..*::3::3", r"backbone\.bottom_up\.res3\.1::32::32",
        ),
    )
    report = quantize_model(model, pol)
    stem = report["backbone.bottom_up.stem.conv1"]
    assert (stem.precision.w_bits, stem.precision.a_bits) == (8, 8)
    assert model.backbone.bottom_up.stem.conv1.weight_quantizer.bits == 8
    assert report["backbone.fpn_lateral3"].reason == "component 'fpn' not in SCOPE"
    assert report["head.cls_score"].precision.w_bits == 3  # override beats KEEP_LAST_FP
    assert report["head.cls_subnet.0"].precision.w_bits == 3
    assert not report["backbone.bottom_up.res3.1"].quantized  # 32 bits = float


def test_weight_only_policy_and_kwargs(methods):
    model = TinyDetector()
    quantize_model(model, policy(w_method="t_binary", w_bits=1, a_bits=32, w_norm=False))
    conv = model.backbone.bottom_up.res3[0]
    assert conv.input_quantizer is None and conv.weight_quantizer.bits == 1
    assert "a=float" in repr(conv)
    model = TinyDetector()
    quantize_model(model, policy(w_norm=True))
    assert model.backbone.bottom_up.res3[0].weight_quantizer.weight_norm is True
    assert model.backbone.bottom_up.res3[0].input_quantizer.weight_norm is False  # weights only
    with pytest.raises(ConfigError, match="W_KWARGS"):
        policy(w_kwargs={"no_such_option": 1})


def test_shared_module_hooks_linear_and_idempotence(methods):
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 3, 1), shared)
    model.head = nn.Sequential(shared, nn.Linear(3, 3))
    seen = []
    shared.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    pol = policy(scope=("backbone", "head"), keep_first_fp=False, keep_last_fp=False)
    quantize_model(model, pol)
    assert model.backbone[1] is model.head[0] and isinstance(model.head[0], QConv2d)
    assert isinstance(model.head[1], QLinear)
    model.backbone(torch.randn(1, 3, 4, 4))
    assert seen == [QConv2d]
    report = quantize_model(model, pol)  # a second pass leaves quantized layers alone
    assert {d.reason for d in report.layers} == {"already quantized"}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(scope=("backbone", "fpn", "head", "neck")), "MODEL.QUANT.SCOPE"),
        (dict(overrides=("nothing\\.here::2::2",)), "OVERRIDES"),
        (dict(first_layer=r"nope"), "FIRST_LAYER"),
    ],
)
def test_model_dependent_errors_leave_model_unchanged(methods, kw, match):
    if "neck" in kw.get("scope", ()):
        kw["component_prefixes"] = (("neck", "neck."), ("backbone", "backbone."), ("fpn", "x"), ("head", "head."))
        kw["scope"] = ("backbone", "neck")
    model = TinyDetector()
    with pytest.raises(ConfigError, match=match):
        quantize_model(model, policy(**kw))
    assert not list(quantized_layers(model))


def test_set_quantization_enabled_is_checkpointed(methods):
    model = TinyDetector()
    quantize_model(model, policy())
    names = set_quantization_enabled(model, False, r"backbone\.bottom_up\..*", role="weight")
    assert names == ["backbone.bottom_up.res3.0", "backbone.bottom_up.res3.1"]
    sd = model.state_dict()
    assert not sd["backbone.bottom_up.res3.0.weight_quantizer.enabled"]
    assert sd["backbone.bottom_up.res3.0.input_quantizer.enabled"]
    other = TinyDetector()
    quantize_model(other, policy())
    other.load_state_dict(sd)
    assert not other.backbone.bottom_up.res3[0].weight_quantizer.is_enabled
    with pytest.raises(ValueError, match="matches no quantized layer"):
        set_quantization_enabled(model, True, r"nothing")


# ---- config keys and validation --------------------------------------------------------------
def _cfg(**quant):
    cfg = add_aqd_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    for k, v in quant.items():
        cfg.MODEL.QUANT[k] = v
    return cfg


def test_defaults_match_config():
    assert QuantPolicy.from_config(_cfg(), check_methods=False) == QuantPolicy(check_methods=False)


@pytest.mark.parametrize(
    "quant, match",
    [
        (dict(W_BITS=0), r"MODEL\.QUANT\.W_BITS"),
        (dict(W_BITS=9), r"MODEL\.QUANT\.W_BITS"),
        (dict(A_BITS=9), r"MODEL\.QUANT\.A_BITS"),
        (dict(W_METHOD="nope"), r"MODEL\.QUANT\.W_METHOD = 'nope'.*known: \[.*t_uniform"),
        (dict(W_METHOD="t_binary", W_BITS=2), r"binary method.*W_BITS must be 1"),
        (dict(W_METHOD="bnn", W_BITS=4), r"binary method"),
        (dict(A_METHOD="t_binary", A_BITS=1, FIRST_LAST_BITS=8), "FIRST_LAST_METHOD"),
        (dict(SCOPE=["backbone", "neck"]), r"MODEL\.QUANT\.SCOPE"),
        (dict(OVERRIDES=["onlyregex"]), r"OVERRIDES\[0\]"),
        (dict(OVERRIDES=[r"head\..*:t_uniform:x:t_uniform:2"]), r"OVERRIDES\[0\]"),
        (dict(OVERRIDES=[r"head\..*:t_binary:3::"]), r"OVERRIDES\[0\].*binary"),
        (dict(COMPONENT_PREFIXES=["nocolon"]), "COMPONENT_PREFIXES"),
        (dict(LAST_LAYERS=["(unclosed"]), "LAST_LAYERS"),
        (dict(W_KWARGS=["novalue"]), "W_KWARGS"),
    ],
)
def test_validation_errors_name_the_key(methods, quant, match):
    cfg = _cfg(ENABLED=True, W_METHOD="t_uniform", A_METHOD="t_uniform")
    for k, v in quant.items():
        cfg.MODEL.QUANT[k] = v
    with pytest.raises(ConfigError, match=match):
        validate_aqd_config(cfg)


def test_disabled_policy_skips_method_lookup_but_checks_bits():
    validate_aqd_config(_cfg(W_METHOD="not_registered_anywhere"))
    with pytest.raises(ConfigError, match="W_BITS"):
        validate_aqd_config(_cfg(W_BITS=0))


@pytest.mark.skipif("liq" not in available_quantizers(), reason="LIQ not registered yet")
def test_default_policy_with_real_methods():
    model = TinyDetector().eval()
    report = quantize_model(model, QuantPolicy.from_config(_cfg(ENABLED=True)))
    conv = model.backbone.bottom_up.res3[0]
    assert conv.weight_quantizer.method == "liq" and conv.weight_quantizer.bits == 4
    assert report.counts()["fpn"] == {"quantized": 2, "float": 0}
    model(torch.randn(1, 3, 16, 16))
