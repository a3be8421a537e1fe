"""Quantized convs under autocast (bf16 on CPU) and with channels_last inputs.

The rounding grid is computed in float32 (half-precision activations are widened), only the
quantized operands go to the autocast dtype, exactly as ``conv(Q(x.float()).to(bf16),
Q(W).to(bf16))``; gradients come back in each input's dtype. channels_last inputs keep
channels_last outputs, also through the explicit -1 padding of binary activations.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqd_d2.layers import QConv2d
from aqd_d2.quantization import build_quantizer

from .test_no_host_sync import SPECS


def _layer(spec):
    (wm, wb, wkw), a = spec
    torch.manual_seed(0)
    layer = QConv2d(6, 5, 3, padding=1, bias=True,
                    weight_quantizer=build_quantizer(wm, wb, "weight", **wkw),
                    input_quantizer=None if a is None else build_quantizer(a[0], a[1], "activation"))
    x = torch.randn(2, 6, 7, 9)
    layer.train()
    layer(x)  # initialise the learned ranges in float32
    return layer, x


def _name(spec):
    return f"{spec[0][0]}{spec[0][1]}-{'float' if spec[1] is None else spec[1][0]}"


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_bf16_autocast_quantizes_in_float32(spec):
    layer, x = _layer(spec)
    xb = x.to(torch.bfloat16).requires_grad_(True)  # an AMP activation
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xb)
    assert y.dtype == torch.bfloat16
    # reference: float32 grid, then the autocast dtype, explicit padding value
    with torch.no_grad():
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        xq = xb.float() if aq is None else aq(xb.float())
        pad = 0.0 if aq is None else aq.padding_value
        xq = F.pad(xq.to(torch.bfloat16), (1, 1, 1, 1), value=pad)
        ref = F.conv2d(xq, wq(layer.weight).to(torch.bfloat16), layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    params = [xb, layer.weight] + [p for _, q in layer.quantizers() for p in q.quant_params()]
    grads = torch.autograd.grad(y.float().square().sum(), params)
    assert grads[0].dtype == torch.bfloat16
    for p, g in zip(params, grads):
        assert g.dtype == p.dtype and g.shape == p.shape and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_channels_last_is_kept(spec):
    layer, x = _layer(spec)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.square().sum(), xc)[0]
    assert g.shape == xc.shape and torch.isfinite(g).all()
