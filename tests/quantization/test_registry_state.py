"""Registry errors, bit/role validation, enabled flag, state round trips, levels, encode/decode."""
import pytest
import torch

from aqd_d2.quantization import available_quantizers, build_quantizer

KBIT = ["liq", "lsq", "dorefa"]
BINARY = ["bnn", "xnor", "bwn", "bireal"]


def test_registry_lists_methods_and_rejects_unknown():
    assert set(available_quantizers()) >= {"fp", "liq", "lsq", "dorefa", "twn", *BINARY}
    with pytest.raises(KeyError) as e:
        build_quantizer("nope", 4)
    assert "liq" in str(e.value) and "nope" in str(e.value)


@pytest.mark.parametrize("method", BINARY)
def test_binary_methods_require_one_bit(method):
    with pytest.raises(ValueError, match=rf"{method}.*\[1\]"):
        build_quantizer(method, 2, "weight")


@pytest.mark.parametrize("method", KBIT)
def test_kbit_methods_accept_2_to_8(method):
    for bits in (1, 9, 32):
        with pytest.raises(ValueError, match=rf"{method}.*\[2, 3, 4, 5, 6, 7, 8\]"):
            build_quantizer(method, bits, "weight")
    for bits in range(2, 9):
        assert build_quantizer(method, bits, "activation").bits == bits


def test_fp_twn_bits_and_roles():
    with pytest.raises(ValueError, match="fp"):
        build_quantizer("fp", 8)
    with pytest.raises(ValueError, match="twn"):
        build_quantizer("twn", 3)
    for method, bits in (("bwn", 1), ("twn", 2)):
        with pytest.raises(ValueError, match="cannot quantize activations"):
            build_quantizer(method, bits, "activation")
    with pytest.raises(ValueError, match="role"):
        build_quantizer("liq", 4, "bias")


ALL = [(m, 1) for m in BINARY] + [(m, b) for m in KBIT for b in (2, 4)] + [("twn", 2), ("fp", 32)]


def _roles(method):
    return ["weight"] if method in ("bwn", "twn") else ["weight", "activation"]


@pytest.mark.parametrize("method,bits", ALL)
def test_enabled_flag_identity_and_state_dict(method, bits):
    for role in _roles(method):
        q = build_quantizer(method, bits, role)
        x = torch.randn(4, 3, 3, 3)
        q.set_enabled(False)
        assert q(x) is x
        q2 = build_quantizer(method, bits, role)
        q2.load_state_dict(q.state_dict())
        assert not q2.is_enabled and q2(x) is x
        q2.set_enabled(True)
        assert q2.is_enabled
        if method != "fp":
            assert not torch.equal(q2(x), x)


def _data(method, role, bits, n=20_000):
    g = torch.Generator().manual_seed(bits)
    u = torch.rand(n, generator=g)
    if method == "lsq":
        qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if role == "weight" else (0, 2**bits - 1)
        return (u * (qn + qp + 1) - qn - 0.5).reshape(100, -1)  # step 1
    if role == "activation":
        return u.reshape(100, -1) * 1.1
    return (u * 2.2 - 1.1).reshape(100, -1)


@pytest.mark.parametrize("method", KBIT)
def test_number_of_levels_is_2_pow_k(method):
    for bits in range(2, 9):
        for role in ("weight", "activation"):
            kw = {"weight_norm": False} if method == "liq" else {}
            q = build_quantizer(method, bits, role, **kw)
            if method != "dorefa":
                q.initialized.fill_(True)  # alpha = 1 / step = 1: data covers the full grid
            assert q(_data(method, role, bits)).unique().numel() == 2**bits == q.num_levels


ENCODE = [(m, 1) for m in BINARY] + [(m, b) for m in KBIT for b in range(2, 9)] + [("twn", 2)]


@pytest.mark.parametrize("method,bits", ENCODE)
def test_encode_decode_bit_exact(method, bits):
    torch.manual_seed(bits)
    for role in _roles(method):
        q = build_quantizer(method, bits, role)
        q.train()
        x = torch.randn(16, 8, 3, 3) * (0.05 if role == "weight" else 1.0)
        y = q(x)  # also initialises learned ranges
        codes, step, offset = q.encode(x)
        assert codes.dtype == torch.uint8 and codes.shape == x.shape
        assert int(codes.max()) <= 2**bits - 1
        assert torch.equal(q.decode(codes, step, offset), y.detach())
        assert step.dim() == 0 or step.shape == (16, 1, 1, 1)
        assert torch.broadcast_shapes(step.shape, offset.shape, x.shape) == x.shape


def test_learned_state_round_trips_state_dict():
    for method in ("liq", "lsq"):
        q = build_quantizer(method, 4, "activation")
        q.train()
        q(torch.rand(8, 16) * 3)
        sd = q.state_dict()
        assert set(sd) == {"enabled", "initialized", "alpha" if method == "liq" else "step"}
        q2 = build_quantizer(method, 4, "activation")
        q2.load_state_dict(sd)
        for k in sd:
            assert torch.equal(q2.state_dict()[k], sd[k])


def test_extra_repr_and_flags():
    q = build_quantizer("liq", 3, "weight")
    r = repr(q)
    assert "method=liq" in r and "bits=3" in r and "weight_norm=True" in r
    assert build_quantizer("bnn", 1, "activation").is_binary
    assert not q.is_binary and q.num_levels == 8
