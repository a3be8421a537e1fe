#!/usr/bin/env python
"""Install aqd_d2 (``pip install -e .``). detectron2 itself is built by tools/bootstrap.py,
because no detectron2 distribution on PyPI installs as-is (see README).

torch, torchvision and detectron2 are not listed: they are the user's (a GPU build, a
detectron2 main build, a fork), and pip must never replace them when aqd_d2 is installed into
an existing environment. ``aqd_d2.compat`` checks the torch version at import time."""
from setuptools import find_packages, setup

setup(
    name="aqd_d2",
    version="0.1.0",
    description="Quantized and binary object detectors as a detectron2 plugin",
    packages=find_packages(include=("aqd_d2", "aqd_d2.*")),
    package_data={"aqd_d2.export": ["csrc/*.cpp", "csrc/*.h", "csrc/*.inc"]},
    python_requires=">=3.9",
    # `aqd-train`: train_net.py as an installed command (works outside the repository)
    entry_points={"console_scripts": ["aqd-train = aqd_d2.train_net:cli"]},
    install_requires=[
        "fvcore",
        "iopath",
        "pycocotools",
        "numpy",
        "Pillow",
    ],
)
