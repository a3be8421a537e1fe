"""The eval-mode integer form of quantized layers (aqd_d2/layers/integer_eval.py): hand-computed
values, when it runs and when it does not, and its configuration."""
from __future__ import annotations

import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn

from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.layers.integer_eval import (
    binary_constants, fold_norm, int8_constants, int8_epilogue, integer_forward, integer_plan,
)
from aqd_d2.quantization import build_quantizer


def _binary_layer():
    """A 1x1 binary conv, 2 -> 2 channels, weights with per-channel alpha (XNOR-style)."""
    layer = QConv2d(2, 2, 1, bias=True, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                    input_quantizer=build_quantizer("bnn", 1, "activation"))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -3.0], [0.5, 0.5]]).view(2, 2, 1, 1))
        layer.bias.copy_(torch.tensor([0.25, -1.0]))
    return layer.eval()


def test_binary_by_hand():
    layer = _binary_layer()
    x = torch.tensor([0.3, -0.2]).view(1, 2, 1, 1)  # signs +1, -1
    # channel 0: signs (+1, -1) . (+1, -1) = 2, alpha = (1 + 3) / 2 = 2 -> 2 * 2 + 0.25 = 4.25
    # channel 1: signs (+1, +1) . (+1, -1) = 0, alpha = 0.5 -> 0 * 0.5 - 1 = -1
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y.flatten(), torch.tensor([4.25, -1.0]))
    plan = integer_plan(layer)
    assert plan.kind == "binary" and torch.equal(plan.alpha, torch.tensor([2.0, 0.5]))


def test_binary_padding_is_minus_one():
    layer = QConv2d(1, 1, 3, padding=1, bias=False, weight_quantizer=build_quantizer("bnn", 1, "weight"),
                    input_quantizer=build_quantizer("bnn", 1, "activation")).eval()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        y = layer(torch.ones(1, 1, 1, 1))  # one +1 pixel, eight -1 padding pixels: 1 - 8 = -7
    assert float(y) == -7.0


def test_kbit_by_hand():
    """LSQ 2-bit weight (codes -2..1 times s_w) and 2-bit unsigned activations."""
    layer = QLinear(2, 1, bias=True, weight_quantizer=build_quantizer("lsq", 2, "weight"),
                    input_quantizer=build_quantizer("lsq", 2, "activation")).eval()
    with torch.no_grad():
        layer.weight_quantizer.step.fill_(0.5)
        layer.input_quantizer.step.fill_(0.25)
        layer.weight.copy_(torch.tensor([[0.5, -1.0]]))  # codes +1, -2 (times 0.5)
        layer.bias.fill_(0.125)
        x = torch.tensor([[0.5, 0.25]])  # codes 2, 1 (times 0.25)
        y = layer(x)
    # (2 * 1 + 1 * -2) * 0.5 * 0.25 + 0.125 = 0.125
    assert torch.equal(y, torch.tensor([[0.125]]))
    plan = integer_plan(layer)
    assert plan.kind == "kbit" and not plan.has_sum  # LSQ's grid is symmetric: no sum column


def test_constants_by_hand():
    alpha, bias = binary_constants(torch.tensor([2.0]), torch.tensor([1.0]), (torch.tensor([0.5]), torch.tensor([3.0])))
    assert alpha.tolist() == [1.0] and bias.tolist() == [3.5]  # 2 * 0.5; 1 * 0.5 + 3
    # LIQ-like grid w = 0.5 c - 1 (2 bits: c - 2 in -2..1): w_scale 0.5, w_shift -1 + 0.5 * 2 = 0
    ws, wsh, b, has_sum = int8_constants(torch.tensor(0.5), torch.tensor(-1.0), 2, 1, None, None)
    assert ws.tolist() == [0.5] and wsh.tolist() == [0.0] and b.tolist() == [0.0] and not has_sum
    ws, wsh, b, has_sum = int8_constants(torch.tensor(0.5), torch.tensor(0.0), 2, 1, torch.tensor([1.0]),
                                         (torch.tensor([2.0]), torch.tensor([-1.0])))
    assert ws.tolist() == [1.0] and wsh.tolist() == [2.0] and b.tolist() == [1.0] and has_sum
    # y = A * w_scale * s_x + S * w_shift * s_x + b: A = 3, S = 4, s_x = 0.5
    y = int8_epilogue(torch.tensor([[3.0, 4.0]]), ws, wsh, b, torch.tensor(0.5), True)
    assert y.tolist() == [[1.0 * 3 * 0.5 + 2.0 * 4 * 0.5 + 1.0]]


def test_fold_norm_reads_the_norms_forward():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    conv = Conv2d(3, 3, 1, norm=bn)
    a, b = fold_norm(conv)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(bn(x)[:, :, 0, 0] * 0 + b.view(1, 3), bn(torch.zeros_like(x))[:, :, 0, 0])
    torch.testing.assert_close(x * a.view(1, 3, 1, 1) + b.view(1, 3, 1, 1), bn(x))
    bn.train()
    assert fold_norm(conv) is None  # training mode: batch statistics, nothing to fold


@pytest.mark.parametrize("spec", [("liq", 4, "liq", 4), ("liq", 2, "liq", 2), ("lsq", 3, "lsq", 3),
                                  ("dorefa", 2, "dorefa", 2), ("twn", 2, "liq", 4), ("bnn", 1, "bnn", 1),
                                  ("xnor", 1, "bireal", 1)])
def test_equals_fake_quant_to_float32_rounding_with_bn(spec):
    wm, wb, am, ab = spec
    torch.manual_seed(0)
    conv = Conv2d(16, 8, 3, padding=1, stride=2, bias=True, norm=nn.BatchNorm2d(8), activation=nn.ReLU())
    q = QConv2d.from_float(conv, build_quantizer(wm, wb, "weight"), build_quantizer(am, ab, "activation"))
    x = torch.randn(2, 16, 9, 11)
    q.train()
    q(x)  # data initialisation, BN statistics
    q.eval()
    with torch.no_grad():
        y = q(x)
        assert q.__dict__["_integer_plan"][1] is not None
        q.input_quantizer.set_integer_eval("off")
        ref = q(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_training_autograd_tracing_and_autocast_use_the_fake_quant_path():
    layer = _binary_layer()
    x = torch.randn(1, 2, 3, 3)
    calls = []
    orig = integer_plan

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    import aqd_d2.layers.integer_eval as ie

    ie_plan = ie.integer_plan
    ie.integer_plan = spy
    try:
        layer.train()
        layer(x).sum().backward()  # training: fake quant, gradients flow
        assert layer.weight.grad is not None and not calls
        layer.eval()
        y = layer(x)  # eval with autograd: fake quant, differentiable
        assert y.requires_grad and not calls
        with torch.no_grad():
            assert integer_forward(layer, x) is not None and calls
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert integer_forward(layer, x) is None
            calls.clear()
            layer.__dict__.pop("_integer_plan", None)
            torch.jit.trace(layer, x, check_trace=False)  # fvcore's FLOP count traces the fake-quant graph
            assert not calls
    finally:
        ie.integer_plan = ie_plan


def test_off_and_cuda_auto():
    layer = _binary_layer()
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        assert integer_forward(layer, x) is not None
        layer.input_quantizer.set_integer_eval("off")
        assert integer_forward(layer, x) is None
    with pytest.raises(ValueError, match="integer_eval"):
        layer.input_quantizer.set_integer_eval("maybe")


def test_float64_accumulation_where_float32_is_not_exact():
    """8-bit x 8-bit over 3x3x256 taps: sums up to 2304 * 255 * 128 > 2**24, so the integer form
    accumulates in float64 (rounded once to float32, as the int32 accumulator is)."""
    layer = QConv2d(256, 4, 3, padding=1, bias=False, weight_quantizer=build_quantizer("lsq", 8, "weight"),
                    input_quantizer=build_quantizer("lsq", 8, "activation"))
    x = torch.rand(1, 256, 4, 4) * 4
    layer.train()
    layer(x)
    layer.eval()
    plan = integer_plan(layer)
    assert plan.dtype == torch.float64
    small = QConv2d(16, 4, 3, padding=1, weight_quantizer=build_quantizer("lsq", 4, "weight"),
                    input_quantizer=build_quantizer("lsq", 4, "activation")).eval()
    assert integer_plan(small).dtype == torch.float32
    with torch.no_grad():
        y = layer(x)
        codes, sx, _ = layer.input_quantizer.encode(x)
        wc, sw, _ = layer.weight_quantizer.encode(layer.weight)
        exact = torch.nn.functional.conv2d(codes.double(), wc.double() - 128, padding=1)
        ref = (exact.float() * (sw.reshape(-1).float() * sx)[None, :, None, None])
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=0)


def test_config_key_reaches_every_quantizer():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import aqd_d2
    from aqd_d2.config.checks import ConfigError
    from tests.conftest import REPO

    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.QUANT.INTEGER_EVAL", "off",
                         "MODEL.FPN.OUT_CHANNELS", "32"])
    model = build_model(cfg)
    quantizers = [m for m in model.modules() if hasattr(m, "integer_eval") and isinstance(m, nn.Module)
                  and hasattr(m, "bits")]
    assert quantizers and all(q.integer_eval == "off" for q in quantizers)
    cfg.defrost()
    cfg.MODEL.QUANT.INTEGER_EVAL = "sometimes"
    with pytest.raises(ConfigError, match="MODEL.QUANT.INTEGER_EVAL"):
        build_model(cfg)
