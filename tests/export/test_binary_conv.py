"""The real binary convolution (aqd_d2.export.binary_conv) against the reference

    conv2d(pad(sign(x), -1), sign(W), stride, dilation) * alpha + bias

computed independently here in float64 (sign(0) = +1, padding value -1, as the training
side's binary quantizers define them). Every kernel variant the CPU supports and the
PyTorch fallback are checked for exact equality.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from aqd_d2.export import binary_conv as bc
from aqd_d2.export._ext_build import build_directory, extension_error

from .exact_reference import assert_within, exact_conv, fake_quant_exact


@pytest.fixture(scope="module")
def isas():
    """Kernel variants to test (the extension is compiled on first use, about 20 s)."""
    if not bc.kernel_available():
        pytest.skip(f"C++ extension could not be built here: {extension_error()}")
    return bc.available_isas()


PATHS = ["torch", "generic", "popcnt", "avx2", "avx512"]


def run(x, packed, path, stride=1, padding=0, dilation=1, isas=None):
    if path == "torch":
        return bc.binary_conv2d(x, packed, stride, padding, dilation, backend="torch")
    if path not in isas:
        pytest.skip(f"kernel variant {path} not supported by this CPU")
    return bc.binary_conv2d(x, packed, stride, padding, dilation, backend="cpp", isa=path)


def reference(x, w, stride=1, padding=0, dilation=1, alpha=None, bias=None):
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    xs = torch.where(x >= 0, 1.0, -1.0).double()  # NaN -> -1, -0.0 -> +1
    ws = torch.where(w >= 0, 1.0, -1.0).double()
    y = F.conv2d(F.pad(xs, [pw, pw, ph, ph], value=-1.0), ws, stride=stride, dilation=dilation)
    y = y.float()  # exact: integers far below 2**24
    if alpha is not None:
        y = y * alpha.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def random_input(shape, gen, zeros=0.2, channels_last=False):
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < zeros] = 0.0  # exact zeros: sign(0) = +1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# (N, C, O, H, W, k, stride, padding, dilation)
CASES = [
    (1, 3, 5, 7, 9, 3, 1, 1, 1),
    (2, 17, 20, 13, 13, 3, 2, 1, 1),
    (1, 64, 64, 8, 8, 3, 1, 1, 1),
    (2, 65, 33, 7, 9, 5, 2, 2, 1),
    (1, 130, 17, 9, 11, 1, 1, 0, 1),
    (1, 130, 40, 6, 5, 3, 2, 0, 1),
    (2, 64, 16, 13, 13, 3, 1, 2, 2),
    (1, 1, 1, 1, 1, 3, 1, 1, 1),
    (1, 200, 48, 11, 10, 3, 1, (1, 2), (2, 1)),
    (0, 8, 4, 5, 5, 3, 1, 1, 1),  # empty batch
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_exact_unscaled(isas, path, case):
    n, c, o, h, w, k, s, p, d = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x = random_input((n, c, h, w), gen)
    wt = torch.randn(o, c, k, k, generator=gen)
    wt[0, 0, 0, 0] = 0.0  # sign(0) = +1 for weights too
    y = run(x, bc.pack_weights(wt), path, s, p, d, isas)
    ref = reference(x, wt, s, p, d)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.equal(y, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_exact_scaled_with_bias(isas, path, channels_last):
    gen = torch.Generator().manual_seed(1)
    x = random_input((2, 70, 9, 7), gen, channels_last=channels_last)
    wt = torch.randn(19, 70, 3, 3, generator=gen)
    alpha, bias = torch.rand(19, generator=gen) + 0.1, torch.randn(19, generator=gen)
    y = run(x, bc.pack_weights(wt, alpha, bias), path, 2, 1, 1, isas)
    # bit-exact against the same float32 operations (a multiply, then an add)
    assert torch.equal(y, reference(x, wt, 2, 1, 1, alpha, bias))
    # and the training-side form, where alpha sits inside the conv weight, computed exactly
    w_train = torch.where(wt >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
    train, mag = exact_conv(torch.where(x >= 0, 1.0, -1.0), w_train, bias, 2, 1, pad_value=-1.0,
                            wmag=w_train.abs())
    assert_within(y, train, mag, 0, "training-side form")
    # the output keeps the input's memory format
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("path", PATHS)
def test_special_values(isas, path):
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 2.0])
    x = x.view(1, 8, 1, 1).repeat(1, 9, 3, 3)[:, :70]  # 72 -> 70 channels: a tail word
    x = x.view(1, 70, 3, 3)
    wt = torch.ones(3, 70, 3, 3)
    wt[1] = -1.0
    wt[2, ::2] = -1.0
    y = run(x, bc.pack_weights(wt), path, 1, 1, 1, isas)
    assert torch.equal(y, reference(x, wt, 1, 1, 1))
    # other dtypes: the original value's sign counts (float32(-1e-300) would be -0.0, i.e. +1)
    x64 = x.double()
    x64[:, :, 1, 1] = -1e-300
    packed = bc.pack_weights(wt)
    assert torch.equal(run(x64, packed, path, 1, 1, 1, isas), reference(x64, wt, 1, 1, 1))
    xh = x.half()
    assert torch.equal(run(xh, packed, path, 1, 1, 1, isas), reference(xh.float(), wt, 1, 1, 1))


def test_random_sweep(isas):
    """Many random shapes through the best kernel variant and the fallback."""
    rnd = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        k = rnd.choice([1, 2, 3, 5])
        s, d, p = rnd.choice([1, 2, 3]), rnd.choice([1, 1, 2]), rnd.choice([0, 1, 2])
        c, o = rnd.randint(1, 150), rnd.randint(1, 40)
        h = rnd.randint(max(1, d * (k - 1) + 1 - 2 * p), 16)
        w = rnd.randint(max(1, d * (k - 1) + 1 - 2 * p), 16)
        x = random_input((rnd.randint(1, 2), c, h, w), gen, channels_last=rnd.random() < 0.3)
        wt = torch.randn(o, c, k, k, generator=gen)
        alpha = torch.rand(o, generator=gen) if rnd.random() < 0.5 else None
        packed = bc.pack_weights(wt, alpha)
        ref = reference(x, wt, s, p, d, alpha)
        for path in (isas[-1], "torch"):
            y = run(x, packed, path, s, p, d, isas)
            assert torch.equal(y, ref), (path, x.shape, wt.shape, s, p, d)


def test_pack_input_layout(isas):
    gen = torch.Generator().manual_seed(3)
    x = random_input((2, 70, 5, 6), gen)
    for path in isas:
        for fmt in (torch.contiguous_format, torch.channels_last):
            words = bc.pack_input(x.contiguous(memory_format=fmt), (1, 2), isa=path)
            assert words.shape == (2, 7, 10, 2) and words.dtype == torch.int64
            bits = (words.unsqueeze(-1) >> torch.arange(64)) & 1  # [N, Hp, Wp, 2, 64]
            bits = bits.flatten(3)
            assert not bits[..., 70:].any(), "channel tail bits must be 0"
            inner = bits[:, 1:-1, 2:-2, :70].permute(0, 3, 1, 2)
            assert torch.equal(inner.bool(), x >= 0)
            border = bits.clone()
            border[:, 1:-1, 2:-2] = 0
            assert not border.any(), "padding pixels must be all-zero words (-1)"


def test_pack_weights_roundtrip():
    w = torch.randn(21, 67, 3, 2)
    w[0, :5] = 0.0
    packed = bc.pack_weights(w, bias=torch.arange(21.0))
    assert packed.words.shape == (2, 3, 2, 2, 16)
    assert torch.equal(packed.signs, torch.where(w >= 0, 1.0, -1.0))
    assert not packed.words[1, ..., 5:].any(), "padding output channels must be 0"
    with pytest.raises(ValueError, match="alpha must have 21 values"):
        bc.pack_weights(w, alpha=torch.ones(20))


def test_errors(isas):
    packed = bc.pack_weights(torch.randn(4, 8, 3, 3))
    with pytest.raises(NotImplementedError, match="groups=1"):
        bc.binary_conv2d(torch.randn(1, 8, 5, 5), packed, groups=2)
    with pytest.raises(ValueError, match="channels"):
        bc.binary_conv2d(torch.randn(1, 7, 5, 5), packed)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        bc.binary_conv2d(torch.randn(1, 8, 2, 2), packed, backend="cpp")
    with pytest.raises(NotImplementedError):
        bc.BinaryConv2dInference(torch.randn(4, 4, 3, 3), groups=2)


def test_backend_selection(isas, monkeypatch):
    # the default choice, whatever the caller's environment forces (tools/test_avx2_path.sh
    # runs the suite with AQD_BINARY_ISA=avx2)
    monkeypatch.delenv("AQD_BINARY_KERNEL", raising=False)
    monkeypatch.delenv("AQD_BINARY_ISA", raising=False)
    assert bc.kernel_backend() == f"cpp-{isas[-1]}"
    monkeypatch.setenv("AQD_BINARY_KERNEL", "torch")
    assert bc.kernel_backend() == "torch"
    monkeypatch.setenv("AQD_BINARY_KERNEL", "auto")
    monkeypatch.setenv("AQD_BINARY_ISA", isas[0])
    assert bc.kernel_backend() == f"cpp-{isas[0]}"
    # an unavailable extension falls back to the PyTorch path automatically
    monkeypatch.delenv("AQD_BINARY_ISA")
    monkeypatch.setattr(bc, "load_extension", lambda: False)
    assert bc.kernel_backend() == "torch"
    x, w = torch.randn(1, 5, 6, 6), torch.randn(3, 5, 3, 3)
    assert torch.equal(bc.binary_conv2d(x, bc.pack_weights(w), 1, 1), reference(x, w, 1, 1))
    assert (build_directory() / "BUILD_OK").is_file()


def test_traced_with_a_forced_variant(isas, monkeypatch):
    """AQD_BINARY_ISA set while the JIT tracer runs (the FLOP count of a deployed model): the
    variant check asks the extension which variants this CPU runs, an op returning a list of
    ints that the tracer cannot record ("unsupported output list type: int")."""
    monkeypatch.setenv("AQD_BINARY_ISA", isas[0])
    m = bc.BinaryConv2dInference(torch.randn(6, 8, 3, 3), torch.rand(6) + 0.5, padding=1).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        traced = torch.jit.trace(m, x)
        assert torch.equal(traced(x), m(x))
    assert bc.kernel_backend() == f"cpp-{isas[0]}"


def test_module_and_state_dict(isas):
    gen = torch.Generator().manual_seed(5)
    w, alpha, bias = torch.randn(12, 20, 3, 3, generator=gen), torch.rand(12), torch.randn(12)
    m = bc.BinaryConv2dInference(w, alpha, bias, stride=2, padding=1,
                                 activation=torch.nn.ReLU())
    x = random_input((1, 20, 9, 9), gen)
    y = m(x)
    assert torch.equal(y, torch.relu(reference(x, w, 2, 1, 1, alpha, bias)))
    other = bc.BinaryConv2dInference(torch.randn(12, 20, 3, 3), torch.ones(12), torch.zeros(12),
                                     stride=2, padding=1, activation=torch.nn.ReLU())
    other.load_state_dict(m.state_dict())
    assert torch.equal(other(x), y)
    assert set(m.state_dict()) == {"weight_words", "alpha", "bias"}


def _qconv(method, c, o, **kw):
    try:
        from aqd_d2.layers import QConv2d
        from aqd_d2.quantization import build_quantizer
    except ImportError as e:  # pragma: no cover - the layers package is optional here
        pytest.skip(f"QConv2d unavailable: {e}")
    layer = QConv2d(c, o, 3, weight_quantizer=build_quantizer(method, 1, "weight"),
                    input_quantizer=build_quantizer("bnn", 1, "activation"), **kw)
    return layer.eval()


@pytest.mark.parametrize("method,bias", [("bnn", False), ("bnn", True), ("xnor", True)])
def test_from_qconv_matches_training_layer(isas, method, bias):
    torch.manual_seed(0)
    layer = _qconv(method, 33, 18, stride=2, padding=1, bias=bias)
    x = torch.randn(2, 33, 11, 10)
    m = bc.BinaryConv2dInference.from_qconv(layer)
    with torch.no_grad():
        expected = layer(x)
    assert (m.alpha is None) == (method == "bnn")
    if method == "bnn" and not bias:  # +-1 operands: the float simulation is exact too
        assert torch.equal(m(x), expected)
    else:  # bias / alpha enter the float conv in another order: against it computed exactly
        ref, mag = fake_quant_exact(layer, x)
        assert_within(m(x), ref, mag, 0, method)


def test_fallback_when_the_build_fails(tmp_path):
    """No usable compiler: the extension is reported unavailable, the PyTorch path runs, and
    the failure is remembered so the next process does not recompile."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from aqd_d2.export import binary_conv as bc\n"
        "assert not bc.kernel_available() and bc.kernel_backend() == 'torch'\n"
        "x, w = torch.randn(1, 5, 6, 6), torch.randn(3, 5, 3, 3)\n"
        "y = bc.binary_conv2d(x, bc.pack_weights(w), 1, 1)\n"
        "xs = torch.nn.functional.pad(torch.where(x >= 0, 1.0, -1.0), [1] * 4, value=-1.0)\n"
        "assert torch.equal(y, torch.nn.functional.conv2d(xs, torch.where(w >= 0, 1.0, -1.0)))\n"
    )
    env = dict(os.environ, AQD_D2_EXT_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyTorch fallback" in r.stderr
    assert list(tmp_path.glob("*/BUILD_FAILED"))
