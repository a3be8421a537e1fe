#!/usr/bin/env python3
"""Create or update the project's virtual environment; a quick no-op when it is current.

Needs only Python >= 3.9 and access to PyPI. Steps (each skipped when already done):
1. ``python -m venv .venv`` (path: ``$AQD_VENV`` or ``<repo>/.venv``);
2. ``pip install -r tools/requirements.txt`` (torch 2.14.1 / torchvision 0.29.1, fvcore, ...);
3. detectron2 v0.6: PyPI has no ``detectron2`` distribution; the reachable source is the
   ``pb1-detectron2==0.6`` sdist (the official v0.6 tree without its C++ sources). We download
   it, build a wheel with an empty extension list (``aqd_d2.compat`` stands in for the
   missing ``detectron2._C``), and install it without its dependency pins (step 2 installed
   them, except ``black``/``future``/``pydot``, which only LazyConfig saving and caffe2 need);
4. ``pip install -e .`` (aqd_d2 itself);
5. the bit-packed binary convolution extension (C++ / OpenMP, aqd_d2/export/csrc), compiled
   once into ``build/`` (a pure-PyTorch fallback is used where no compiler exists).
A stamp file in the venv records a hash of the inputs; when it matches and the imports work,
nothing is run again. Stdlib only: this script runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("AQD_VENV", REPO / ".venv"))
REQUIREMENTS = REPO / "tools" / "requirements.txt"
DETECTRON2_SDIST = "pb1-detectron2==0.6"
STAMP = VENV / ".aqd_d2_bootstrap"

# Runs inside the detectron2 source tree: setup.py with no compiled extension.
_BUILD_D2 = r"""
import runpy, sys, setuptools
_setup = setuptools.setup
def setup(**kw):
    kw["ext_modules"] = []          # the sdist has no csrc; aqd_d2.compat covers _C
    kw.pop("cmdclass", None)
    kw["install_requires"] = []     # installed from tools/requirements.txt instead
    return _setup(**kw)
setuptools.setup = setup
sys.argv = ["setup.py", "-q", "bdist_wheel", "-d", sys.argv[1]]
runpy.run_path("setup.py", run_name="__main__")
"""


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def _run(cmd, **kw) -> None:
    _log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _fingerprint() -> str:
    h = hashlib.sha256()
    sources = sorted((REPO / "aqd_d2" / "export" / "csrc").glob("*"))
    for path in (REQUIREMENTS, REPO / "setup.py", Path(__file__), *sources):
        h.update(path.read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def _imports_ok() -> bool:
    code = "import torch, torchvision, detectron2, fvcore, pycocotools, pytest, aqd_d2"
    r = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    return r.returncode == 0


def _pip(*args) -> None:
    _run([venv_python(), "-m", "pip", "--disable-pip-version-check", *args])


def _install_detectron2() -> None:
    with tempfile.TemporaryDirectory(prefix="aqd_d2_detectron2_") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: the sdist's setup.py imports torch just to read metadata.
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "-d", tmp, DETECTRON2_SDIST)
        sdist = next(tmp.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data") if sys.version_info >= (3, 12) \
                else tar.extractall(tmp / "src")
        src = next((tmp / "src").iterdir())
        _run([venv_python(), "-c", _BUILD_D2, tmp / "wheel"], cwd=src)
        wheel = next((tmp / "wheel").glob("*.whl"))
        _pip("install", "-q", "--no-deps", "--force-reinstall", wheel)


def ensure_environment(force: bool = False) -> Path:
    """Make the venv current; returns its python. Quick when nothing changed."""
    fingerprint = _fingerprint()
    if not force and STAMP.is_file() and STAMP.read_text().strip() == fingerprint and _imports_ok():
        return venv_python()
    if not venv_python().exists():
        _run([sys.executable, "-m", "venv", VENV])
    _pip("install", "-q", "-r", REQUIREMENTS)
    r = subprocess.run([str(venv_python()), "-c", "import detectron2"], capture_output=True)
    if r.returncode != 0 or force:
        _install_detectron2()
    _pip("install", "-q", "--no-deps", "--no-build-isolation", "-e", REPO)
    if not _imports_ok():
        raise SystemExit("[bootstrap] the environment was built but aqd_d2 does not import; "
                         f"run {venv_python()} -c 'import aqd_d2' to see why")
    # The bit-packed binary convolution (C++/OpenMP). Never fails the setup: without a
    # compiler the exported models use the exact pure-PyTorch fallback (it prints why).
    _run([venv_python(), "-c",
          "from aqd_d2.export._ext_build import build_extension; build_extension(verbose=True)"])
    STAMP.write_text(fingerprint + "\n")
    _log(f"environment ready: {VENV}")
    return venv_python()


if __name__ == "__main__":
    ensure_environment(force="--force" in sys.argv)
