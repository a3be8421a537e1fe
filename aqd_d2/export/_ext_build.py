"""Build and load the C++ extension (sources in ``aqd_d2/export/csrc``): the binary convolution
(``binary_conv.cpp`` + ``kernels_*.cpp``) and the fused multi-level ROIAlign (``roi_align*.cpp``,
:mod:`aqd_d2.export.roi_pooler`), one library whose ops live in ``torch.ops.aqd_binary``.

The extension is compiled with ``torch.utils.cpp_extension.load`` (JIT, ninja) the first time
it is needed, or ahead of time by :func:`build_extension` (called by ``tools/bootstrap.py``),
once per combination of source contents, torch version, Python version, machine type and
compiler flags; later processes load the built library directly, without a compiler.

Build directory (first that applies): ``$AQD_D2_EXT_DIR``; ``<repo>/build/aqd_d2_ext`` when
aqd_d2 runs from a source checkout (the repository's ignored ``build/`` folder); else
``$XDG_CACHE_HOME/aqd_d2/ext`` (default ``~/.cache/aqd_d2/ext``). Each build lives in a
subfolder named by the fingerprint above, so a changed source or torch never loads a stale
library; a ``BUILD_OK`` stamp marks a finished build, a ``BUILD_FAILED`` note a failed one
(later processes then use the PyTorch fallback at once; :func:`build_extension` retries).

Flags: ``-O3 -fopenmp -ffp-contract=off`` and no global ``-m`` flags. The instruction-set
variants (generic, popcnt, avx2, avx512) carry function-level target attributes and the
CPU's features select one at run time (``csrc/binary_conv.h``). So a build never executes an
instruction the CPU lacks (safe in a shared cache), and every variant the CPU supports can
be tested in one process. ``-ffp-contract=off`` keeps ``dot * alpha + bias`` as a multiply
and an add (no FMA), the rounding torch's float32 composition has. OpenMP comes from torch's
own ``libgomp`` (same soname), so ``torch.set_num_threads`` controls the kernel too.

Nothing here imports the rest of aqd_d2.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = [
    "LIBRARY_NAME",
    "OPS_NAMESPACE",
    "build_directory",
    "build_extension",
    "extension_error",
    "is_built",
    "load_extension",
    "source_files",
]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "aqd_d2_binary_conv"
OPS_NAMESPACE = "aqd_binary"  # torch.ops.aqd_binary.{conv2d, pack_input, available_isas, roi_align_*}
CSRC = Path(__file__).resolve().parent / "csrc"
_STAMP = "BUILD_OK"
_FAILED = "BUILD_FAILED"


def _is_msvc() -> bool:
    return os.name == "nt"


def compile_flags() -> Tuple[List[str], List[str]]:
    """``(cflags, ldflags)`` passed to the compiler and linker."""
    if _is_msvc():
        return ["/O2", "/openmp", "/fp:precise"], []
    return ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"]


def source_files() -> List[Path]:
    """The translation units of the extension (headers and ``.inc`` bodies are not listed)."""
    return sorted(CSRC.glob("*.cpp"))


def _fingerprint() -> str:
    import torch

    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h", ".inc"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    cflags, ldflags = compile_flags()
    for part in (torch.__version__, sys.version, platform.machine(), " ".join(cflags + ldflags)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _default_root() -> Path:
    env = os.environ.get("AQD_D2_EXT_DIR")
    if env:
        return Path(env).expanduser()
    repo = CSRC.parents[2]  # aqd_d2/export/csrc -> repository root in a source checkout
    if (repo / "setup.py").is_file() and os.access(repo, os.W_OK):
        return repo / "build" / "aqd_d2_ext"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "aqd_d2" / "ext"


def build_directory() -> Path:
    """The folder holding (or about to hold) this fingerprint's build."""
    return _default_root() / f"{LIBRARY_NAME}-{_fingerprint()}"


def _library_file(folder: Path) -> Path:
    suffix = ".pyd" if _is_msvc() else ".so"
    return folder / f"{LIBRARY_NAME}{suffix}"


def is_built() -> bool:
    """True when this fingerprint's library is already compiled (loading needs no compiler)."""
    folder = build_directory()
    return (folder / _STAMP).is_file() and _library_file(folder).is_file()


@functools.lru_cache(maxsize=None)
def _load_once() -> Tuple[bool, Optional[str]]:
    """Build if needed, then load into ``torch.ops``: ``(ok, error message)``. Runs once per
    process (loading the library twice would register its ops twice). A failed build leaves a
    ``BUILD_FAILED`` note, so later processes fall back at once instead of recompiling;
    :func:`build_extension` retries."""
    import torch

    failed = None
    try:
        if not source_files():
            raise FileNotFoundError(f"no C++ sources in {CSRC} (installed without package data?)")
        folder = build_directory()
        failed = folder / _FAILED
        if failed.is_file():
            err = failed.read_text()
            _warn_unavailable(err)
            return False, err
        lib = _library_file(folder)
        if is_built():
            torch.ops.load_library(str(lib))
        else:
            from torch.utils import cpp_extension

            folder.mkdir(parents=True, exist_ok=True)
            cflags, ldflags = compile_flags()
            start = time.perf_counter()
            # cpp_extension holds a file lock on the folder: concurrent first uses build once.
            cpp_extension.load(
                name=LIBRARY_NAME,
                sources=[str(p) for p in source_files()],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(folder),
                is_python_module=False,
            )
            elapsed = time.perf_counter() - start
            (folder / _STAMP).write_text(f"built in {elapsed:.1f} s\n")
            logger.info("built %s in %.1f s", lib, elapsed)
        return True, None
    except Exception as exc:  # no compiler, no ninja, a compile error: callers fall back
        err = f"{type(exc).__name__}: {exc}"
        try:
            if failed is not None and failed.parent.is_dir():
                failed.write_text(err)
        except OSError:
            pass
        _warn_unavailable(err)
        return False, err


def _warn_unavailable(err: str) -> None:
    first = err.strip().splitlines()[0] if err.strip() else "unknown error"
    logger.warning(
        "aqd_d2 binary conv extension unavailable, using the PyTorch fallback (%s%s). Retry "
        "with: python -c 'from aqd_d2.export._ext_build import build_extension; "
        "build_extension(verbose=True)'", first[:300], " ..." if len(first) > 300 else "")


def load_extension() -> bool:
    """Build (first use, about 20 s) and load the extension; True when its ops are usable.
    Never raises: a failure is logged once and reported by :func:`extension_error`."""
    return _load_once()[0]


def extension_error() -> Optional[str]:
    """Why the extension could not be built or loaded; None when it loaded (tries to load it)."""
    return _load_once()[1]


def build_extension(verbose: bool = False) -> bool:
    """Compile (if not yet built) and load the extension; for setup scripts. Retries a build
    that failed before (in this or an earlier process).

    Args:
        verbose: print the build folder, the time taken and the outcome.
    Returns:
        True on success. On failure the reason is printed (verbose) / logged and False is
        returned: :mod:`aqd_d2.export.binary_conv` then uses its PyTorch fallback.
    """
    if not _load_once.cache_info().currsize or not _load_once()[0]:
        # never tried, or failed: forget the failure and try (again)
        if source_files():
            (build_directory() / _FAILED).unlink(missing_ok=True)
        _load_once.cache_clear()
    built = is_built()
    if verbose and not built:
        print(f"[aqd_d2] compiling the binary conv extension in {build_directory()} ...", flush=True)
    start = time.perf_counter()
    ok = load_extension()
    if verbose:
        if ok:
            what = "loaded" if built else f"built in {time.perf_counter() - start:.0f} s"
            print(f"[aqd_d2] binary conv extension {what}: {_library_file(build_directory())}")
        else:
            print(f"[aqd_d2] binary conv extension NOT available; binary convolutions use the "
                  f"slower PyTorch fallback. Reason:\n{extension_error()}")
    return ok
