"""Fused (Triton) fake quantization equals the eager kernels: outputs and all gradients.

Cases and bounds: :mod:`tests.quantization.triton_equal_cases`. On CPU the kernels run under
Triton's interpreter, which must be switched on before Triton is imported, so the cases run
in one child process (about 15 s on 2 cores) whose per-case results become the parametrized
tests below. With a GPU the same cases also run compiled on CUDA ("auto" mode) in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.quant_helpers import skip_old_triton_interpreter

from tests.quantization.triton_equal_cases import case_names

ROOT = Path(__file__).resolve().parents[2]


try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted_results():
    skip_old_triton_interpreter()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.quantization.triton_equal_cases", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", case_names())
def test_fused_equals_eager_interpreted(interpreted_results, case):
    assert case in interpreted_results
    assert interpreted_results[case] == "", interpreted_results[case]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_equals_eager_cuda():
    from tests.quantization.triton_equal_cases import run_cases

    results = run_cases("cuda", "auto")
    bad = {k: v for k, v in results.items() if v}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_reductions_are_deterministic_cuda():
    from aqd_d2.quantization import build_quantizer

    torch.manual_seed(0)
    for method, role, shape in (("liq", "weight", (256, 256, 3, 3)), ("liq", "activation", (8, 64, 80, 80)),
                                ("lsq", "activation", (8, 64, 80, 80))):
        q = build_quantizer(method, 4, role).cuda()
        x = torch.randn(shape, device="cuda")
        q(x)  # initialise
        gy = torch.randn(shape, device="cuda")
        grads = []
        for _ in range(3):
            xx = x.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(q(xx), [xx, q.quant_params()[0]], gy))
        for g in grads[1:]:
            assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]), method
