"""Installing aqd_d2 into an existing environment (a user's own torch and detectron2: a GPU
build, a detectron2 main build, a fork) changes no installed package (README "Which
detectron2"): pip's install plan for ``pip install -e <repo>`` holds aqd_d2 alone."""
import json
import subprocess
import sys

from tests.conftest import REPO


def _install_plan(*extra):
    # --dry-run --report: pip resolves exactly as a real install would and prints its plan;
    # --no-index: nothing may need downloading (every requirement is already installed).
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
           "--disable-pip-version-check", "--no-build-isolation", "--report", "-", "-e", str(REPO),
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["install"]


def test_installing_into_an_existing_environment_installs_only_aqd_d2():
    plan = _install_plan()
    names = sorted(item["metadata"]["name"].lower().replace("_", "-") for item in plan)
    assert names == ["aqd-d2"], f"pip would also install or replace: {names}"


def test_setup_py_does_not_pin_the_users_torch_or_detectron2():
    import ast
    import re

    tree = ast.parse((REPO / "setup.py").read_text())
    requires = next(ast.literal_eval(kw.value) for node in ast.walk(tree)
                    if isinstance(node, ast.Call)
                    for kw in node.keywords if kw.arg == "install_requires")
    names = {re.split(r"[<>=!~ ;\[]", req, 1)[0].lower() for req in requires}
    assert not names & {"torch", "torchvision", "detectron2"}, names
    assert {"fvcore", "iopath", "pycocotools"} <= names
