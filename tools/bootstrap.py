#!/usr/bin/env python3
"""Create or update the project's virtual environment; a quick no-op when it is current.

Needs only Python >= 3.9 and access to PyPI. Steps (each skipped when already done):
1. ``python -m venv .venv`` (path: ``$AQD_VENV``, else ``<repo>/.venv``, see step 3);
2. ``pip install -r tools/requirements.txt`` (torch 2.14.1 / torchvision 0.29.1, fvcore, ...);
3. detectron2. By default v0.6: PyPI has no ``detectron2`` distribution; the reachable source is
   the ``pb1-detectron2==0.6`` sdist (the official v0.6 tree without its C++ sources). We
   download it, build a wheel with an empty extension list (``aqd_d2.compat`` stands in for the
   missing ``detectron2._C``), and install it without its dependency pins (step 2 installed
   them, except ``black``/``future``/``pydot``, which only LazyConfig saving and caffe2 need).
   With ``--detectron2 PATH`` (or ``$AQD_DETECTRON2``) a detectron2 source tree or archive
   (``.tar.gz`` / ``.zip``, e.g. a ``git archive`` of the GitHub main branch) is built instead,
   the way detectron2's install guide does it, C++ ops included
   (``FORCE_CUDA=0 pip install --no-build-isolation --no-deps SRC``, about 4 minutes on 2 cores);
   that environment lives in its own venv (``.venv-<archive or folder name>``) so both stay;
4. ``pip install -e .`` (aqd_d2 itself, as a user with their own detectron2 installs it:
   nothing it depends on is already missing, so pip changes no installed package);
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
REQUIREMENTS = REPO / "tools" / "requirements.txt"
DETECTRON2_SDIST = "pb1-detectron2==0.6"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def detectron2_source(arg: "str | None" = None) -> "Path | None":
    """The detectron2 source to build (``--detectron2`` argument, else ``$AQD_DETECTRON2``),
    or None for the default v0.6 sdist. Errors name the path when it is not usable."""
    value = arg if arg is not None else os.environ.get("AQD_DETECTRON2", "")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        if not (path / "setup.py").is_file() or not (path / "detectron2").is_dir():
            raise SystemExit(f"[bootstrap] {path} is not a detectron2 source tree "
                             "(no setup.py next to a detectron2/ package)")
        return path
    if path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
        return path
    raise SystemExit(f"[bootstrap] --detectron2 / AQD_DETECTRON2: {value!r} is neither a "
                     "detectron2 source folder nor a .tar.gz/.tgz/.tar/.zip archive of one")


def venv_dir(source: "Path | None" = None) -> Path:
    """``$AQD_VENV``, else ``.venv`` (v0.6) or ``.venv-<source name>`` (a given detectron2)."""
    if os.environ.get("AQD_VENV"):
        return Path(os.environ["AQD_VENV"])
    if source is None:
        return REPO / ".venv"
    name = source.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return REPO / f".venv-{name}"


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


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def _run(cmd, **kw) -> None:
    _log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _source_id(source: "Path | None") -> str:
    """What identifies the detectron2 to install: the sdist pin, or the source's path with the
    size and modification time of the archive / of its setup.py and its detectron2/ folder."""
    if source is None:
        return DETECTRON2_SDIST
    stats = [source] if source.is_file() else [source / "setup.py", source / "detectron2"]
    return f"{source}:" + ",".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in stats)


def _fingerprint(source: "Path | None") -> str:
    h = hashlib.sha256()
    sources = sorted((REPO / "aqd_d2" / "export" / "csrc").glob("*"))
    for path in (REQUIREMENTS, REPO / "setup.py", Path(__file__), *sources):
        h.update(path.read_bytes())
    h.update(sys.version.encode())
    h.update(_source_id(source).encode())
    return h.hexdigest()


def _imports_ok(venv: Path) -> bool:
    code = "import torch, torchvision, detectron2, fvcore, pycocotools, pytest, aqd_d2"
    r = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True)
    return r.returncode == 0


def _pip(venv: Path, *args, **kw) -> None:
    _run([venv_python(venv), "-m", "pip", "--disable-pip-version-check", *args], **kw)


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack a source archive; returns the folder holding setup.py."""
    if archive.name.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) \
                else tar.extractall(dest)
    if (dest / "setup.py").is_file():
        return dest
    roots = [p for p in dest.iterdir() if (p / "setup.py").is_file()]
    if len(roots) != 1:
        raise SystemExit(f"[bootstrap] {archive}: no single top folder with a setup.py inside")
    return roots[0]


def _install_detectron2_sdist(venv: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="aqd_d2_detectron2_") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: the sdist's setup.py imports torch just to read metadata.
        _pip(venv, "download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "-d", tmp, DETECTRON2_SDIST)
        src = _extract(next(tmp.glob("*.tar.gz")), tmp / "src")
        _run([venv_python(venv), "-c", _BUILD_D2, tmp / "wheel"], cwd=src)
        wheel = next((tmp / "wheel").glob("*.whl"))
        _pip(venv, "install", "-q", "--no-deps", "--force-reinstall", wheel)


def _install_detectron2_source(venv: Path, source: Path) -> None:
    """Build detectron2 from a full source tree as its install guide does (C++ ops compiled
    for the CPU; ``FORCE_CUDA=0`` so a machine without CUDA builds no CUDA kernels)."""
    _pip(venv, "install", "-q", "wheel", "setuptools")
    env = dict(os.environ, FORCE_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="aqd_d2_detectron2_") as tmp:
        src = source if source.is_dir() else _extract(source, Path(tmp) / "src")
        _log(f"building detectron2 from {source} with its C++ ops (minutes)")
        _pip(venv, "install", "-q", "--no-build-isolation", "--no-deps", "--force-reinstall", src,
             env=env)


def ensure_environment(force: bool = False, detectron2: "str | None" = None) -> Path:
    """Make the venv current; returns its python. Quick when nothing changed.

    Args:
        force: rebuild every step.
        detectron2: a detectron2 source folder or archive to build instead of the v0.6 sdist
            (default: ``$AQD_DETECTRON2``; empty means the sdist).
    """
    source = detectron2_source(detectron2)
    venv = venv_dir(source)
    stamp = venv / ".aqd_d2_bootstrap"
    d2_stamp = venv / ".aqd_d2_detectron2"
    fingerprint = _fingerprint(source)
    if not force and stamp.is_file() and stamp.read_text().strip() == fingerprint \
            and _imports_ok(venv):
        return venv_python(venv)
    if not venv_python(venv).exists():
        _run([sys.executable, "-m", "venv", venv])
    _pip(venv, "install", "-q", "-r", REQUIREMENTS)
    r = subprocess.run([str(venv_python(venv)), "-c", "import detectron2"], capture_output=True)
    installed = d2_stamp.read_text().strip() if d2_stamp.is_file() else None
    if r.returncode != 0 or force or installed != _source_id(source):
        if source is None:
            _install_detectron2_sdist(venv)
        else:
            _install_detectron2_source(venv, source)
        d2_stamp.write_text(_source_id(source) + "\n")
    # aqd_d2 itself, installed as a user with their own torch and detectron2 would (README):
    # its requirements are already there, so pip changes no installed package.
    _pip(venv, "install", "-q", "--no-build-isolation", "-e", REPO)
    if not _imports_ok(venv):
        raise SystemExit("[bootstrap] the environment was built but aqd_d2 does not import; "
                         f"run {venv_python(venv)} -c 'import aqd_d2' to see why")
    # The bit-packed binary convolution (C++/OpenMP). Never fails the setup: without a
    # compiler the exported models use the exact pure-PyTorch fallback (it prints why).
    _run([venv_python(venv), "-c",
          "from aqd_d2.export._ext_build import build_extension; build_extension(verbose=True)"])
    stamp.write_text(fingerprint + "\n")
    _log(f"environment ready: {venv}")
    return venv_python(venv)


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    parser.add_argument("--detectron2", metavar="PATH", default=None,
                        help="detectron2 source folder or archive to build (default: "
                             "$AQD_DETECTRON2, else the v0.6 sdist)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    ensure_environment(force=args.force, detectron2=args.detectron2)
