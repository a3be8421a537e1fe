"""QConv2d: float equivalence, quantized math, -1 padding for binary inputs, XNOR scale."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aqd_d2  # noqa: F401  (compat before detectron2)
from detectron2.layers import Conv2d

from aqd_d2.layers import QConv2d
from aqd_d2.quantization import Quantizer
from tests.quant_helpers import ExactSTE


# ---- test-only quantizers (not registered: the layer takes instances) ------------------------


class UniformMaxAbs(Quantizer):
    """k-bit symmetric uniform grid on [-max|x|, max|x|] (weights) or [0, max x] (inputs)."""

    method = "t_uniform"

    def encode(self, x):
        x = x.detach()
        if self.role == "weight":
            hi = x.abs().max().clamp_min(1e-8)
            step, offset = 2 * hi / (2 ** self.bits - 1), -hi
        else:
            hi = x.max().clamp_min(1e-8)
            step, offset = hi / (2 ** self.bits - 1), torch.zeros(())
        codes = torch.round((x - offset) / step).clamp(0, 2 ** self.bits - 1)
        return codes.to(torch.uint8), step, offset

    def quantize(self, x):
        return ExactSTE.apply(x, self.decode(*self.encode(x)))


class Sign(Quantizer):
    """sign(x) in {-1, +1} (sign(0) = +1); pads with -1 like binary activation methods."""

    method = "t_sign"

    def __init__(self, bits=1, role="activation", scale_activations=False):
        super().__init__(bits, role)
        self.scale_activations = scale_activations

    @property
    def padding_value(self):
        return -1.0

    def encode(self, x):
        codes = (x.detach() >= 0).to(torch.uint8)
        return codes, torch.tensor(2.0), torch.tensor(-1.0)

    def quantize(self, x):
        return ExactSTE.apply(x, self.decode(*self.encode(x)))


# ---- tests -------------------------------------------------------------------------------------
def test_float_layer_equivalence_and_shared_params():
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, padding=1, bias=False, norm=nn.BatchNorm2d(4), activation=F.relu)
    conv.eval()
    q = QConv2d.from_float(conv, None, None)
    assert q.weight is conv.weight and q.norm is conv.norm and q.activation is conv.activation
    assert not q.training
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(q(x), conv(x))


def test_float_state_dict_loads_with_only_quantizer_keys_missing():
    conv = Conv2d(3, 4, 3, padding=1, norm=nn.BatchNorm2d(4))
    q = QConv2d(3, 4, 3, padding=1, norm=nn.BatchNorm2d(4),
                weight_quantizer=UniformMaxAbs(4, "weight"), input_quantizer=UniformMaxAbs(4, "activation"))
    res = q.load_state_dict(conv.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all("_quantizer." in k for k in res.missing_keys)
    assert torch.equal(q.weight, conv.weight) and torch.equal(q.norm.running_var, conv.norm.running_var)


def test_quantized_forward_matches_reference():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    wq, aq = UniformMaxAbs(3, "weight"), UniformMaxAbs(3, "activation")
    q = QConv2d.from_float(conv, wq, aq)
    x = torch.randn(2, 3, 9, 9)
    ref = F.conv2d(aq(x), wq(conv.weight), conv.bias, 2, 1)
    assert torch.equal(q(x), ref)
    # at most 2**3 distinct weight values are used
    assert q.quantized_weight().unique().numel() <= 8


def test_gradients_reach_weight_and_input():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    q = QConv2d.from_float(conv, UniformMaxAbs(2, "weight"), UniformMaxAbs(2, "activation"))
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    q(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_binary_input_is_padded_with_minus_one():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    q = QConv2d.from_float(conv, None, Sign())
    x = torch.ones(1, 1, 4, 4)
    out = q(x)
    # corner: 4 in-image ones and 5 padded -1 -> -1 (zero padding would give 4)
    assert out[0, 0, 0, 0].item() == -1.0
    assert out[0, 0, 0, 1].item() == 3.0  # edge: 6 ones, 3 padded -1 (zero padding: 6)
    assert out[0, 0, 1, 1].item() == 9.0  # interior is unaffected
    ref = F.conv2d(F.pad(torch.ones_like(x), (1, 1, 1, 1), value=-1.0), conv.weight)
    assert torch.equal(out, ref)


def test_disabled_input_quantizer_pads_with_zero_like_float_conv():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    q = QConv2d.from_float(conv, None, Sign())
    q.input_quantizer.set_enabled(False)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(q(x), conv(x))


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=2, dilation=2, groups=1),
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=1, padding=(1, 2), dilation=(1, 2), groups=4),
    ],
)
def test_groups_dilation_stride_with_binary_padding(kw):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, bias=True, **kw)
    wq, aq = UniformMaxAbs(2, "weight"), Sign()
    q = QConv2d.from_float(conv, wq, aq)
    x = torch.randn(2, 4, 11, 10)
    ph, pw = conv.padding
    ref = F.conv2d(F.pad(aq(x), (pw, pw, ph, ph), value=-1.0), wq(conv.weight), conv.bias,
                   conv.stride, 0, conv.dilation, conv.groups)
    assert torch.equal(q(x), ref)
    assert q(x).shape == conv(x).shape


def test_same_padding_string_and_reflect_mode():
    torch.manual_seed(4)
    same = nn.Conv2d(2, 2, 4, padding="same", dilation=1, bias=False)
    q = QConv2d.from_float(same, None, Sign())
    x = torch.randn(1, 2, 6, 6)
    # torch puts the extra pixel of an even kernel on the right/bottom
    ref = F.conv2d(F.pad(Sign()(x), (1, 2, 1, 2), value=-1.0), same.weight)
    assert torch.equal(q(x), ref)
    refl = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    assert torch.allclose(QConv2d.from_float(refl, None, None)(x), refl(x), atol=1e-6)


def test_xnor_activation_scale():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    aq = Sign(scale_activations=True)
    q = QConv2d.from_float(conv, None, aq)
    x = torch.randn(2, 3, 8, 8)
    # reference K: mean over channels of |x|, zero padded, averaged over each 3x3 window
    a = F.pad(x.abs().mean(1, keepdim=True), (1, 1, 1, 1))
    k = F.unfold(a, 3, stride=2).mean(1).view(2, 1, 4, 4)
    binary = F.conv2d(F.pad(aq(x), (1, 1, 1, 1), value=-1.0), conv.weight, None, 2)
    ref = binary * k + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(q(x), ref, atol=1e-5)


def test_empty_input_and_repr_and_errors():
    q = QConv2d(2, 3, 3, padding=1, weight_quantizer=UniformMaxAbs(4, "weight"),
                input_quantizer=UniformMaxAbs(4, "activation"))
    assert q(torch.zeros(0, 2, 5, 5)).shape == (0, 3, 5, 5)
    r = repr(q)
    assert "w=t_uniform/4b" in r and "a=t_uniform/4b" in r
    assert "w=float, a=float" in QConv2d(2, 3, 1).extra_repr()
    with pytest.raises(ValueError, match="role"):
        QConv2d(2, 3, 1, weight_quantizer=UniformMaxAbs(4, "activation"))
    with pytest.raises(TypeError):
        QConv2d.from_float(nn.Linear(2, 3), None, None)


# ---- with aqd_d2's own methods (fused path) ----------------------------------------------------
def _real(method, bits, role, **kw):
    from aqd_d2.quantization import available_quantizers, build_quantizer

    if method not in available_quantizers():
        pytest.skip(f"method {method!r} not registered")
    return build_quantizer(method, bits, role, **kw)


@pytest.mark.parametrize(
    "wm, wb, am, ab, kw",
    [
        ("liq", 4, "liq", 4, dict(stride=2, padding=1, groups=1)),
        ("dorefa", 2, "dorefa", 3, dict(stride=1, padding=2, dilation=2, groups=2)),
        ("bwn", 1, "bnn", 1, dict(stride=1, padding=1, groups=1)),
        ("xnor", 1, "bireal", 1, dict(stride=2, padding=(1, 2), groups=4)),
    ],
)
def test_real_methods_match_plain_composition(wm, wb, am, ab, kw):
    torch.manual_seed(6)
    wq, aq = _real(wm, wb, "weight"), _real(am, ab, "activation")
    conv = nn.Conv2d(4, 8, 3, **kw)
    q = QConv2d.from_float(conv, wq, aq).eval()
    x = torch.randn(2, 4, 10, 9, requires_grad=True)
    out = q(x)
    ph, pw = conv.padding
    pad_value = aq.padding_value
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(F.pad(aq(x2), (pw, pw, ph, ph), value=pad_value), wq(conv.weight), conv.bias,
                   conv.stride, 0, conv.dilation, conv.groups)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert pad_value == (-1.0 if ab == 1 else 0.0)
    out.sum().backward()
    gw = conv.weight.grad.clone()
    conv.weight.grad = None
    ref.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(gw, conv.weight.grad, atol=1e-4)


def test_real_xnor_activation_scale():
    aq = _real("xnor", 1, "activation", scale_activations=True)
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    q = QConv2d.from_float(conv, _real("xnor", 1, "weight"), aq).eval()
    x = torch.randn(1, 3, 6, 6)
    k = F.unfold(F.pad(x.abs().mean(1, keepdim=True), (1, 1, 1, 1)), 3).mean(1).view(1, 1, 6, 6)
    binary = F.conv2d(F.pad(aq(x), (1, 1, 1, 1), value=-1.0), q.weight_quantizer(conv.weight))
    assert torch.allclose(q(x), binary * k + conv.bias.view(1, -1, 1, 1), atol=1e-5)
