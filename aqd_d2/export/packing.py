"""Bit-packed checkpoints of quantized models.

Bit packing of k-bit codes: :mod:`.bitpack` (:func:`pack_bits` / :func:`unpack_bits`).

Packed checkpoint (:func:`save_packed` / :func:`load_packed`). Version 3 (written by default)
and version 2 are single-blob files (:mod:`.container`: magic, one compressed JSON header,
one contiguous byte buffer, sizes and CRC-32s checked on reading); version 1 (still read, and
written with ``save_packed(..., version=1)``) is a ``torch.save`` file read back with
``weights_only=True``. All hold the same dict (loading runs no pickled code)::

    {"format": "aqd_d2.packed_checkpoint", "version": 1, 2 or 3,
     "shapes":  {state_dict key: shape}                 # architecture fingerprint, every key
     "tensors": {state_dict key: tensor}                # everything not packed, as is
     "packed":  {layer name: {"data": uint8 packed codes, "bits", "numel", "shape",
                              "dtype", "method", "step", "offset"}},
     "norms":   {norm name: {"a", "b", "eps", "keys"}}  # version 3 only

Version 3 adds two exact savings:

* ``offset`` may be ``{"neg_step_times": c}`` instead of a tensor, meaning ``offset == step *
  -c`` (float32, bit for bit; checked when saving). Symmetric grids have it: a binary weight
  ``+-alpha`` is ``codes * 2alpha - alpha`` (c = 1/2), a k-bit symmetric grid c = (2^k - 1)/2,
  LSQ's c = 2^(k-1). It saves one float per output channel of every such layer.
* batch norms are stored as their eval-mode affine map ``(a, b)`` (two vectors instead of
  four; ``keys`` lists the state_dict keys they replace) and
  loaded in a form that computes bit-identical outputs (:mod:`.bn_affine`, which checks this
  per norm when saving). "BN folded where exact": folding ``a`` into a binary layer's scale
  would change float rounding, so the norm stays a module. Such a file is for inference
  (loading it for training would treat ``(a, b)`` as ``(gamma, beta)``);
  ``save_packed(..., bn_affine=False)`` keeps the norms' own state.

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
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from aqd_d2.layers import QuantLayerMixin

from .bitpack import pack_bits, unpack_bits
from .bn_affine import affine_norms, check_identity_var, reparam_state
from .container import ContainerError, is_container, read_container, write_container

__all__ = [
    "pack_bits", "unpack_bits", "save_packed", "load_packed", "packed_size_report",
    "PackedSizeReport", "PackedCheckpointError", "FORMAT", "VERSION", "VERSIONS", "entry_offset",
]

logger = logging.getLogger(__name__)

FORMAT = "aqd_d2.packed_checkpoint"
VERSION = 3  # the version save_packed writes; VERSIONS are read
VERSIONS = (1, 2, 3)
_OFFSET_RULE = "neg_step_times"


class PackedCheckpointError(RuntimeError):
    """A file that is not a (complete) aqd_d2 packed checkpoint, or one for another model."""


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


def _offset_rule(step: torch.Tensor, offset: torch.Tensor, bits: int) -> Optional[float]:
    """``c`` with ``offset == step * -c`` bit for bit (version 3's implicit offset), else None."""
    cands = [((1 << bits) - 1) / 2, float(1 << (bits - 1)), 0.0]
    if step.numel() and offset.numel() and float(step.reshape(-1)[0]) != 0:
        # any other half-integer c (e.g. TWN's ternary grid: codes 0, 1, 2 -> c = 1)
        ratio = -2 * float(offset.reshape(-1)[0]) / float(step.reshape(-1)[0])
        if math.isfinite(ratio):
            cands.append(round(ratio) / 2)
    for c in cands:
        cand = step * -c
        if cand.shape == offset.shape and cand.dtype == offset.dtype and torch.equal(cand, offset):
            return c
    return None


def entry_offset(entry: Dict[str, Any]) -> torch.Tensor:
    """The ``offset`` tensor of a ``packed`` entry (explicit, or version 3's implicit rule)."""
    offset = entry["offset"]
    if isinstance(offset, dict):
        return entry["step"] * -float(offset[_OFFSET_RULE])
    return offset


@dataclass
class PackedSizeReport:
    """Storage of a model's state (tensor payload only; file headers not counted).

    Attributes:
        full_precision_bytes: bytes of every ``model.state_dict()`` tensor in its dtype.
        packed_bytes: the same with each packed weight counted as its packed codes
            (``ceil(numel*bits/8)``) plus its ``step`` and (unless implicit) ``offset`` tensors,
            and each norm stored as its affine map (version 3) counted as its two vectors.
        layers: per packed layer ``(name, numel, bits, weight bytes, packed bytes)``.
        norms: per norm stored as its affine map ``(name, channels, bytes, stored bytes)``.
    """

    full_precision_bytes: int
    packed_bytes: int
    layers: List[Tuple[str, int, int, int, int]] = field(default_factory=list)
    norms: List[Tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """full_precision_bytes / packed_bytes."""
        return self.full_precision_bytes / max(self.packed_bytes, 1)


def _check_version(version: int) -> int:
    if version not in VERSIONS:
        raise ValueError(f"packed checkpoint version must be one of {VERSIONS}, got {version!r}")
    return version


def packed_size_report(model: nn.Module, version: int = VERSION, bn_affine: bool = True) -> PackedSizeReport:
    """Bytes of ``model``'s state at full precision vs. bit-packed (see PackedSizeReport).

    Args:
        model: a (converted) model.
        version: the packed format to account for (version 3's savings apply to 3 only).
        bn_affine: version 3: norms stored as their affine map (as :func:`save_packed`).
    Returns:
        a :class:`PackedSizeReport`.
    """
    _check_version(version)
    full = sum(_tensor_bytes(t) for t in model.state_dict().values())
    packed, rows, norms = full, [], []
    for name, layer, _, step, offset in _encoded_layers(model):
        numel, bits = layer.weight.numel(), layer.weight_quantizer.bits
        wbytes = _tensor_bytes(layer.weight)
        implicit = version >= 3 and _offset_rule(step, offset, bits) is not None
        pbytes = math.ceil(numel * bits / 8) + _tensor_bytes(step) + (0 if implicit else _tensor_bytes(offset))
        packed += pbytes - wbytes
        rows.append((name, numel, bits, wbytes, pbytes))
    if version >= 3 and bn_affine:
        for name, norm, a, b in affine_norms(model):
            before = sum(_tensor_bytes(t) for t in reparam_state(norm, a, b).values())
            packed += _tensor_bytes(a) + _tensor_bytes(b) - before
            norms.append((name, a.numel(), before, _tensor_bytes(a) + _tensor_bytes(b)))
    return PackedSizeReport(full, packed, rows, norms)


# ---- checkpoint writer / reader ----------------------------------------------------------------
@torch.no_grad()
def save_packed(model: nn.Module, path: str, version: int = VERSION, bn_affine: bool = True) -> PackedSizeReport:
    """Write ``model`` as a packed checkpoint (format in the module docstring), atomically.

    The file is written to a temporary file in the same directory and moved over ``path``
    with ``os.replace``, so ``path`` is either the old file or the complete new one. Each
    packed layer is checked: if ``decode(encode(w))`` differs from the fake-quantized weight
    (a quantizer breaking its contract) a warning names the layer and the difference.

    Args:
        model: a converted model (float layers are stored as they are).
        path: destination file.
        version: file format, 3 (default), 2 (single blob without version 3's savings) or 1
            (``torch.save`` dict).
        bn_affine: version 3: store batch norms as their eval-mode affine map (an inference
            file; :mod:`.bn_affine`). False keeps their own state.
    Returns:
        the :class:`PackedSizeReport` of what was written.
    """
    _check_version(version)
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
        c = _offset_rule(step, offset, int(q.bits)) if version >= 3 else None
        packed[name] = {
            "data": pack_bits(codes, q.bits), "bits": int(q.bits), "numel": codes.numel(),
            "shape": list(layer.weight.shape), "dtype": str(layer.weight.dtype).replace("torch.", ""),
            "method": str(getattr(q, "method", type(q).__name__)), "step": step,
            "offset": offset if c is None else {_OFFSET_RULE: c},
        }
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_quantizer.enabled"] = torch.tensor(False)
    blob = {"format": FORMAT, "version": version, "packed": packed, "tensors": tensors,
            "shapes": {k: list(v.shape) for k, v in state.items()}}
    if version >= 3:
        norms: Dict[str, Dict[str, Any]] = {}
        for name, norm, a, b in (affine_norms(model) if bn_affine else ()):
            keys = [f"{name}.{k}" if name else k for k in reparam_state(norm, a, b)]
            norms[name] = {"a": a, "b": b, "eps": float(norm.eps), "keys": keys}
            for k in keys:
                del tensors[k]
        blob["norms"] = norms
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".packed-", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask),
        # the mode of detectron2's checkpoints next to it
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
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
    return packed_size_report(model, version, bn_affine)


def _read(path: str) -> Dict[str, Any]:
    """The checkpoint dict of a version 1, 2 or 3 file (PackedCheckpointError naming ``path``
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
    if blob.get("version") not in ((2, 3) if container else (1,)):
        raise PackedCheckpointError(f"{path}: packed checkpoint version {blob.get('version')!r}; "
                                    f"this aqd_d2 reads versions {VERSIONS}")
    for key in ("packed", "tensors", "shapes") + (("norms",) if blob["version"] >= 3 else ()):
        if not isinstance(blob.get(key), dict):
            raise PackedCheckpointError(f"{path}: packed checkpoint lacks its {key!r} section")
    return blob


def _norm_state(path: str, modules: Dict[str, nn.Module], norms: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """State_dict entries of the norms a version 3 file stores as affine maps."""
    state: Dict[str, torch.Tensor] = {}
    for name, e in norms.items():
        norm = modules.get(name)
        if norm is None or not hasattr(norm, "eps"):
            raise PackedCheckpointError(f"{path}: norm {name!r} is not a batch norm of this model")
        if float(norm.eps) != e["eps"]:
            raise PackedCheckpointError(f"{path}: norm {name!r} was saved with eps {e['eps']!r}, "
                                        f"this model's has eps {float(norm.eps)!r}")
        problem = check_identity_var(norm)
        if problem:
            logger.warning("%s: norm %s: %s; its outputs differ from the saved model's at float "
                           "rounding level", path, name, problem)
        local = reparam_state(norm, e["a"], e["b"])
        if sorted(f"{name}.{k}" if name else k for k in local) != sorted(e["keys"]):
            raise PackedCheckpointError(f"{path}: norm {name!r} has state {sorted(local)}, the file "
                                        f"replaced {e['keys']}")
        state.update({f"{name}.{k}" if name else k: v for k, v in local.items()})
    return state


@torch.no_grad()
def load_packed(model: nn.Module, path: str) -> List[str]:
    """Load a packed checkpoint into a model of the same architecture (converted the same way).

    Packed weights are decoded into the layers' ``weight`` and their weight quantizers are
    disabled (see module docstring), and the codes are kept as the layer's
    ``integer_encoding`` (its eval-mode integer form, :mod:`aqd_d2.layers.integer_eval`, uses
    them), so the model's outputs equal those of the saved fake-quantized model. Norms stored as affine maps (version 3) get the state that computes
    the same outputs (:mod:`.bn_affine`). Everything else is loaded with
    ``load_state_dict(strict=True)``.

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
    encodings = {}
    for name, entry in blob["packed"].items():
        layer = modules.get(name)
        if not isinstance(layer, QuantLayerMixin) or layer.weight_quantizer is None:
            raise PackedCheckpointError(f"{path}: packed layer {name!r} is not a quantized layer "
                                        "with a weight quantizer in this model")
        try:
            codes = unpack_bits(entry["data"], entry["bits"], entry["numel"])
        except ValueError as e:
            raise PackedCheckpointError(f"{path}: packed layer {name!r}: {e}") from None
        w = layer.weight_quantizer.decode(codes.view(entry["shape"]), entry["step"], entry_offset(entry))
        state[f"{name}.weight"] = w.to(getattr(torch, entry["dtype"]))
        encodings[name] = (codes.view(entry["shape"]), entry["step"], entry_offset(entry), int(entry["bits"]))
    state.update(_norm_state(path, modules, blob.get("norms", {})))
    model.load_state_dict(state, strict=True)
    for name, (codes, step, offset, bits) in encodings.items():
        # the layer's eval-mode integer form computes with the file's codes, as the trained
        # layer did with its own (aqd_d2.layers.integer_eval)
        dev = modules[name].weight.device
        modules[name].integer_encoding = (codes.to(dev), torch.as_tensor(step).to(dev), torch.as_tensor(offset).to(dev), bits)
    return list(blob["packed"])
