"""Bit-packed checkpoints of quantized models.

Bit packing (:func:`pack_bits` / :func:`unpack_bits`). ``n`` codes of ``k`` bits
(1 <= k <= 8) form a stream of ``n*k`` bits: code ``i`` contributes its bits LSB first at
stream positions ``i*k .. i*k+k-1``. The stream is cut into bytes, bit ``j`` of a byte being
stream position ``8*b + j`` (little-endian bit order), and zero-padded to a whole byte, so
the packed size is ``ceil(n*k/8)`` bytes. Unpacking needs ``k`` and ``n`` and is the exact
inverse.

Packed checkpoint (:func:`save_packed` / :func:`load_packed`). Version 2 (written by default)
is a single-blob file (:mod:`.container`: magic, one compressed JSON header, one contiguous
byte buffer, sizes and CRC-32s checked on reading); version 1 (still read, and written with
``save_packed(..., version=1)``) is a ``torch.save`` file read back with
``weights_only=True``. Both hold the same dict (loading runs no pickled code)::

    {"format": "aqd_d2.packed_checkpoint", "version": 1 or 2,
     "shapes":  {state_dict key: shape}                 # architecture fingerprint, every key
     "tensors": {state_dict key: tensor}                # everything not packed, as is
     "packed":  {layer name: {"data": uint8 packed codes, "bits", "numel", "shape",
                              "dtype", "method", "step", "offset"}}}

A layer is packed when it is a quantized layer (QConv2d/QLinear) whose weight quantizer is
enabled, has at most 8 bits and an integer encoding (``encode``). Its ``weight`` is replaced
by the packed codes + ``step`` + ``offset`` of ``Quantizer.encode`` (``weight == codes *
step + offset`` after fake quantization). All other tensors (biases, BN, float layers,
quantizer parameters such as activation intervals) are stored unchanged.

Loading (choice): the decoded weight ``codes * step + offset`` is written into the layer's
``weight`` and its weight quantizer is disabled (``enabled = False``, stored so in the
file). Since ``decode(encode(w))`` equals the fake-quantized weight bit for bit (the
contract of :class:`~aqd_d2.quantization.Quantizer`), the loaded model computes exactly what
the fake-quantized model computed, without re-quantizing, and its state_dict keys are
unchanged (no extra buffers). Re-enabling the weight quantizer would quantize the already
quantized weight again.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

from aqd_d2.layers import QuantLayerMixin

from .container import ContainerError, is_container, read_container, write_container

__all__ = [
    "pack_bits", "unpack_bits", "save_packed", "load_packed", "packed_size_report",
    "PackedSizeReport", "PackedCheckpointError", "FORMAT", "VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "aqd_d2.packed_checkpoint"
VERSION = 2  # the version save_packed writes; VERSIONS are read
VERSIONS = (1, 2)


class PackedCheckpointError(RuntimeError):
    """A file that is not a (complete) aqd_d2 packed checkpoint, or one for another model."""


# ---- bit packing -------------------------------------------------------------------------------
def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of ``bits`` bits each into bytes (layout in the module docstring).

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits - 1]``; read flattened.
        bits: 1..8.
    Returns:
        1-D ``uint8`` tensor of ``ceil(codes.numel() * bits / 8)`` bytes (on the CPU).
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits")
    flat = flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n*bits,) LSB first
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for j in range(8):
        out |= stream[:, j] << j
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: 1-D ``uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes.
        bits: 1..8, as used for packing.
        numel: number of codes.
    Returns:
        1-D ``uint8`` tensor of ``numel`` codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != math.ceil(numel * bits / 8):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {numel} codes of {bits} bits "
            f"(expected {math.ceil(numel * bits / 8)})"
        )
    stream = ((packed.cpu().unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    b = stream[: numel * bits].view(numel, bits)
    codes = torch.zeros(numel, dtype=torch.uint8)
    for j in range(bits):
        codes |= b[:, j] << j
    return codes


# ---- which layers are packed -------------------------------------------------------------------
def _encoded_layers(
    model: nn.Module,
) -> Iterator[Tuple[str, QuantLayerMixin, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, layer, codes, step, offset)`` for each packable layer: a quantized layer whose
    weight quantizer is enabled, has <= 8 bits and implements ``encode``."""
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if not isinstance(m, QuantLayerMixin) or q is None or not bool(q.enabled):
            continue
        if not 1 <= int(getattr(q, "bits", 32)) <= 8:
            continue
        try:
            codes, step, offset = q.encode(m.weight)
        except NotImplementedError:
            continue
        if codes.numel() and int(codes.max()) >= 2 ** q.bits:
            raise ValueError(f"{name}: {q.method} produced codes >= 2**{q.bits}")
        yield name, m, codes, step.detach().cpu().clone(), offset.detach().cpu().clone()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class PackedSizeReport:
    """Storage of a model's state (tensor payload only; file headers not counted).

    Attributes:
        full_precision_bytes: bytes of every ``model.state_dict()`` tensor in its dtype.
        packed_bytes: the same with each packed weight counted as its packed codes
            (``ceil(numel*bits/8)``) plus its ``step`` and ``offset`` tensors.
        layers: per packed layer ``(name, numel, bits, weight bytes, packed bytes)``.
    """

    full_precision_bytes: int
    packed_bytes: int
    layers: List[Tuple[str, int, int, int, int]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """full_precision_bytes / packed_bytes."""
        return self.full_precision_bytes / max(self.packed_bytes, 1)


def packed_size_report(model: nn.Module) -> PackedSizeReport:
    """Bytes of ``model``'s state at full precision vs. bit-packed (see PackedSizeReport).

    Args:
        model: a (converted) model.
    Returns:
        a :class:`PackedSizeReport`.
    """
    full = sum(_tensor_bytes(t) for t in model.state_dict().values())
    packed, rows = full, []
    for name, layer, _, step, offset in _encoded_layers(model):
        numel, bits = layer.weight.numel(), layer.weight_quantizer.bits
        wbytes = _tensor_bytes(layer.weight)
        pbytes = math.ceil(numel * bits / 8) + _tensor_bytes(step) + _tensor_bytes(offset)
        packed += pbytes - wbytes
        rows.append((name, numel, bits, wbytes, pbytes))
    return PackedSizeReport(full, packed, rows)


# ---- checkpoint writer / reader ----------------------------------------------------------------
@torch.no_grad()
def save_packed(model: nn.Module, path: str, version: int = VERSION) -> PackedSizeReport:
    """Write ``model`` as a packed checkpoint (format in the module docstring), atomically.

    The file is written to a temporary file in the same directory and moved over ``path``
    with ``os.replace``, so ``path`` is either the old file or the complete new one. Each
    packed layer is checked: if ``decode(encode(w))`` differs from the fake-quantized weight
    (a quantizer breaking its contract) a warning names the layer and the difference.

    Args:
        model: a converted model (float layers are stored as they are).
        path: destination file.
        version: file format, 2 (single blob, default) or 1 (``torch.save`` dict).
    Returns:
        the :class:`PackedSizeReport` of what was written.
    """
    if version not in VERSIONS:
        raise ValueError(f"packed checkpoint version must be one of {VERSIONS}, got {version!r}")
    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {k: v.detach().cpu() for k, v in state.items()}
    packed: Dict[str, Dict[str, Any]] = {}
    for name, layer, codes, step, offset in _encoded_layers(model):
        q = layer.weight_quantizer
        was_training = q.training
        q.eval()  # compare with the inference-time forward (no data initialisation)
        fake = q(layer.weight).detach().cpu()
        q.train(was_training)
        decoded = q.decode(codes.cpu(), step, offset).to(fake.dtype)
        if not torch.equal(decoded, fake):
            logger.warning("%s: decoded weight differs from the fake-quantized one by up to %g",
                           name, float((decoded - fake).abs().max()))
        packed[name] = {
            "data": pack_bits(codes, q.bits), "bits": int(q.bits), "numel": codes.numel(),
            "shape": list(layer.weight.shape), "dtype": str(layer.weight.dtype).replace("torch.", ""),
            "method": str(getattr(q, "method", type(q).__name__)), "step": step, "offset": offset,
        }
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_quantizer.enabled"] = torch.tensor(False)
    blob = {"format": FORMAT, "version": version, "packed": packed, "tensors": tensors,
            "shapes": {k: list(v.shape) for k, v in state.items()}}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".packed-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if version == 1:
                torch.save(blob, f)
            else:
                write_container(f, blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return packed_size_report(model)


def _read(path: str) -> Dict[str, Any]:
    """The checkpoint dict of a version 1 or 2 file (PackedCheckpointError naming ``path``
    for anything else)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if is_container(path):
        try:
            blob = read_container(path)
        except ContainerError as e:
            raise PackedCheckpointError(str(e)) from None
        container = True
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file can fail in many ways inside torch.load
            raise PackedCheckpointError(
                f"{path}: cannot be read as a packed checkpoint (truncated, or neither an aqd_d2 "
                f"container nor a torch file): {type(e).__name__}: {e}"
            ) from None
        container = False
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PackedCheckpointError(f"{path}: not an aqd_d2 packed checkpoint (no format {FORMAT!r})")
    if blob.get("version") != (VERSION if container else 1):
        raise PackedCheckpointError(f"{path}: packed checkpoint version {blob.get('version')!r}; "
                                    f"this aqd_d2 reads versions {VERSIONS}")
    for key in ("packed", "tensors", "shapes"):
        if not isinstance(blob.get(key), dict):
            raise PackedCheckpointError(f"{path}: packed checkpoint lacks its {key!r} section")
    return blob


@torch.no_grad()
def load_packed(model: nn.Module, path: str) -> List[str]:
    """Load a packed checkpoint into a model of the same architecture (converted the same way).

    Packed weights are decoded into the layers' ``weight`` and their weight quantizers are
    disabled (see module docstring), so the model's outputs equal those of the saved
    fake-quantized model. Everything else is loaded with ``load_state_dict(strict=True)``.

    Args:
        model: the model to fill (modified in place).
        path: a file written by :func:`save_packed`.
    Returns:
        names of the layers whose weights were decoded from packed codes.
    Raises:
        PackedCheckpointError: unreadable / truncated / foreign file, or a file written for
            a different architecture (keys, shapes or quantized layers differ).
    """
    blob = _read(path)
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(blob["shapes"]) - set(own))
    unexpected = sorted(set(own) - set(blob["shapes"]))
    shapes = sorted(k for k in set(own) & set(blob["shapes"]) if own[k] != blob["shapes"][k])
    if missing or unexpected or shapes:
        raise PackedCheckpointError(
            f"{path} was written for a different architecture: keys only in the file "
            f"{missing[:5]}, keys only in the model {unexpected[:5]}, shape mismatches "
            f"{[(k, blob['shapes'][k], own[k]) for k in shapes[:5]]}"
        )
    modules = dict(model.named_modules())
    state = dict(blob["tensors"])
    for name, entry in blob["packed"].items():
        layer = modules.get(name)
        if not isinstance(layer, QuantLayerMixin) or layer.weight_quantizer is None:
            raise PackedCheckpointError(f"{path}: packed layer {name!r} is not a quantized layer "
                                        "with a weight quantizer in this model")
        try:
            codes = unpack_bits(entry["data"], entry["bits"], entry["numel"])
        except ValueError as e:
            raise PackedCheckpointError(f"{path}: packed layer {name!r}: {e}") from None
        w = layer.weight_quantizer.decode(codes.view(entry["shape"]), entry["step"], entry["offset"])
        state[f"{name}.weight"] = w.to(getattr(torch, entry["dtype"]))
    model.load_state_dict(state, strict=True)
    return list(blob["packed"])
