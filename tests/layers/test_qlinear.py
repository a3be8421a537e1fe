"""QLinear: float equivalence, quantized math, XNOR scale, checkpoint compatibility."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aqd_d2  # noqa: F401

from aqd_d2.layers import QLinear
from aqd_d2.quantization import Quantizer
from tests.quant_helpers import ExactSTE


class UniformMaxAbs(Quantizer):
    """k-bit symmetric uniform grid on [-max|x|, max|x|] (test-only)."""

    method = "t_uniform"

    def encode(self, x):
        hi = x.detach().abs().max().clamp_min(1e-8)
        step = 2 * hi / (2 ** self.bits - 1)
        codes = torch.round((x.detach() + hi) / step).clamp(0, 2 ** self.bits - 1)
        return codes.to(torch.uint8), step, -hi

    def quantize(self, x):
        return ExactSTE.apply(x, self.decode(*self.encode(x)))


class Sign(Quantizer):
    method = "t_sign"

    def __init__(self, bits=1, role="activation", scale_activations=False):
        super().__init__(bits, role)
        self.scale_activations = scale_activations

    def quantize(self, x):
        return ExactSTE.apply(x, torch.where(x >= 0, 1.0, -1.0))


def test_float_equivalence_and_shared_params():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    q = QLinear.from_float(lin, None, None)
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(3, 6)
    assert torch.equal(q(x), lin(x))


def test_quantized_forward_and_grad():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4, bias=False)
    wq, aq = UniformMaxAbs(2, "weight"), UniformMaxAbs(3, "activation")
    q = QLinear.from_float(lin, wq, aq)
    x = torch.randn(5, 6, requires_grad=True)
    out = q(x)
    assert torch.equal(out, F.linear(aq(x), wq(lin.weight)))
    out.sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_xnor_scale_per_row():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4)
    q = QLinear.from_float(lin, None, Sign(scale_activations=True))
    x = torch.randn(3, 6)
    ref = F.linear(torch.where(x >= 0, 1.0, -1.0), lin.weight) * x.abs().mean(1, keepdim=True) + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-6)


def test_state_dict_norm_activation_repr_empty():
    lin = nn.Linear(6, 4)
    q = QLinear(6, 4, norm=nn.BatchNorm1d(4), activation=F.relu,
                weight_quantizer=UniformMaxAbs(4, "weight"))
    res = q.load_state_dict(lin.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert all(k.startswith(("norm.", "weight_quantizer.")) for k in res.missing_keys)
    q.eval()
    assert (q(torch.randn(2, 6)) >= 0).all()
    assert q(torch.zeros(0, 6)).shape == (0, 4)
    assert "w=t_uniform/4b, a=float" in repr(q)
    with pytest.raises(TypeError):
        QLinear.from_float(nn.Conv2d(1, 1, 1), None, None)


def test_real_methods_fused_linear():
    from aqd_d2.quantization import available_quantizers, build_quantizer

    if "liq" not in available_quantizers():
        pytest.skip("liq not registered")
    torch.manual_seed(3)
    lin = nn.Linear(8, 5)
    wq, aq = build_quantizer("liq", 3, "weight"), build_quantizer("liq", 3, "activation")
    q = QLinear.from_float(lin, wq, aq).eval()
    x = torch.randn(4, 8)
    assert torch.allclose(q(x), F.linear(aq(x), wq(lin.weight), lin.bias), atol=1e-6)
