"""The fused C++ int8 convolution (aqd_binary::int8_conv2d) behind Int8ConvInference: every
instruction-set variant gives the fake-quantized conv's result (int32-exact, float32 scaling)
and the PyTorch (torch._int_mm) path's float32 bits, on odd shapes, every weight / activation
quantizer kind, zero points, padding, stride, dilation, 1x1 and linear layers."""
import pytest
import torch

from aqd_d2.export.int8_gemm import (
    INT8_ISA_NAMES,
    Int8ConvInference,
    fused_encoding,
    int8_available_isas,
    int8_gemm_available,
    int8_kernel_backend,
)
from aqd_d2.quantization import build_quantizer

from .exact_reference import assert_within, exact_conv, fake_quant_exact, grid_values

pytestmark = pytest.mark.usefixtures("single_thread")

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in int8_available_isas(), reason=f"int8 kernel variant {isa} not available here"))
    for isa in INT8_ISA_NAMES]


def _addcmul_is_fma() -> bool:
    """torch.addcmul rounds once (FMA) on this CPU: then the torch._int_mm path and the C++
    kernel (FMA explicitly) agree bit for bit."""
    acc = torch.arange(1, 4097, dtype=torch.float32) * 977.0
    t, b = torch.full((4097 - 1,), 0.1234567), torch.full((4096,), 0.7654321)
    fma = (acc.double() * t.double() + b.double()).float()
    return torch.equal(torch.addcmul(b, acc, t), fma)


def _quantizers(wm, wb, am, ab, w, x, a_role="activation"):
    """Data-initialised weight / input quantizers in eval mode."""
    wq, aq = build_quantizer(wm, wb, "weight"), build_quantizer(am, ab, a_role)
    wq.train()(w)
    aq.train()(x)
    return wq.eval(), aq.eval()


def _module(conv_or_linear, wq, aq, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    codes, step, offset = wq.encode(conv_or_linear.weight)
    return Int8ConvInference(codes, step, offset, wq.bits, aq, conv_or_linear.bias, stride,
                             padding, dilation)


def _run(mod, x, monkeypatch, kernel, isa=""):
    monkeypatch.setenv("AQD_INT8_KERNEL", kernel)
    monkeypatch.setenv("AQD_INT8_ISA", isa)
    with torch.no_grad():
        return mod(x)


def _with_boundaries(x: torch.Tensor, step: float) -> torch.Tensor:
    """x with some values exactly on rounding ties (k + 1/2) * step and one ulp beside them."""
    flat = x.flatten().clone()
    ties = (torch.arange(-6, 40) + 0.5) * step
    vals = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    n = min(vals.numel(), flat.numel())
    flat[:n] = vals[:n]
    return flat.view_as(x)


CONV_CASES = [  # (C, O, k, stride, padding, dilation, H, W)
    (5, 7, 3, 2, 1, 1, 9, 11),
    (3, 17, 1, 1, 0, 1, 6, 5),
    (13, 33, 3, 1, 2, 2, 8, 8),
    (8, 16, 5, 2, 2, 1, 7, 7),
    (20, 65, 3, 1, 1, 1, 5, 13),
]
QUANT_CASES = [  # (w method, w bits, input method, input bits, input quantizer role)
    ("lsq", 4, "lsq", 4, "activation"),   # symmetric weight grid, fused LSQ encoding
    ("lsq", 2, "lsq", 2, "activation"),
    ("lsq", 8, "lsq", 3, "activation"),   # 8-bit weights: codes - 128 span all of int8
    ("liq", 3, "liq", 4, "activation"),   # asymmetric LIQ weight grid: the sum column
    ("dorefa", 4, "dorefa", 2, "activation"),
    ("bwn", 1, "liq", 2, "activation"),
    ("lsq", 3, "lsq", 4, "weight"),       # signed input grid: zero point 8, fused
    ("lsq", 4, "twn", 2, "weight"),       # ternary input: zero point 1, encoded by torch
]


@pytest.mark.skipif(not int8_gemm_available(), reason="torch._int_mm unavailable")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", QUANT_CASES, ids=lambda q: f"{q[0]}{q[1]}-{q[2]}{q[3]}{q[4][0]}")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_matches_fake_quant_and_torch_path(case, quant, isa, monkeypatch):
    c, o, k, s, p, d, h, w = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, o, k, stride=s, padding=p, dilation=d)
    x = torch.randn(2, c, h, w) * 1.5
    wq, aq = _quantizers(*quant[:4], conv.weight, x, quant[4])
    x = _with_boundaries(x, float(aq.encode(x)[1].reshape(-1)[0]))
    mod = _module(conv, wq, aq, (s, s), (p, p), (d, d))
    y = _run(mod, x, monkeypatch, "cpp", isa)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # the fake-quantized conv computed exactly: equal up to the kernel's float32 epilogue
    with torch.no_grad():
        xv, _ = grid_values(aq, x)
        wv, wbound = grid_values(wq, conv.weight)
        ref, mag = exact_conv(xv, wv, conv.bias, s, p, d, wmag=wbound)
    assert_within(y, ref, mag, 0, f"{case} {quant} {isa}")
    # the torch._int_mm path: the same int32 accumulators and the same float32 epilogue
    # (TWN's step depends on the summation order over x, so NCHW and channels_last memory
    # can give different steps: each memory format is compared with itself)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for xin, yin in ((x, y), (x_cl, _run(mod, x_cl, monkeypatch, "cpp", isa))):
        y_torch = _run(mod, xin, monkeypatch, "torch")
        if _addcmul_is_fma():
            assert torch.equal(yin, y_torch)
        else:
            assert torch.allclose(yin, y_torch, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    # the portable variant: the same bits
    if "generic" in int8_available_isas():
        assert torch.equal(_run(mod, x, monkeypatch, "cpp", "generic"), y)


@pytest.mark.parametrize("isa", ISAS)
def test_hand_computed_values(isa, monkeypatch):
    """1x1 conv, 2 input channels, 3-bit weights: input x = (1.5, 0.5) with LSQ step 0.5
    (codes 3, 1); weight codes (5, 2), step 0.25, grid offset -1 (symmetric: w = 0.25, -0.5)
    or -0.9 (asymmetric: w = 0.35, -0.4, the sum-column term 0.1 * (3 + 1)); bias 0.5.
      symmetric:  0.5 * 0.25 * (3 * 1 + 1 * (-2)) + 0.5          = 0.625
      asymmetric: 0.5 * (0.25 * 1 + 0.1 * 4) + 0.5 = 0.825       (= 1.5 * 0.35 - 0.5 * 0.4 + 0.5)
    """
    aq = build_quantizer("lsq", 3, "activation", step=0.5).eval()
    codes = torch.tensor([5, 2], dtype=torch.uint8).view(1, 2, 1, 1)
    x = torch.tensor([1.5, 0.5]).view(1, 2, 1, 1)
    for offset, expected, has_sum in ((-1.0, 0.625, False), (-0.9, 0.825, True)):
        mod = Int8ConvInference(codes, torch.tensor(0.25), torch.tensor(offset), 3, aq,
                                torch.tensor([0.5]))
        assert mod.has_sum_column == has_sum
        y = _run(mod, x, monkeypatch, "cpp", isa)
        assert y.shape == (1, 1, 1, 1)
        assert float(y) == pytest.approx(expected, abs=1e-6)


@pytest.mark.skipif(not int8_gemm_available(), reason="torch._int_mm unavailable")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", [("liq", 4, "liq", 4), ("lsq", 2, "dorefa", 3)], ids=str)
def test_linear_matches_fake_quant(quant, isa, monkeypatch):
    torch.manual_seed(1)
    lin = torch.nn.Linear(21, 11)
    x = torch.randn(3, 5, 21)
    wq, aq = _quantizers(*quant, lin.weight, x)
    mod = _module(lin, wq, aq)
    y = _run(mod, x, monkeypatch, "cpp", isa)
    with torch.no_grad():
        xv, _ = grid_values(aq, x)
        wv, wbound = grid_values(wq, lin.weight)
        ref, mag = exact_conv(xv, wv, lin.bias, wmag=wbound)
    assert y.shape == (3, 5, 11)
    assert_within(y, ref, mag, 0, f"{quant} {isa}")
    if _addcmul_is_fma():
        assert torch.equal(y, _run(mod, x, monkeypatch, "torch"))


@pytest.mark.parametrize("isa", ISAS)
def test_two_threads_same_bits(isa, monkeypatch):
    """The OpenMP split (pack rows, pixel chunks) does not change a bit."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(24, 40, 3, padding=1)
    x = torch.randn(2, 24, 15, 17)
    wq, aq = _quantizers("liq", 4, "lsq", 4, conv.weight, x)
    mod = _module(conv, wq, aq, padding=(1, 1))
    y1 = _run(mod, x, monkeypatch, "cpp", isa)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y2 = _run(mod, x, monkeypatch, "cpp", isa)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


def test_fused_encoding_covers_the_activation_quantizers():
    x = torch.rand(4)
    for method, bits, mode, zero in (("lsq", 4, 0.0, 0), ("liq", 3, 0.0, 0), ("dorefa", 2, 1.0, 0)):
        q = build_quantizer(method, bits, "activation").eval()
        enc, step, z = fused_encoding(q, x)
        assert enc[4] == mode and z == zero
        assert step == pytest.approx(float(q.encode(x)[1].reshape(-1)[0]))
    signed = build_quantizer("lsq", 4, "weight", step=0.5).eval()
    enc, step, z = fused_encoding(signed, x)
    assert (enc[1], enc[2], enc[3], step, z) == (-8.0, 7.0, 8.0, 0.5, 8)
    assert fused_encoding(build_quantizer("twn", 2, "weight").eval(), x) is None


def test_backend_environment(monkeypatch):
    monkeypatch.setenv("AQD_INT8_KERNEL", "torch")
    monkeypatch.delenv("AQD_INT8_ISA", raising=False)
    assert int8_kernel_backend() == ("torch", -1)
    monkeypatch.setenv("AQD_INT8_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"AQD_INT8_KERNEL.*auto, torch, cpp"):
        int8_kernel_backend()
    monkeypatch.setenv("AQD_INT8_KERNEL", "auto")
    monkeypatch.setenv("AQD_INT8_ISA", "sse9")
    with pytest.raises(ValueError, match=r"AQD_INT8_ISA.*generic, avx2, avx512vnni"):
        int8_kernel_backend()
    monkeypatch.delenv("AQD_INT8_ISA")
    backend, isa = int8_kernel_backend()
    # auto: the C++ kernel's best of AVX-512 VNNI and AVX2; the PyTorch path without them
    avail = int8_available_isas()
    best = "avx512vnni" if "avx512vnni" in avail else ("avx2" if "avx2" in avail else None)
    assert (backend == "cpp") == (best is not None)
    if backend == "cpp":
        assert INT8_ISA_NAMES[isa] == best


@pytest.mark.skipif(not int8_available_isas(), reason="C++ extension not available")
def test_op_rejects_bad_arguments():
    op = torch.ops.aqd_binary.int8_conv2d
    codes = torch.zeros(1, 4, 3, 3, dtype=torch.uint8)
    w = torch.zeros(1, 9, 16, 4, dtype=torch.int8)
    wsum = torch.zeros(16, dtype=torch.int32)
    vec = torch.zeros(5)
    good = dict(zero=0, step=1.0, weight=w, wsum=wsum, scale=vec, shift=None, bias=vec,
                out_channels=5, kernel_size=[3, 3], stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], isa=0)
    assert op(codes, None, **good).shape == (1, 5, 3, 3)
    with pytest.raises(RuntimeError, match="weight must be"):
        op(codes, None, **{**good, "weight": torch.zeros(1, 8, 16, 4, dtype=torch.int8)})
    with pytest.raises(RuntimeError, match="zero point"):
        op(codes, None, **{**good, "zero": 200})
    with pytest.raises(RuntimeError, match="outside"):  # codes up to 300
        op(torch.zeros(1, 4, 3, 3), [1.0, 0.0, 300.0, 0.0, 0.0], **good)
    if "avx2" in int8_available_isas():  # vpmaddubsw needs codes <= 127
        with pytest.raises(RuntimeError, match="codes <= 127"):
            op(codes + 200, None, **{**good, "isa": INT8_ISA_NAMES.index("avx2")})


@pytest.mark.skipif(not int8_gemm_available(), reason="torch._int_mm unavailable")
def test_deployed_layer_with_folded_bn_same_on_both_paths(monkeypatch):
    """convert_for_inference folds BN into the int8 layer's scale / shift (LIQ weights: with
    the sum column); the C++ kernel and the torch._int_mm path give the same float32 bits,
    and both the fake-quantized layer's output (computed exactly) up to their float32 epilogue."""
    from torch import nn

    from aqd_d2.export.deploy import convert_for_inference
    from aqd_d2.layers import QConv2d

    torch.manual_seed(3)
    layer = QConv2d(12, 20, 3, stride=2, padding=1, bias=False, norm=nn.BatchNorm2d(20),
                    activation=nn.ReLU(), weight_quantizer=build_quantizer("liq", 3, "weight"),
                    input_quantizer=build_quantizer("liq", 3, "activation"))
    model = nn.Sequential(layer)
    x = torch.randn(2, 12, 13, 10)
    with torch.no_grad():
        model.train()(x)
    ref, mag = fake_quant_exact(model.eval()[0], x)
    deployed, _ = convert_for_inference(model, fold_bn=True)
    mod = deployed[0]
    assert isinstance(mod, Int8ConvInference) and mod.norm is None and mod.has_sum_column
    y_torch = _run(deployed, x, monkeypatch, "torch")
    for isa in int8_available_isas():
        y = _run(deployed, x, monkeypatch, "cpp", isa)
        assert_within(y, ref, mag, 0, isa)
        if _addcmul_is_fma():
            assert torch.equal(y, y_torch)
