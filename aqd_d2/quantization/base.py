"""The quantizer interface every method of aqd_d2 implements (pure PyTorch).

A quantizer is an ``nn.Module`` mapping a float tensor to its *fake-quantized* value: a
float tensor of the same shape whose entries take at most ``2**bits`` distinct values (per
scale group), with a straight-through style backward. All state (learned intervals, step
sizes, running scales, the on/off flag, the "initialised from data" flag) lives in
parameters and buffers, so checkpoints and DDP carry it.

Contract for subclasses:

* ``quantize(x)`` returns the fake-quantized tensor (called only while enabled).
* ``encode(x)`` returns ``(codes, step, offset)`` with integer ``codes`` in
  ``[0, 2**bits - 1]`` (``uint8``) and ``step`` / ``offset`` float tensors broadcastable
  to ``x`` such that ``codes * step + offset`` equals ``quantize(x)`` (bit-packed export
  stores exactly these three things; ``decode`` is their inverse).
* ``padding_value``: the value the layer must use to pad the *quantized* input of a conv.
  Zero for methods whose grid contains 0; binary activation methods pad with -1, because
  0 is not a binary value (the bit-packed kernels store padding as bit 0 = -1).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .functional import QuantKernel, fake_quantize

__all__ = ["Quantizer", "validate_bits", "clear_weight_caches"]


def validate_bits(method: str, bits: int, allowed: Tuple[int, ...]) -> int:
    """``bits`` as int if it is in ``allowed``, else ValueError naming method and choices."""
    try:
        ok = not isinstance(bits, bool) and int(bits) == bits and int(bits) in allowed
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"quantizer {method!r} supports bits in {list(allowed)}, got {bits!r}"
        )
    return int(bits)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean of ``t`` over the default process group (no-op when not distributed).

    Used for statistics computed from data at initialisation: every rank sees a different
    batch, and the learned parameters must start identical on all ranks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def _stamp(t: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """``(t, its version counter, its data pointer)``: what identifies the *value* of ``t`` for
    the weight cache. RuntimeError for tensors without a version counter (inference tensors)."""
    return t, t._version, t.data_ptr()


def _same(stamp: Tuple[torch.Tensor, int, int], t: torch.Tensor) -> bool:
    return stamp[0] is t and stamp[1] == t._version and stamp[2] == t.data_ptr()


class CachedWeight:
    """One fake-quantized weight and the exact inputs it was computed from (immutable).

    ``y`` is the quantized tensor a layer op uses, ``state`` what the kernel's backward needs
    (:meth:`~.functional.QuantKernel.forward_with_state`; only if ``has_state``). Valid
    while :meth:`Quantizer.cached_weight` finds every stamp unchanged.
    """

    __slots__ = ("x", "shape", "params", "kernel", "key", "inference", "y", "state", "has_state")

    def __init__(self, x, params, kernel, key, y, state, has_state):
        self.x = _stamp(x)
        self.shape = x.shape
        self.params = tuple(_stamp(p) for p in params)
        self.kernel = kernel
        self.key = key
        self.inference = torch.is_inference_mode_enabled()
        self.y = y
        self.state = state
        self.has_state = has_state


def clear_weight_caches(module: nn.Module) -> int:
    """Drop the cached quantized weight of every quantizer in ``module`` (and every quantized
    layer's eval-mode integer plan); returns how many were held. Needed only after a write the version counters do not see (see
    :meth:`Quantizer.cached_weight`): e.g. ``p.data.copy_(...)`` or a raw ``dist.broadcast``
    into a weight or a quantizer parameter."""
    n = 0
    for m in module.modules():
        if isinstance(m, Quantizer):
            n += m._wcache is not None
            m._wcache = None
        # a quantized layer's eval-mode integer plan (aqd_d2.layers.integer_eval) is another
        # cache of the same state
        n += m.__dict__.pop("_integer_plan", None) is not None
    return n


class Quantizer(nn.Module):
    """Base class of all quantizers.

    Args:
        bits: bit width k (1 for binary methods, 32 for full precision); validated against
            the class attribute ``allowed_bits``.
        role: ``"weight"`` or ``"activation"``; methods may differ per role.

    Buffers:
        enabled (bool scalar): when False, ``forward`` is the identity. Flipped by
            :meth:`set_enabled` (stage-wise binarization and teacher warm-up use it) and
            saved in checkpoints.
        initialized (bool scalar, only for ``needs_init`` methods): False until the first
            forward in training mode has set the learned range from data; saved in
            checkpoints, so a trained model never re-initialises and a float checkpoint
            (which lacks the key) triggers initialisation.

    Subclasses set ``kernel`` (a :class:`QuantKernel`) in ``__init__`` and return its
    parameters from :meth:`quant_params`; ``quantize``/``encode`` are then generic.
    """

    #: registry name of the method, set by the registry decorator
    method: str = "base"
    #: roles this method supports
    roles: Tuple[str, ...] = ("weight", "activation")
    #: bit widths this method supports (checked in __init__)
    allowed_bits: Tuple[int, ...] = tuple(range(1, 33))
    #: True for methods whose range is initialised from the first training batch
    needs_init: bool = False
    #: (activation quantizers) ask the layer for XNOR's activation scale K; XNORQuantizer
    #: sets it per instance. A class default, so layers read it without a failed lookup.
    scale_activations: bool = False
    #: (activation quantizers) eval-mode integer arithmetic of the layer this quantizer feeds
    #: (aqd_d2.layers.integer_eval): "auto" on CPU tensors, "on" on any device, "off" never.
    #: Set from MODEL.QUANT.INTEGER_EVAL; a runtime choice, not checkpointed.
    integer_eval: str = "auto"

    def __init__(self, bits: int, role: str = "weight"):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"quantizer role must be 'weight' or 'activation', got {role!r}")
        if role not in self.roles:
            raise ValueError(
                f"quantizer {self.method!r} cannot quantize {role}s (supports {self.roles})"
            )
        self.bits = validate_bits(self.method, bits, self.allowed_bits)
        self.role = role
        self.kernel: Optional[QuantKernel] = None
        #: "auto": fused Triton kernels on CUDA tensors (aqd_d2.quantization.triton_ops),
        #: "off": always the eager kernels, "force": Triton on any tensor (CPU tensors need
        #: TRITON_INTERPRET=1; for tests). A runtime choice, not state: not checkpointed.
        #: Set from MODEL.QUANT.FUSED_KERNELS; change it with :meth:`set_fused_kernels`.
        self.fused_kernels = "auto"
        # Host copies of the bool buffers: name -> (buffer tensor, its _version, value).
        # Reading a CUDA bool is a device->host sync; the copy is reused while the buffer
        # object and its version counter are unchanged (any in-place write, e.g. fill_,
        # load_state_dict's copy_ or a DDP buffer broadcast, bumps the version; .to() makes
        # a new tensor, see _apply), so a training step reads nothing from the device.
        self._host_flags: Dict[str, Tuple[torch.Tensor, int, bool]] = {}
        # The last fake-quantized weight (weight quantizers), see cached_weight.
        self._wcache: Optional[CachedWeight] = None
        self.register_buffer("enabled", torch.tensor(True))
        if self.needs_init:
            self.register_buffer("initialized", torch.tensor(False))

    # ---- state -------------------------------------------------------------------------
    def _remember_flag(self, name: str, value: bool) -> None:
        t = self._buffers[name]
        try:
            self._host_flags[name] = (t, t._version, bool(value))
        except RuntimeError:  # inference tensors have no version counter: nothing cached
            self._host_flags.pop(name, None)

    def _host_flag(self, name: str) -> bool:
        """``bool(buffer)`` without touching the device while the host copy is current."""
        t = self._buffers[name]
        cached = self._host_flags.get(name)
        if cached is not None and cached[0] is t:
            try:
                if cached[1] == t._version:
                    return cached[2]
            except RuntimeError:
                pass
        value = bool(t)
        self._remember_flag(name, value)
        return value

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the buffers by converted copies holding the same
        # truth values: carry current host copies over instead of reading them back.
        known = {}
        for n, (t, version, value) in list(self._host_flags.items()):
            try:
                if self._buffers.get(n) is t and t._version == version:
                    known[n] = value
            except RuntimeError:
                pass
        self._wcache = None
        out = super()._apply(fn, *args, **kwargs)
        for n, v in known.items():
            if self._buffers.get(n) is not None and self._buffers[n].dtype == torch.bool:
                self._remember_flag(n, v)
        return out

    def set_enabled(self, flag: bool) -> None:
        """Switch quantization on (True) or make this quantizer the identity (False)."""
        self.enabled.fill_(bool(flag))
        self._remember_flag("enabled", bool(flag))
        self._wcache = None

    # ---- cached quantized weight -------------------------------------------------------
    def cached_weight(self, kernel, x: torch.Tensor, params: Tuple[torch.Tensor, ...], key,
                      want_state: bool) -> Optional[CachedWeight]:
        """The cached fake-quantized ``x`` if it was computed by ``kernel`` from this very
        ``x`` and ``params`` with their current values, for the same ``key`` (the output dtype
        the caller asks for), else None.

        "Current values": each tensor is the same object, with the same version counter and
        data pointer as when the entry was made. PyTorch bumps a tensor's version counter on
        every in-place write to it or to any view or ``detach()`` of it, whether or not grad
        mode is on: optimizer steps, ``load_state_dict``, ``copy_`` / ``fill_`` under
        ``no_grad``, inference mode, DDP's buffer broadcast; ``.to()`` / ``.cuda()`` and
        parameter re-assignment make new objects. Not seen (as autograd's own saved-tensor
        check does not see them): writes through ``.data`` or other aliases that do not share
        the version counter (numpy views, DLPack, a raw ``dist.broadcast``); call
        :func:`clear_weight_caches` after those. Besides, the entry is dropped by
        ``train()`` / ``eval()``, ``.to()``, ``load_state_dict``, :meth:`set_enabled`,
        :meth:`set_fused_kernels` and data initialisation. (The enabled / initialized flags
        need no key: a disabled quantizer never reaches the cache, and initialisation acts
        on the result only through ``params``.)

        Args:
            kernel: the kernel about to run (eager or fused: distinct objects).
            x, params: its inputs.
            key: anything hashable the result also depends on (output dtype).
            want_state: the caller needs the kernel's backward state too.
        """
        e = self._wcache
        if (e is None or e.kernel is not kernel or e.key != key or (want_state and not e.has_state)
                or len(params) != len(e.params)):
            return None
        try:
            if not _same(e.x, x) or e.shape != x.shape:
                return None
            for stamp, p in zip(e.params, params):
                if not _same(stamp, p):
                    return None
        except RuntimeError:  # a tensor without version counter
            return None
        if e.inference != torch.is_inference_mode_enabled():
            return None
        return e

    def cache_weight(self, kernel, x: torch.Tensor, params: Tuple[torch.Tensor, ...], key,
                     y: torch.Tensor, state, has_state: bool) -> None:
        """Remember ``y`` (and ``state``) as the fake-quantized ``x`` (see :meth:`cached_weight`).
        Memory: one tensor of the weight's size in ``y``'s dtype (plus, on CPU/eager kernels
        with ``has_state``, the kernel's backward state, e.g. one more weight-sized tensor
        for LIQ). Nothing is cached for tensors without version counter."""
        try:
            self._wcache = CachedWeight(x, params, kernel, key, y, state, has_state)
        except RuntimeError:
            self._wcache = None

    def train(self, mode: bool = True):
        self._wcache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._wcache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_wcache"] = None  # copies and pickles never carry the cache
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_wcache", None)  # pickled before the cache existed

    @property
    def is_enabled(self) -> bool:
        return self._host_flag("enabled")

    def set_fused_kernels(self, mode: str) -> None:
        """``"auto"`` / ``"off"`` / ``"force"``, see ``fused_kernels`` in ``__init__``."""
        if mode not in ("auto", "off", "force"):
            raise ValueError(f"fused_kernels must be 'auto', 'off' or 'force', got {mode!r}")
        self.fused_kernels = mode
        self._wcache = None

    def set_integer_eval(self, mode: str) -> None:
        """``"auto"`` / ``"on"`` / ``"off"``, see ``integer_eval``."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"integer_eval must be 'auto', 'on' or 'off', got {mode!r}")
        self.integer_eval = mode

    def kernel_for(self, x: torch.Tensor) -> Optional[QuantKernel]:
        """The kernel that quantizes ``x``: the Triton one where ``fused_kernels`` and the
        device allow it (see :mod:`.triton_ops`), else the eager ``self.kernel``."""
        mode, kernel = self.fused_kernels, self.kernel
        if kernel is None or mode == "off":
            return kernel
        cuda = x.device.type == "cuda"
        if not cuda and mode != "force":
            return kernel
        choice = self.__dict__.get("_cuda_kernel")
        if cuda and choice is not None and choice[0] is kernel and choice[1] == mode and x.numel():
            return choice[2]  # (on CUDA the choice depends on nothing else)
        from .triton_ops import fused_kernel  # imports Triton: only when it may be used

        chosen = fused_kernel(kernel, x, mode) or kernel
        if cuda and x.numel():
            self._cuda_kernel = (kernel, mode, chosen)
        return chosen

    @property
    def is_binary(self) -> bool:
        return self.bits == 1

    @property
    def num_levels(self) -> int:
        """Number of distinct output values per scale group (2**bits)."""
        return 2 ** self.bits

    @property
    def padding_value(self) -> float:
        """Value to pad the *quantized* input of a conv with: 0 for grids containing 0;
        binary activation methods return -1 (see module docstring). Independent of
        ``enabled``: a layer with a disabled input quantizer pads with 0 itself."""
        return 0.0

    def quant_params(self) -> Tuple[torch.Tensor, ...]:
        """The tensors passed to ``self.kernel`` (e.g. ``(alpha,)``); empty by default."""
        return ()

    # ---- data-driven initialisation ----------------------------------------------------
    def initialize(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Set the learned range from ``x`` (called under no_grad, once)."""
        raise NotImplementedError

    def maybe_initialize(self, x: torch.Tensor) -> None:
        """Run :meth:`initialize` on the first training-mode call (then mark initialised).

        In eval mode an uninitialised quantizer keeps its constructor defaults.
        Initialised values are averaged across DDP ranks.
        """
        if not (self.needs_init and self.training) or x.numel() == 0 or self._host_flag("initialized"):
            return
        with torch.no_grad():
            self.initialize(x.detach())
            for p in self.quant_params():
                all_reduce_mean_(p.data)  # (no version bump: the cache is dropped below)
            self.initialized.fill_(True)
        self._remember_flag("initialized", True)
        self._wcache = None

    # ---- computation -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_enabled:
            return x
        return self.quantize(x)

    def prepare(self, x: torch.Tensor) -> Optional[Tuple[QuantKernel, Tuple[torch.Tensor, ...]]]:
        """For fused ops: ``None`` when disabled, else run due initialisation on ``x`` and
        return ``(kernel, params)`` so that ``kernel.forward(x, *params) == self(x)``."""
        if not self.is_enabled:
            return None
        self.maybe_initialize(x)
        return self.kernel_for(x), self.quant_params()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any shape) as one autograd node; same shape and dtype
        (half-precision inputs are quantized in float32, see :func:`.functional.widen`)."""
        self.maybe_initialize(x)
        return fake_quantize(self.kernel_for(x), x, *self.quant_params())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer form of ``quantize(x)``.

        Returns:
            codes: ``uint8`` tensor shaped like ``x``, values in ``[0, 2**bits - 1]``.
            step, offset: float tensors broadcastable to ``x`` (per-channel methods: shape
                ``(C_out, 1, ..., 1)``; per-tensor: shape ``()``), such that
                ``decode(codes, step, offset)`` equals ``quantize(x)`` exactly.
        """
        if self.kernel is None:
            raise NotImplementedError(f"quantizer {self.method!r} has no integer encoding")
        params = tuple(p.detach() for p in self.quant_params())
        codes, step, offset = self.kernel.grid(x.detach(), *params)
        if offset is None:
            offset = torch.zeros_like(step)
        return codes.to(torch.uint8), step, offset

    @staticmethod
    def decode(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``codes * step + offset`` in ``step``'s dtype (the same
        two operations the forward performs, hence bit-exact)."""
        return codes.to(step.dtype) * step + offset

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, role={self.role}"
