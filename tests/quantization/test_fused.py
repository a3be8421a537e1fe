"""quant_conv2d / quant_linear equal the unfused composition and save less for backward."""
import pytest
import torch
import torch.nn.functional as F

from aqd_d2.quantization import build_quantizer, quant_conv2d, quant_linear

PAIRS = [
    ("liq", 4, "liq", 4),
    ("lsq", 3, "lsq", 3),
    ("dorefa", 2, "dorefa", 2),
    ("bnn", 1, "bnn", 1),
    ("xnor", 1, "xnor", 1),
    ("bireal", 1, "bireal", 1),
    (None, None, "bwn", 1),
    ("liq", 2, None, None),
    ("lsq", 4, "twn", 2),
]


def _make(am, ab, wm, wb):
    qa = build_quantizer(am, ab, "activation") if am else None
    qw = build_quantizer(wm, wb, "weight") if wm else None
    return qa, qw


def _unfused_conv(x, w, b, qa, qw, stride, pad4, dilation):
    xq = qa(x) if qa is not None else x
    pv = qa.padding_value if qa is not None else 0.0
    xq = F.pad(xq, pad4, value=pv)
    return F.conv2d(xq, qw(w) if qw is not None else w, b, stride, 0, dilation)


def _grads(out, gy, tensors):
    return torch.autograd.grad(out, tensors, gy, allow_unused=True)


@pytest.mark.parametrize("am,ab,wm,wb", PAIRS)
@pytest.mark.parametrize("geom", [(1, 1, 1), (2, (1, 0, 2, 1), 1), (1, 2, 2)])
def test_quant_conv2d_matches_unfused(am, ab, wm, wb, geom):
    stride, padding, dilation = geom
    pad4 = (padding,) * 4 if isinstance(padding, int) else padding
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8).double().requires_grad_()
    w = (torch.randn(6, 4, 3, 3) * 0.3).double().requires_grad_()
    b = torch.randn(6).double().requires_grad_()
    qa, qw = _make(am, ab, wm, wb)
    for q in (qa, qw):
        if q is not None:
            q.double().train()
    y1 = quant_conv2d(x, w, b, stride, padding, dilation, 1, qa, qw)  # initialises
    y2 = _unfused_conv(x, w, b, qa, qw, stride, pad4, dilation)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    params = [p for q in (qa, qw) if q is not None for p in q.parameters()]
    gy = torch.randn_like(y1)
    g1 = _grads(y1, gy, [x, w, b, *params])
    g2 = _grads(y2, gy, [x, w, b, *params])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_quant_conv2d_disabled_is_float_conv():
    qa, qw = _make("bnn", 1, "liq", 4)
    qa.set_enabled(False)
    qw.set_enabled(False)
    x, w = torch.randn(1, 3, 6, 6), torch.randn(5, 3, 3, 3)
    y = quant_conv2d(x, w, None, 1, 1, 1, 1, qa, qw)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1))


@pytest.mark.parametrize("am,ab,wm,wb", PAIRS)
def test_quant_linear_matches_unfused(am, ab, wm, wb):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 8).double().requires_grad_()
    w = (torch.randn(7, 8) * 0.3).double().requires_grad_()
    b = torch.randn(7).double().requires_grad_()
    qa, qw = _make(am, ab, wm, wb)
    for q in (qa, qw):
        if q is not None:
            q.double().train()
    y1 = quant_linear(x, w, b, qa, qw)
    y2 = F.linear(qa(x) if qa else x, qw(w) if qw else w, b)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    params = [p for q in (qa, qw) if q is not None for p in q.parameters()]
    gy = torch.randn_like(y1)
    for a, c in zip(_grads(y1, gy, [x, w, b, *params]), _grads(y2, gy, [x, w, b, *params])):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_fused_conv_saves_no_more_than_float_conv():
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    qa, qw = _make("liq", 4, "liq", 4)
    quant_conv2d(x, w, None, 1, 1, 1, 1, qa, qw)  # initialise
    flt = _saved_bytes(lambda: F.conv2d(x, w, None, 1, 1))
    fused = _saved_bytes(lambda: quant_conv2d(x, w, None, 1, 1, 1, 1, qa, qw))
    unfused = _saved_bytes(lambda: F.conv2d(qa(x), qw(w), None, 1, 1))
    assert fused <= flt + 64
    assert unfused > 1.9 * flt


def test_quant_conv2d_under_autocast_matches_unfused():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 8, 8).requires_grad_()
    w = (torch.randn(6, 4, 3, 3) * 0.3).requires_grad_()
    qa, qw = _make("liq", 4, "liq", 4)
    quant_conv2d(x, w, None, 1, 1, 1, 1, qa, qw)  # initialise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = quant_conv2d(x, w, None, 1, 1, 1, 1, qa, qw)
        y2 = F.conv2d(qa(x), qw(w), None, 1, 1)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2)
    gy = torch.randn_like(y1)
    params = [x, w, qa.alpha, qw.alpha]
    for a, c in zip(_grads(y1, gy, params), _grads(y2, gy, params)):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=1e-2, atol=1e-2)
