#!/usr/bin/env python3
"""The project's two entry points; each first makes sure the environment exists.

    python3 tools/run.py demo   # train + evaluate the CPU RetinaNet-R18 demo, draw detections
    python3 tools/run.py test   # the test suite (extra arguments go to pytest; on a machine
                                # with several cores it runs in parallel with pytest-xdist,
                                # one worker per core up to 4; "-n 0" runs it in one process)
    python3 tools/run.py setup  # only build the environment

Each takes ``--detectron2 PATH`` right after the command: a detectron2 source folder or
archive (e.g. a ``git archive`` of detectron2's main branch) to build, with its C++ ops, into
its own venv ``.venv-<name>`` instead of the default v0.6 sdist in ``.venv``
(``$AQD_DETECTRON2`` does the same).

Stdlib only until the virtual environment exists (tools/bootstrap.py builds it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _parallel(rest) -> list:
    """pytest-xdist arguments unless the caller chose (``-n`` / ``--numprocesses``, or
    ``-p no:xdist``):
    one worker per core, at most 4 (each test already uses torch's threads; more workers than
    cores only adds memory). Work stealing balances the long end-to-end tests."""
    if "no:xdist" in rest or any(a == "--numprocesses" or a.startswith(("-n", "--numprocesses=")) for a in rest):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cores, 4)
    return ["-n", str(workers), "--dist", "worksteal"] if workers > 1 else []


def main(argv) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    import importlib.util

    spec = importlib.util.spec_from_file_location("aqd_bootstrap", HERE / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    cmd, rest = argv[0], argv[1:]
    detectron2 = None
    if rest and rest[0].startswith("--detectron2"):
        if "=" in rest[0]:
            detectron2, rest = rest[0].split("=", 1)[1], rest[1:]
        elif len(rest) >= 2:
            detectron2, rest = rest[1], rest[2:]
        else:
            print("--detectron2 needs a path (a detectron2 source folder or archive)")
            return 2
    python = str(bootstrap.ensure_environment(detectron2=detectron2))
    if cmd == "setup":
        return 0
    if cmd == "test":
        return subprocess.call([python, "-m", "pytest", "tests", *_parallel(rest), *rest], cwd=REPO)
    return subprocess.call([python, str(HERE / "demo.py"), *rest], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
