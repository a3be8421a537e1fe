"""bnn, xnor, bwn, bireal: values, gradients, padding, XNOR scale."""
import pytest
import torch

from aqd_d2.quantization import build_quantizer, xnor_activation_scale

W = torch.tensor([[0.2, -0.4, 0.6], [-1.5, 0.5, -0.1]]).reshape(2, 1, 1, 3)


def test_bnn_sign_and_clipped_ste():
    for role in ("weight", "activation"):
        q = build_quantizer("bnn", 1, role)
        x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
        y = q(x)
        assert y.tolist() == [-1, -1, 1, 1, 1, 1]
        y.sum().backward()
        assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]
    assert build_quantizer("bnn", 1, "activation").padding_value == -1.0
    assert build_quantizer("bnn", 1, "weight").padding_value == 0.0


@pytest.mark.parametrize("method", ["xnor", "bwn"])
def test_scaled_sign_weights_and_paper_gradient(method):
    q = build_quantizer(method, 1, "weight")
    w = W.clone().requires_grad_()
    y = q(w)
    torch.testing.assert_close(y.flatten(), torch.tensor([0.4, -0.4, 0.4, -0.7, 0.7, -0.7]))
    y.sum().backward()
    # paper 004 / XNOR-Net: g * (1/n + alpha 1{|W| <= 1}), n = 3
    expect = [1 / 3 + 0.4] * 3 + [1 / 3, 1 / 3 + 0.7, 1 / 3 + 0.7]
    torch.testing.assert_close(w.grad.flatten(), torch.tensor(expect))


def test_bireal_weights_magnitude_aware_and_activation_approxsign():
    q = build_quantizer("bireal", 1, "weight")
    w = W.clone().requires_grad_()
    y = q(w)
    torch.testing.assert_close(y.flatten(), torch.tensor([0.4, -0.4, 0.4, -0.7, 0.7, -0.7]))
    y.sum().backward()
    torch.testing.assert_close(w.grad.flatten(), torch.tensor([0.4, 0.4, 0.4, 0.0, 0.7, 0.7]))
    qa = build_quantizer("bireal", 1, "activation")
    assert qa.padding_value == -1.0
    x = torch.tensor([-1.5, -0.75, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0], requires_grad=True)
    ya = qa(x)
    assert ya.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    ya.sum().backward()
    assert x.grad.tolist() == [0.0, 0.5, 1.0, 2.0, 1.5, 1.0, 0.0, 0.0]


def test_xnor_activation_sign_padding_and_scale_flag():
    q = build_quantizer("xnor", 1, "activation", scale_activations=True)
    assert q.padding_value == -1.0 and q.scale_activations
    assert not build_quantizer("xnor", 1, "weight", scale_activations=True).scale_activations
    x = torch.tensor([-0.2, 0.0, 3.0])
    assert q(x).tolist() == [-1, 1, 1]


def test_xnor_activation_scale_box_filter():
    x = torch.stack([torch.ones(3, 3), -3 * torch.ones(3, 3)]).unsqueeze(0)  # A = 2
    k = xnor_activation_scale(x, 3, 1, 1, 1)
    assert k.shape == (1, 1, 3, 3)
    c, e = 2 * 4 / 9, 2 * 6 / 9
    torch.testing.assert_close(k[0, 0], torch.tensor([[c, e, c], [e, 2.0, e], [c, e, c]]))
    k4 = xnor_activation_scale(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))  # F.pad-style padding
    torch.testing.assert_close(k4, k)
    k2 = xnor_activation_scale(x, 3, 2, 1, 1)
    torch.testing.assert_close(k2[0, 0], torch.tensor([[c, c], [c, c]]))
    assert xnor_activation_scale(x, 3, 1, 0, 1).flatten().tolist() == [2.0]


@pytest.mark.parametrize("method", ["bnn", "xnor", "bwn", "bireal"])
def test_binary_outputs_strictly_two_valued(method):
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    w[0, 0, 0, 0] = 0.0
    y = build_quantizer(method, 1, "weight")(w)
    for c in range(4):
        assert y[c].unique().numel() == 2
        assert (y[c].abs() == y[c].abs().max()).all()
    assert y[0, 0, 0, 0] > 0  # sign(0) = +1
