"""Bit packing, packed checkpoints and their size accounting."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aqd_d2  # noqa: F401

from aqd_d2.export import (
    PackedCheckpointError,
    load_packed,
    pack_bits,
    packed_size_report,
    save_packed,
    unpack_bits,
)
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import Quantizer, available_quantizers, build_quantizer
from tests.quant_helpers import ExactSTE


# ---- bit packing -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 13, 1001])
def test_round_trip_exact(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2 ** bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_layout_by_hand():
    # 3-bit codes 1, 2, 3 -> stream (LSB first) 100 010 110 -> bytes 0b11010001, 0b0
    assert pack_bits(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    assert pack_bits(torch.tensor([[1, 0], [1, 1]]), 1).tolist() == [0b1101]
    assert pack_bits(torch.tensor([255, 7]), 8).tolist() == [255, 7]


def test_packing_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([0.5]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 7)


# ---- models ----------------------------------------------------------------------------------


class TUniform(Quantizer):
    """k-bit max-abs uniform quantizer with an exact integer encoding (test-only)."""

    method = "t_uniform"

    def encode(self, x):
        x = x.detach()
        hi = x.abs().max().clamp_min(1e-8)
        step = 2 * hi / (2 ** self.bits - 1)
        codes = torch.round((x + hi) / step).clamp(0, 2 ** self.bits - 1)
        return codes.to(torch.uint8), step, -hi

    def quantize(self, x):
        return ExactSTE.apply(x, self.decode(*self.encode(x)))


def tiny_net(make_w, make_a, seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        QConv2d(3, 8, 3, padding=1, norm=nn.BatchNorm2d(8), activation=F.relu),  # input float
        QConv2d(8, 8, 3, stride=2, padding=1, groups=2, weight_quantizer=make_w(),
                input_quantizer=make_a(), norm=nn.BatchNorm2d(8), activation=F.relu),
        QConv2d(8, 6, 1, weight_quantizer=make_w(), input_quantizer=make_a()),
        nn.Flatten(),
        QLinear(6 * 8 * 8, 5, weight_quantizer=make_w(), input_quantizer=make_a()),
    )


def _real(method, bits, role):
    if method not in available_quantizers():
        pytest.skip(f"{method} not registered")
    return build_quantizer(method, bits, role)


QUANTIZERS = {
    "test-uniform-3": (lambda: TUniform(3, "weight"), lambda: TUniform(3, "activation")),
    "liq-2": (lambda: _real("liq", 2, "weight"), lambda: _real("liq", 2, "activation")),
    "dorefa-5": (lambda: _real("dorefa", 5, "weight"), lambda: _real("dorefa", 5, "activation")),
    "xnor-1": (lambda: _real("xnor", 1, "weight"), lambda: _real("bnn", 1, "activation")),
    "twn-2": (lambda: _real("twn", 2, "weight"), lambda: _real("lsq", 4, "activation")),
}


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_packed_model_equals_fake_quantized_model(tmp_path, kind):
    make_w, make_a = QUANTIZERS[kind]
    model = tiny_net(make_w, make_a, seed=0)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)  # data initialisation of the quantizers that need it, BN statistics
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = str(tmp_path / "model.packed")
    report = save_packed(model, path)
    assert os.listdir(tmp_path) == ["model.packed"]  # no temporary file left behind
    assert len(report.layers) == 3 and report.packed_bytes < report.full_precision_bytes

    other = tiny_net(make_w, make_a, seed=1).eval()
    names = load_packed(other, path)
    assert names == ["1", "2", "4"]
    assert not other[1].weight_quantizer.is_enabled and other[1].input_quantizer.is_enabled
    with torch.no_grad():
        out = other(x)
    assert torch.equal(out, ref)
    # the saved model itself is untouched
    assert model[1].weight_quantizer.is_enabled


def test_size_report_by_hand():
    model = nn.Sequential(
        QConv2d(3, 4, 3, weight_quantizer=TUniform(2, "weight"), input_quantizer=TUniform(2, "activation")),
        nn.Linear(4, 2),
    )
    r = packed_size_report(model, version=2)
    # float: conv weight 108*4 + bias 4*4 + two bool `enabled` flags 1+1 + linear (8+2)*4
    assert r.full_precision_bytes == 432 + 16 + 2 + 40
    # packed: 108 2-bit codes = 27 bytes + float32 step and offset (4+4) instead of 432
    assert r.packed_bytes == 27 + 8 + 16 + 2 + 40
    assert r.layers == [("0", 108, 2, 432, 35)]
    assert r.ratio == pytest.approx(490 / 93)
    # a disabled weight quantizer means a float weight: nothing is packed
    model[0].weight_quantizer.set_enabled(False)
    assert packed_size_report(model, version=2).packed_bytes == 490


def test_bad_files(tmp_path):
    make_w = lambda: TUniform(4, "weight")  # noqa: E731
    make_a = lambda: TUniform(4, "activation")  # noqa: E731
    model = tiny_net(make_w, make_a, 0)
    good = tmp_path / "good.packed"
    save_packed(model, str(good))

    truncated = tmp_path / "truncated.packed"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PackedCheckpointError, match="truncated.packed: file is truncated"):
        load_packed(tiny_net(make_w, make_a, 1), str(truncated))

    old = tmp_path / "v1.packed"  # version 1 (torch.save) files: truncated ones fail too
    save_packed(model, str(old), version=1)
    old.write_bytes(old.read_bytes()[: old.stat().st_size // 2])
    with pytest.raises(PackedCheckpointError, match="v1.packed: cannot be read.*truncated"):
        load_packed(tiny_net(make_w, make_a, 1), str(old))

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PackedCheckpointError, match="garbage.bin: cannot be read.*neither"):
        load_packed(tiny_net(make_w, make_a, 1), str(garbage))

    foreign = tmp_path / "foreign.pth"
    torch.save(model.state_dict(), str(foreign))
    with pytest.raises(PackedCheckpointError, match="not an aqd_d2 packed checkpoint"):
        load_packed(tiny_net(make_w, make_a, 1), str(foreign))

    wider = nn.Sequential(*tiny_net(make_w, make_a, 1))
    wider[2] = QConv2d(8, 7, 1, weight_quantizer=make_w(), input_quantizer=make_a())
    with pytest.raises(PackedCheckpointError, match="different architecture.*2.weight"):
        load_packed(wider, str(good))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_all_versions_load_exactly(tmp_path, version):
    make_w, make_a = QUANTIZERS["test-uniform-3"]
    model = tiny_net(make_w, make_a, seed=0)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)
    model.eval()
    path = str(tmp_path / f"v{version}.packed")
    save_packed(model, path, version=version)
    other = tiny_net(make_w, make_a, seed=1).eval()
    names = load_packed(other, path)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
        for name in names:  # decoded weight == the fake-quantized weight, bit for bit
            layer = dict(model.named_modules())[name]
            assert torch.equal(dict(other.named_modules())[name].weight, layer.weight_quantizer(layer.weight))
    skip = {f"{n}.weight" for n in names} | {f"{n}.weight_quantizer.enabled" for n in names}
    if version == 3:  # the two BatchNorm2d are stored as their affine map (test_packing_v3.py)
        skip |= {f"{i}.norm.{k}" for i in (0, 1) for k in ("weight", "bias", "running_mean", "running_var")}
    for k, v in model.state_dict().items():  # everything else exactly as saved
        if k not in skip:
            assert torch.equal(other.state_dict()[k], v), k


def test_version_2_is_smaller_than_version_1(tmp_path):
    make_w, make_a = QUANTIZERS["test-uniform-3"]
    model = tiny_net(make_w, make_a, seed=0)
    save_packed(model, str(tmp_path / "a"), version=1)
    report = save_packed(model, str(tmp_path / "b"), version=2)
    v1, v2 = (tmp_path / "a").stat().st_size, (tmp_path / "b").stat().st_size
    assert v2 < v1
    # payload + 32-byte prefix + compressed header (a few hundred bytes for this net)
    assert report.packed_bytes + 32 < v2 < report.packed_bytes + 32 + 2048
    with pytest.raises(ValueError, match=r"version must be one of \(1, 2, 3\)"):
        save_packed(model, str(tmp_path / "c"), version=4)


def test_unknown_version_and_corruption(tmp_path):
    make_w, make_a = QUANTIZERS["test-uniform-3"]
    model = tiny_net(make_w, make_a, seed=0)
    good = tmp_path / "good.packed"
    save_packed(model, str(good))
    data = bytearray(good.read_bytes())

    future = tmp_path / "future.packed"
    future.write_bytes(bytes(data[:8]) + (7).to_bytes(4, "little") + bytes(data[12:]))
    with pytest.raises(PackedCheckpointError, match="future.packed: packed container version 7"):
        load_packed(tiny_net(make_w, make_a, 1), str(future))

    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    bad = tmp_path / "flipped.packed"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(PackedCheckpointError, match="flipped.packed: checksum mismatch"):
        load_packed(tiny_net(make_w, make_a, 1), str(bad))

    longer = tmp_path / "longer.packed"
    longer.write_bytes(bytes(data) + b"\0")
    with pytest.raises(PackedCheckpointError, match="longer.packed: file has trailing bytes"):
        load_packed(tiny_net(make_w, make_a, 1), str(longer))
