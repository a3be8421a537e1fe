#!/usr/bin/env python3
"""The project's two entry points; each first makes sure the environment exists.

    python3 tools/run.py demo   # train + evaluate the CPU RetinaNet-R18 demo, draw detections
    python3 tools/run.py test   # the test suite (extra arguments go to pytest)

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


def main(argv) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    import importlib.util

    spec = importlib.util.spec_from_file_location("aqd_bootstrap", HERE / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    python = str(bootstrap.ensure_environment())
    cmd, rest = argv[0], argv[1:]
    if cmd == "setup":
        return 0
    if cmd == "test":
        return subprocess.call([python, "-m", "pytest", "tests", *rest], cwd=REPO)
    return subprocess.call([python, str(HERE / "demo.py"), *rest], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
