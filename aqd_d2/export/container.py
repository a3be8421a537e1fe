"""Single-blob container for packed checkpoints (format version 2).

Version 1 of the packed checkpoint was a ``torch.save`` zip holding one record per tensor;
every record costs a zip local header, a central-directory entry and 64-byte alignment
(a few hundred bytes), which for a model of a few MB with ~1000 small tensors (BN
statistics, quantizer intervals, flags) is several percent of the file. Version 2 stores
one header and one contiguous byte buffer::

    offset  size  field
    0       8     magic  b"AQDPACK\\0"
    8       4     format version (uint32 little endian) = 2
    12      4     H: length of the compressed header (uint32 LE)
    16      8     P: length of the payload (uint64 LE)
    24      4     CRC-32 of the compressed header (uint32 LE)
    28      4     CRC-32 of the payload (uint32 LE)
    32      H     header: zlib-compressed UTF-8 JSON of the checkpoint dict, each tensor
                  replaced by {"@t": [dtype, shape, byte offset into the payload, nbytes]}
    32+H    P     payload: the tensors' raw bytes (little endian, C order), back to back

The file size must be exactly ``32 + H + P``; a truncated, padded or corrupted file fails
its size or CRC check, a foreign file its magic. Tensors are stored byte for byte (NaN
payloads, -0.0 included), so a round trip is exact. No code is executed on reading (plain
JSON + raw bytes).

Nothing here imports the rest of aqd_d2.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from typing import Any, BinaryIO, Dict, List

import torch

__all__ = ["MAGIC", "CONTAINER_VERSION", "ContainerError", "write_container", "read_container", "is_container"]

MAGIC = b"AQDPACK\x00"
CONTAINER_VERSION = 2
_PREFIX = struct.Struct("<8sIIQII")  # magic, version, H, P, crc(header), crc(payload): 32 bytes
_TENSOR_KEY = "@t"
_DTYPES = {  # name in the header -> torch dtype (every dtype a state_dict may hold)
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}


class ContainerError(ValueError):
    """The bytes are not a complete, intact version-2 container (message names the file)."""


def is_container(path: str) -> bool:
    """True when the file starts with the container magic (any version)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"cannot store a tensor of dtype {t.dtype} (supported: {sorted(_DTYPES)})")
    return name


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of ``t``."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CPU runs torch here
        raise RuntimeError("the packed container is written on little-endian machines only")
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def write_container(f: BinaryIO, obj: Dict[str, Any]) -> int:
    """Write ``obj`` (nested dicts / lists of str, int, float, bool, None and tensors; dict
    keys must be str) as a version-2 container.

    Args:
        f: binary file object, written from its current position.
        obj: the checkpoint dict.
    Returns:
        number of bytes written.
    """
    chunks: List[bytes] = []
    size = 0

    def encode(v: Any) -> Any:
        nonlocal size
        if isinstance(v, torch.Tensor):
            data = _tensor_bytes(v)
            ref = {_TENSOR_KEY: [_dtype_name(v), list(v.shape), size, len(data)]}
            chunks.append(data)
            size += len(data)
            return ref
        if isinstance(v, dict):
            if any(not isinstance(k, str) for k in v):
                raise TypeError("container dict keys must be str")
            if _TENSOR_KEY in v:
                raise ValueError(f"the key {_TENSOR_KEY!r} is reserved")
            return {k: encode(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [encode(x) for x in v]
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        raise TypeError(f"cannot store a value of type {type(v).__name__} in the container")

    header = zlib.compress(json.dumps(encode(obj), separators=(",", ":"), allow_nan=True).encode(), 9)
    payload_crc = 0
    for c in chunks:
        payload_crc = zlib.crc32(c, payload_crc)
    f.write(_PREFIX.pack(MAGIC, CONTAINER_VERSION, len(header), size, zlib.crc32(header), payload_crc))
    f.write(header)
    for c in chunks:
        f.write(c)
    return _PREFIX.size + len(header) + size


def read_container(path: str) -> Dict[str, Any]:
    """Read a version-2 container written by :func:`write_container`.

    Args:
        path: the file.
    Returns:
        the stored dict with its tensors restored (CPU, own memory).
    Raises:
        ContainerError: wrong magic, unknown version, truncated / padded file or CRC mismatch;
            the message names ``path``.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _PREFIX.size or not data.startswith(MAGIC):
        raise ContainerError(f"{path}: not an aqd_d2 packed container (no {MAGIC!r} magic)")
    magic, version, hlen, plen, hcrc, pcrc = _PREFIX.unpack_from(data)
    if version != CONTAINER_VERSION:
        raise ContainerError(f"{path}: packed container version {version}; this aqd_d2 reads "
                             f"version {CONTAINER_VERSION} (and version 1 torch files)")
    expected = _PREFIX.size + hlen + plen
    if len(data) != expected:
        what = "is truncated" if len(data) < expected else "has trailing bytes"
        raise ContainerError(f"{path}: file {what}: {len(data)} bytes, the header says {expected}")
    header = data[_PREFIX.size:_PREFIX.size + hlen]
    payload = memoryview(data)[_PREFIX.size + hlen:]
    if zlib.crc32(header) != hcrc or zlib.crc32(payload) != pcrc:
        raise ContainerError(f"{path}: checksum mismatch (the file is corrupted)")
    try:
        tree = json.loads(zlib.decompress(header).decode())
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContainerError(f"{path}: unreadable header: {e}") from None

    def decode(v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) == {_TENSOR_KEY}:
                dtype, shape, offset, nbytes = v[_TENSOR_KEY]
                if dtype not in _DTYPES or offset < 0 or offset + nbytes > plen:
                    raise ContainerError(f"{path}: bad tensor record {v[_TENSOR_KEY]}")
                t = torch.empty(shape, dtype=_DTYPES[dtype])
                if t.numel() * t.element_size() != nbytes:
                    raise ContainerError(f"{path}: tensor record {v[_TENSOR_KEY]} has the wrong size")
                if nbytes:
                    raw = torch.frombuffer(bytearray(payload[offset:offset + nbytes]), dtype=torch.uint8)
                    t.reshape(-1).view(torch.uint8).copy_(raw)
                return t
            return {k: decode(x) for k, x in v.items()}
        if isinstance(v, list):
            return [decode(x) for x in v]
        return v

    return decode(tree)
