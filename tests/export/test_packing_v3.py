"""Packed checkpoint version 3: implicit symmetric offsets and batch norms stored as their
eval-mode affine map, both exact (aqd_d2/export/packing.py, aqd_d2/export/bn_affine.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aqd_d2  # noqa: F401
from detectron2.layers import FrozenBatchNorm2d

from aqd_d2.export import PackedCheckpointError, load_packed, packed_size_report, save_packed
from aqd_d2.export.bn_affine import affine_norms, eval_affine, identity_var
from aqd_d2.export.packing import _read
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import build_quantizer


def _set_bn(bn, weight, bias, mean, var):
    with torch.no_grad():
        for name, v in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            getattr(bn, name).copy_(torch.as_tensor(v, dtype=torch.float32))
    return bn.eval()


def test_eval_affine_by_hand():
    # gamma 2, beta 1, mean 3, var 3, eps 1: a = 2 / sqrt(3 + 1) = 1, b = 1 - 3 * 1 = -2;
    # gamma -6, beta 0.5, mean -1, var 8, eps 1: a = -6 / 3 = -2, b = 0.5 - (-1)(-2) = -1.5
    bn = _set_bn(nn.BatchNorm2d(2, eps=1.0), [2, -6], [1, 0.5], [3, -1], [3, 8])
    a, b = eval_affine(bn)
    assert a.tolist() == [1.0, -2.0] and b.tolist() == [-2.0, -1.5]
    # v1 + eps == 1 in float32, so a norm with running_var v1 scales by exactly 1
    for eps in (1e-5, 1e-3, 0.1, 1.0):
        v1 = identity_var(eps)
        assert v1.dtype == torch.float32 and float(v1 + torch.tensor(eps, dtype=torch.float32)) == 1.0


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(
        QConv2d(3, 8, 3, padding=1, norm=nn.BatchNorm2d(8), activation=F.relu),
        QConv2d(8, 8, 3, padding=1, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                input_quantizer=build_quantizer("bnn", 1, "activation"), norm=FrozenBatchNorm2d(8)),
        nn.Flatten(),
        QLinear(8 * 6 * 6, 16, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                input_quantizer=build_quantizer("bnn", 1, "activation")),
        nn.BatchNorm1d(16),
    )
    g = torch.Generator().manual_seed(seed + 100)
    for m in net.modules():  # non-trivial statistics (FrozenBatchNorm2d has no train mode)
        if hasattr(m, "running_var"):
            c = m.running_var.numel()
            _set_bn(m, torch.randn(c, generator=g), torch.randn(c, generator=g),
                    torch.randn(c, generator=g) * 3, torch.rand(c, generator=g) * 4 + 0.01)
    return net.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_v3_round_trip_is_bit_exact(tmp_path, channels_last):
    model = _bn_net(0)
    x = torch.randn(4, 3, 6, 6) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
    path = str(tmp_path / "m.packed")
    save_packed(model, path)
    blob = _read(path)
    assert blob["version"] == 3
    assert sorted(blob["norms"]) == ["0.norm", "1.norm", "4"]
    for name, e in blob["norms"].items():  # the four vectors are not stored, a and b are
        assert all(k not in blob["tensors"] for k in e["keys"]) and len(e["keys"]) == 4
        a, b = eval_affine(dict(model.named_modules())[name])
        assert torch.equal(e["a"], a) and torch.equal(e["b"], b)
    assert "4.num_batches_tracked" in blob["tensors"]
    # binary weights +-alpha = codes * 2 alpha - alpha: offset implicit (c = 1/2)
    assert {n: e["offset"] for n, e in blob["packed"].items()} == {
        "1": {"neg_step_times": 0.5}, "3": {"neg_step_times": 0.5}}

    other = _bn_net(1)
    load_packed(other, path)
    with torch.no_grad():
        assert torch.equal(other(x), ref)
    bn1d = other[4]
    assert torch.equal(bn1d.running_mean, torch.zeros(16))
    assert torch.equal(bn1d.running_var, identity_var(bn1d.eps).expand(16))
    assert int(bn1d.num_batches_tracked) == int(model[4].num_batches_tracked)


def test_v3_size_report_by_hand(tmp_path):
    model = _bn_net(0)
    r3, r2 = packed_size_report(model), packed_size_report(model, version=2)
    # norms: 8 + 8 + 16 channels, each 4 float32 vectors -> 2
    assert [(n, c, before, after) for n, c, before, after in r3.norms] == [
        ("0.norm", 8, 128, 64), ("1.norm", 8, 128, 64), ("4", 16, 256, 128)]
    # implicit offsets: conv "1" (8 channels) and linear "3" (16 rows), 4 bytes each
    assert r2.packed_bytes - r3.packed_bytes == (64 + 64 + 128) + (8 + 16) * 4
    # conv "1": 576 bits = 72 bytes + 8 steps; linear "3": 4608 bits = 576 bytes + 16 steps
    assert [row[4] for row in r3.layers] == [72 + 32, 576 + 64]
    assert r2.full_precision_bytes == r3.full_precision_bytes
    # the written file: payload + 32-byte prefix + compressed JSON header
    save_packed(model, str(tmp_path / "m"))
    assert r3.packed_bytes + 32 < (tmp_path / "m").stat().st_size < r3.packed_bytes + 32 + 2048


@pytest.mark.parametrize("method,bits,c", [
    ("lsq", 4, 8.0),     # LSQ: w = step * q, q in [-8, 7], codes q + 8
    ("dorefa", 3, 3.5),  # DoReFa: symmetric grid of 8 levels, offset -7/2 step
    ("twn", 2, 1.0),     # TWN: {-a, 0, a} as codes 0, 1, 2 with step a
    ("liq", 2, None),    # LIQ: a learned interval [l, u] -> offset l, not -c step
])
def test_offset_rule_per_grid(tmp_path, method, bits, c):
    torch.manual_seed(0)
    model = nn.Sequential(QConv2d(3, 4, 1, weight_quantizer=build_quantizer(method, bits, "weight"),
                                  input_quantizer=build_quantizer("lsq", 4, "activation")))
    model.train()
    model(torch.randn(2, 3, 4, 4))
    model.eval()
    path = str(tmp_path / "m")
    save_packed(model, path)
    entry = _read(path)["packed"]["0"]
    if c is None:
        assert isinstance(entry["offset"], torch.Tensor)
    else:
        assert entry["offset"] == {"neg_step_times": c}
    other = copy.deepcopy(model)
    load_packed(other, path)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_bn_affine_off_and_failing_norms_keep_their_state(tmp_path):
    model = _bn_net(0)
    path = str(tmp_path / "off")
    save_packed(model, path, bn_affine=False)
    blob = _read(path)
    assert blob["norms"] == {} and "0.norm.running_var" in blob["tensors"]
    # a negative variance makes a non-finite map: that norm is stored unchanged
    with torch.no_grad():
        model[0].norm.running_var[0] = -5.0
    assert [n for n, *_ in affine_norms(model)] == ["1.norm", "4"]
    save_packed(model, str(tmp_path / "nan"))
    blob = _read(str(tmp_path / "nan"))
    assert sorted(blob["norms"]) == ["1.norm", "4"]
    assert torch.equal(blob["tensors"]["0.norm.running_var"], model[0].norm.running_var)


def test_eps_mismatch_is_named(tmp_path):
    model = _bn_net(0)
    path = str(tmp_path / "m")
    save_packed(model, path)
    other = _bn_net(1)
    other[4].eps = 1e-3
    with pytest.raises(PackedCheckpointError, match=r"norm '4' was saved with eps 1e-05.*eps 0.001"):
        load_packed(other, path)
