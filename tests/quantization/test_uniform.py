"""LSQ, DoReFa, TWN and fp: hand values and gradients."""
import math

import numpy as np
import pytest
import torch

from aqd_d2.quantization import build_quantizer, round_ste


def _jacobian_wrt(param, fn, x):
    rows = []
    for i in range(x.numel()):
        param.grad = None
        fn(x).reshape(-1)[i].backward()
        rows.append(param.grad.item())
    return rows


def _lsq(bits, role, step):
    q = build_quantizer("lsq", bits, role)
    q.step.data.fill_(step)
    q.initialized.fill_(True)
    return q


def test_lsq_weight_values_and_scaled_step_gradient():
    q = _lsq(2, "weight", 0.5)  # Qn = 2, Qp = 1
    x = torch.tensor([-2.0, -0.6, -0.2, 0.1, 0.3, 0.8], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]
    g = 1 / math.sqrt(6 * 1)  # 1/sqrt(N Qp)
    expect = [g * v for v in (-2.0, 0.2, 0.4, -0.2, 0.4, 1.0)]
    np.testing.assert_allclose(_jacobian_wrt(q.step, q, x.detach()), expect, atol=1e-6)
    np.testing.assert_allclose(
        expect, [-0.816497, 0.0816497, 0.163299, -0.0816497, 0.163299, 0.408248], atol=1e-6
    )


def test_lsq_activation_values_and_per_sample_grad_scale():
    q = _lsq(2, "activation", 0.5)  # Qn = 0, Qp = 3
    x = torch.tensor([[-0.3, 0.2, 0.7], [1.0, 1.4, 2.0]])
    assert q(x).tolist() == [[0.0, 0.0, 0.5], [1.0, 1.5, 1.5]]
    # N = 3 features per sample, g = 1/sqrt(3*3) = 1/3
    expect = [0.0, -0.4 / 3, -0.4 / 3, 0.0, 0.2 / 3, 1.0]
    np.testing.assert_allclose(_jacobian_wrt(q.step, q, x), expect, atol=1e-6)


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_match_numpy(role, bits):
    rng = np.random.RandomState(bits)
    v = rng.uniform(-3, 3, (4, 50))
    gy = rng.randn(4, 50)
    s = 0.37
    q = _lsq(bits, role, s).double()
    q.step.data.fill_(s)
    x = torch.tensor(v, requires_grad=True)
    q(x).backward(torch.tensor(gy))
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if role == "weight" else (0, 2**bits - 1)
    t = v / s
    inside = (t > -qn) & (t < qp)
    d = np.where(inside, np.round(t) - t, np.where(t <= -qn, -qn, qp))
    n = v.size if role == "weight" else v.size // v.shape[0]
    np.testing.assert_allclose(x.grad.numpy(), gy * inside, atol=1e-12)
    assert q.step.grad.item() == pytest.approx((gy * d).sum() / math.sqrt(n * qp), rel=1e-9)


def test_lsq_init_rule():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = build_quantizer("lsq", 3, "weight")
    q.train()
    q(w)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(3), rel=1e-5)
    assert bool(q.initialized)


def test_dorefa_weight_values_and_gradient_vs_autograd():
    q = build_quantizer("dorefa", 2, "weight")
    w = torch.tensor([-1.0, -0.2, 0.05, 0.3, 2.0])
    # tanh/(2 max|tanh|) + 1/2 = [0.105, 0.398, 0.526, 0.651, 1.0]; x3 round = [0, 1, 2, 2, 3]
    torch.testing.assert_close(q(w), torch.tensor([-1.0, -1 / 3, 1 / 3, 1 / 3, 1.0]))
    torch.manual_seed(0)
    for bits in (2, 5):
        q = build_quantizer("dorefa", bits, "weight").double()
        w1 = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        gy = torch.randn_like(w1)
        q(w1).backward(gy)
        w2 = w1.detach().clone().requires_grad_()
        t = torch.tanh(w2)
        r = t / (2 * t.abs().max()) + 0.5
        k = 2**bits - 1
        (2 * round_ste(r * k) / k - 1).backward(gy)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_dorefa_activation_values():
    q = build_quantizer("dorefa", 2, "activation")
    x = torch.tensor([-0.5, 0.1, 0.3, 0.55, 0.9, 1.7], requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_twn_values_levels_and_ste():
    q = build_quantizer("twn", 2, "weight")
    assert q.bits == 2 and q.num_levels == 3
    w = torch.tensor([-0.9, -0.2, 0.05, 0.3, 0.6, -0.04], requires_grad=True)
    # Delta = 0.7 * 0.348333 = 0.243833; alpha = mean(0.9, 0.3, 0.6) = 0.6
    y = q(w)
    torch.testing.assert_close(y, torch.tensor([-0.6, 0.0, 0.0, 0.6, 0.6, 0.0]))
    y.backward(torch.arange(6.0))
    assert w.grad.tolist() == [0, 1, 2, 3, 4, 5]
    torch.manual_seed(0)
    assert q(torch.randn(1000)).unique().numel() == 3


def test_fp_is_identity():
    q = build_quantizer("fp", 32, "activation")
    x = torch.randn(3, 4)
    assert q(x) is x
    with pytest.raises(NotImplementedError):
        q.encode(x)
