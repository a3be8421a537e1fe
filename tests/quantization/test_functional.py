"""STE primitives and the single-node fake-quantize Function."""
import numpy as np
import torch

from aqd_d2.quantization import approx_sign, binary_sign, build_quantizer, round_ste, sign_ste
from aqd_d2.quantization.functional import approx_sign_derivative


def test_binary_sign_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_round_ste_identity_gradient():
    x = torch.tensor([-1.6, -0.4, 0.5, 1.5, 2.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 2.0, 2.0]  # half to even
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_sign_ste_clipped_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_approx_sign_gradient_hand_values():
    x = torch.tensor([-1.5, -0.75, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0], requires_grad=True)
    y = approx_sign(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.5, 1.0, 2.0, 1.5, 1.0, 0.0, 0.0]


def test_approx_sign_gradient_numpy():
    x = np.random.RandomState(0).uniform(-2, 2, 1000)
    ref = np.where((x >= -1) & (x < 0), 2 + 2 * x, np.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0))
    got = approx_sign_derivative(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def _saved(fn, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def test_fake_quantize_saves_only_input_and_alpha():
    q = build_quantizer("liq", 4, "activation")
    q.train()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    q(x)  # initialise first
    saved = _saved(q, x)
    assert len(saved) == 2
    assert saved[0].data_ptr() == x.data_ptr()
    assert saved[1].data_ptr() == q.alpha.data_ptr()
    for method, bits in (("lsq", 4), ("bnn", 1), ("bireal", 1)):
        q = build_quantizer(method, bits, "activation")
        q(x)
        ptrs = {t.data_ptr() for t in _saved(q, x)}
        assert x.data_ptr() in ptrs and len(ptrs) <= 2, method
