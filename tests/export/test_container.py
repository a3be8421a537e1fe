"""The single-blob container of packed checkpoints (aqd_d2.export.container)."""
import io
import struct
import zlib

import pytest
import torch

from aqd_d2.export.container import (
    MAGIC,
    ContainerError,
    is_container,
    read_container,
    write_container,
)


def _write(tmp_path, obj, name="c.bin"):
    path = tmp_path / name
    with open(path, "wb") as f:
        n = write_container(f, obj)
    assert n == path.stat().st_size
    return path


def test_round_trip_is_bit_exact(tmp_path):
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.5])
    obj = {
        "format": "x", "version": 2, "none": None, "flag": True, "pi": 3.25,
        "special": special,
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "half": torch.randn(4).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "bools": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 5),
        "codes": torch.randint(0, 256, (1001,), dtype=torch.uint8),
        "nested": {"list": [torch.arange(3, dtype=torch.int32), "s", [1, 2]]},
        "transposed": torch.arange(6.0).view(2, 3).t(),  # non-contiguous input
    }
    back = read_container(str(_write(tmp_path, obj)))
    assert set(back) == set(obj)
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            # compare the raw bytes: NaN payloads and -0.0 must survive
            assert back[k].contiguous().view(-1).view(torch.uint8).tolist() == \
                v.contiguous().view(-1).view(torch.uint8).tolist(), k
    assert back["nested"]["list"][1:] == ["s", [1, 2]]
    assert torch.equal(back["nested"]["list"][0], torch.arange(3, dtype=torch.int32))
    assert back["none"] is None and back["flag"] is True and back["pi"] == 3.25


def test_layout_by_hand(tmp_path):
    t = torch.tensor([1, 2, 3], dtype=torch.uint8)
    f = io.BytesIO()
    write_container(f, {"a": t, "b": 5})
    raw = f.getvalue()
    magic, version, hlen, plen, hcrc, pcrc = struct.unpack_from("<8sIIQII", raw)
    assert magic == MAGIC and version == 2 and plen == 3
    header = raw[32:32 + hlen]
    assert zlib.crc32(header) == hcrc and pcrc == zlib.crc32(b"\x01\x02\x03")
    assert zlib.decompress(header) == b'{"a":{"@t":["uint8",[3],0,3]},"b":5}'
    assert raw[32 + hlen:] == b"\x01\x02\x03" and len(raw) == 32 + hlen + 3


def test_errors_name_the_file(tmp_path):
    path = _write(tmp_path, {"w": torch.randn(100)}, "model.bin")
    data = path.read_bytes()
    assert is_container(str(path))
    cases = {
        "short.bin": (data[:20], "short.bin: not an aqd_d2 packed container"),
        "cut.bin": (data[:-1], "cut.bin: file is truncated"),
        "foreign.bin": (b"PK\x03\x04" + data[4:], "foreign.bin: not an aqd_d2 packed container"),
        "v3.bin": (data[:8] + (3).to_bytes(4, "little") + data[12:], "v3.bin: packed container version 3"),
        "bitrot.bin": (data[:-5] + bytes([data[-5] ^ 1]) + data[-4:], "bitrot.bin: checksum mismatch"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ContainerError, match=message):
            read_container(str(p))


def test_rejects_unsupported_values():
    with pytest.raises(TypeError, match="keys must be str"):
        write_container(io.BytesIO(), {1: 2})
    with pytest.raises(TypeError, match="type object"):
        write_container(io.BytesIO(), {"a": object()})
    with pytest.raises(TypeError, match="complex64"):
        write_container(io.BytesIO(), {"a": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        write_container(io.BytesIO(), {"a": {"@t": 1}})
