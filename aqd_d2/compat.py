"""The one place that makes a partial or old detectron2 install usable.

aqd_d2 targets detectron2 v0.6 as it installs from the ``pb1-detectron2`` sdist (the only
detectron2 source reachable from a package registry): that build has no compiled
``detectron2._C`` and predates NumPy 1.24, Pillow 10 and setuptools 81. Each shim below

* is documented with the detectron2 code it serves,
* checks whether the installed detectron2 actually needs it and does nothing otherwise
  (a full source build of detectron2 master imports aqd_d2 untouched), and
* changes nothing outside detectron2: no alias is added to NumPy, Pillow or ``sys.modules``
  for other libraries to see.

:func:`apply` is idempotent and is called by ``aqd_d2/__init__.py`` before any detectron2
submodule is imported. :data:`APPLIED` lists what it did (shown by ``tools/run.py info``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import types
from typing import List

import numpy as np

__all__ = ["apply", "APPLIED", "MissingCompiledOpError", "has_compiled_ops"]

logger = logging.getLogger(__name__)

#: Names of the shims that :func:`apply` installed in this process.
APPLIED: List[str] = []


class MissingCompiledOpError(RuntimeError):
    """Raised when code reaches an op that lives only in detectron2's compiled ``_C``."""


# --------------------------------------------------------------------------------------
# 1. detectron2._C stand-in
# --------------------------------------------------------------------------------------
# detectron2/layers/{deform_conv,rotated_boxes,roi_align_rotated}.py and
# evaluation/fast_eval_api.py do ``from detectron2 import _C`` at module level, so without
# the compiled extension even ``import detectron2.layers`` fails. The stand-in lets every
# module import; any attribute access (i.e. any real use of a C++ op: deformable conv,
# rotated boxes / NMS / ROIAlign, the fast COCOeval) raises MissingCompiledOpError naming
# the op, so nothing ever computes silently wrong numbers.
_OP_FEATURES = {
    "deform_conv": "deformable convolution (DeformConv / ModulatedDeformConv)",
    "modulated_deform_conv": "deformable convolution (DeformConv / ModulatedDeformConv)",
    "box_iou_rotated": "rotated boxes (pairwise_iou_rotated)",
    "nms_rotated": "rotated boxes (batched_nms_rotated)",
    "roi_align_rotated": "rotated boxes (ROIAlignRotated)",
    "COCOeval": "the fast C++ COCOeval (use COCOEvaluator(..., use_fast_impl=False))",
}


class _MissingCompiledOps(types.ModuleType):
    """Module object standing in for ``detectron2._C``; every op lookup raises."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        feature = next(
            (f for key, f in _OP_FEATURES.items() if name.lower().startswith(key.lower())),
            "a compiled detectron2 op",
        )
        raise MissingCompiledOpError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its "
            f"compiled C++/CUDA extension, which {feature} needs. aqd_d2's detectors do not use "
            "it; to use this op, build detectron2 from its full source tree with the extension."
        )


def has_compiled_ops() -> bool:
    """True when detectron2's real compiled extension is importable."""
    mod = sys.modules.get("detectron2._C")
    if mod is not None:
        return not isinstance(mod, _MissingCompiledOps)
    return importlib.util.find_spec("detectron2._C") is not None


def _shim_compiled_ops() -> None:
    import detectron2  # light: its __init__ only sets up the environment

    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2._C") is not None:
        return
    stand_in = _MissingCompiledOps(
        "detectron2._C", "aqd_d2 stand-in: detectron2 was built without its C++ ops"
    )
    # Build-information queries (detectron2.utils.collect_env, printed by default_setup)
    # get honest answers instead of errors.
    stand_in.get_compiler_version = lambda: "none: detectron2 built without its C++ ops"
    stand_in.get_cuda_version = lambda: "none: detectron2 built without its C++ ops"
    stand_in.has_cuda = lambda: False
    sys.modules["detectron2._C"] = stand_in
    detectron2._C = stand_in
    # layers/nms.py reaches the rotated NMS through torch.ops.detectron2 (registered by _C),
    # which would fail with a bare "_OpNamespace has no attribute" error.
    nms = importlib.import_module("detectron2.layers.nms")
    layers = importlib.import_module("detectron2.layers")

    def nms_rotated(boxes, scores, iou_threshold):
        return stand_in.nms_rotated

    nms_rotated.__doc__ = nms.nms_rotated.__doc__
    nms.nms_rotated = nms_rotated
    if hasattr(layers, "nms_rotated"):
        layers.nms_rotated = nms_rotated
    APPLIED.append("detectron2._C stand-in (compiled ops raise MissingCompiledOpError)")


# --------------------------------------------------------------------------------------
# 2. Pillow >= 10 removed Image.LINEAR
# --------------------------------------------------------------------------------------
# detectron2/data/transforms/transform.py uses ``interp=Image.LINEAR`` as a default
# argument, evaluated when the module is imported. We provide the name only while that
# module is imported (Image.LINEAR was an alias of Image.BILINEAR) and take it away again.
def _module_source_matches(name: str, pattern: "re.Pattern[str]") -> bool:
    """Whether the installed source of module ``name`` contains ``pattern`` (False when the
    module or its source is missing): how a shim decides that this detectron2 needs it."""
    import os

    import detectron2  # light; find_spec(name) would import the parent packages

    parts = name.split(".")
    assert parts[0] == "detectron2", name
    for root in detectron2.__path__:
        path = os.path.join(root, *parts[1:]) + ".py"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return bool(pattern.search(f.read()))
    return False


_PIL_LINEAR = re.compile(r"\bImage\.LINEAR\b")


def _shim_pillow_linear() -> None:
    from PIL import Image

    if "detectron2.data.transforms.transform" in sys.modules or hasattr(Image, "LINEAR"):
        return
    if not _module_source_matches("detectron2.data.transforms.transform", _PIL_LINEAR):
        return  # this detectron2 (main since 2023) no longer uses the name
    Image.LINEAR = Image.BILINEAR
    try:
        importlib.import_module("detectron2.data.transforms.transform")
    finally:
        del Image.LINEAR
    APPLIED.append("PIL.Image.LINEAR for detectron2.data.transforms (import time only)")


# --------------------------------------------------------------------------------------
# 3. setuptools >= 81 removed pkg_resources
# --------------------------------------------------------------------------------------
# detectron2/model_zoo/model_zoo.py imports pkg_resources for ``resource_filename``. We give
# that one module a minimal replacement with the same function; sys.modules is restored.
def _resource_filename(package: str, resource: str) -> str:
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} not found")
    return os.path.join(list(spec.submodule_search_locations)[0], resource)


_PKG_RESOURCES = re.compile(r"^\s*import pkg_resources\b", re.M)


def _shim_pkg_resources() -> None:
    if "detectron2.model_zoo.model_zoo" in sys.modules:
        return
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    if not _module_source_matches("detectron2.model_zoo.model_zoo", _PKG_RESOURCES):
        return
    stub = types.ModuleType("pkg_resources", "aqd_d2 stand-in for detectron2.model_zoo")
    stub.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = stub
    try:
        importlib.import_module("detectron2.model_zoo.model_zoo")
    finally:
        del sys.modules["pkg_resources"]
    APPLIED.append("pkg_resources.resource_filename for detectron2.model_zoo")


# --------------------------------------------------------------------------------------
# 4. NumPy >= 1.24 removed np.int / np.float / np.str / np.object / np.complex
# --------------------------------------------------------------------------------------
# detectron2 v0.6 uses them in data/build.py (the class histogram every train loader
# prints), data/datasets/pascal_voc.py, evaluation/pascal_voc_evaluation.py,
# evaluation/sem_seg_evaluation.py, structures/masks.py and utils/(video_)visualizer.py.
# Instead of adding the aliases to NumPy for everybody, each of those modules gets a view
# of NumPy that also has the removed names (with their historic meaning: the builtins).
_LEGACY_NUMPY_NAMES = {"int": int, "float": float, "str": str, "object": object,
                       "complex": complex, "bool": bool}
_LEGACY_NUMPY_MODULES = (
    "detectron2.data.build",
    "detectron2.data.datasets.pascal_voc",
    "detectron2.evaluation.pascal_voc_evaluation",
    "detectron2.evaluation.sem_seg_evaluation",
    "detectron2.structures.masks",
    "detectron2.utils.visualizer",
    "detectron2.utils.video_visualizer",
)


class _NumpyWithLegacyAliases(types.ModuleType):
    """Delegates to numpy; adds the aliases NumPy 1.24 removed."""

    def __init__(self, missing: dict):
        super().__init__("numpy", "numpy with pre-1.24 aliases, for detectron2 v0.6 only")
        self.__dict__.update(missing)

    def __getattr__(self, name: str):
        return getattr(np, name)


def _missing_numpy_names() -> dict:
    import warnings

    missing = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, value in _LEGACY_NUMPY_NAMES.items():
            try:
                getattr(np, name)
            except AttributeError:
                missing[name] = value
    return missing


def _shim_numpy_aliases() -> None:
    missing = _missing_numpy_names()
    if not missing:
        return
    pattern = re.compile(r"\bnp\.(%s)\b(?!_)" % "|".join(missing))
    proxy = _NumpyWithLegacyAliases(missing)
    patched = []
    for name in _LEGACY_NUMPY_MODULES:
        if not _module_source_matches(name, pattern):
            continue  # this detectron2 no longer uses the removed names here
        module = importlib.import_module(name)
        if getattr(module, "np", None) is np:
            module.np = proxy
            patched.append(name.rsplit(".", 1)[-1])
    if patched:
        APPLIED.append("NumPy < 1.24 aliases in " + ", ".join(patched))


# --------------------------------------------------------------------------------------
# 5. create_ddp_model on CPU
# --------------------------------------------------------------------------------------
# detectron2's create_ddp_model (used by DefaultTrainer) passes device_ids=[local_rank],
# which DistributedDataParallel rejects for a module on the CPU. For CPU modules we pass
# device_ids=None (what DDP expects there); CUDA modules are untouched.
def _shim_cpu_ddp() -> None:
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_aqd_cpu_aware", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        from detectron2.utils import comm

        if comm.get_world_size() > 1 and "device_ids" not in kwargs:
            try:
                on_cpu = next(model.parameters()).device.type == "cpu"
            except StopIteration:
                on_cpu = False
            if on_cpu:
                from torch.nn.parallel import DistributedDataParallel

                return DistributedDataParallel(model, device_ids=None, **kwargs)
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._aqd_cpu_aware = True
    create_ddp_model.__doc__ = original.__doc__
    defaults.create_ddp_model = create_ddp_model
    APPLIED.append("create_ddp_model: device_ids=None for CPU modules")


# --------------------------------------------------------------------------------------
# 0. torch version (setup.py does not pin torch: it is the user's, see setup.py)
# --------------------------------------------------------------------------------------
MIN_TORCH = (2, 0)


def _check_torch() -> None:
    import torch

    found = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if found < MIN_TORCH:
        raise ImportError(
            f"aqd_d2 needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}; "
            "upgrade torch (and rebuild detectron2 against it)")


_DONE = False


def apply() -> List[str]:
    """Install every shim the installed detectron2 needs (idempotent).

    Returns:
        the list :data:`APPLIED` of shims active in this process.
    """
    global _DONE
    if _DONE:
        return APPLIED
    _check_torch()
    _shim_compiled_ops()
    _shim_pillow_linear()
    _shim_pkg_resources()
    _shim_numpy_aliases()
    _shim_cpu_ddp()
    _DONE = True
    for line in APPLIED:
        logger.debug("aqd_d2.compat: %s", line)
    return APPLIED
