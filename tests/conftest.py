"""Shared test setup: datasets go to a per-session temporary DETECTRON2_DATASETS."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Generated datasets are cached per test session (deterministic, so safe to share).
if "AQD_TEST_KEEP_DATASETS" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _DATASETS_TMP = tempfile.mkdtemp(prefix="aqd_d2_test_datasets_")
    os.environ["DETECTRON2_DATASETS"] = _DATASETS_TMP
    # Removed when the session's process exits (every run used to leave one behind).
    atexit.register(shutil.rmtree, _DATASETS_TMP, True)

import aqd_d2  # noqa: E402,F401  (compat + registrations before any test imports detectron2)


def tiny_train_opts(output_dir: str, max_iter: int = 2):
    """Overrides that turn the CPU demo config into a seconds-long run on the tiny dataset."""
    return [
        "DATASETS.TRAIN", "('aqd_shapes_tiny_train',)",
        "DATASETS.TEST", "('aqd_shapes_tiny_val',)",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "1",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MIN_SIZE_TEST", "64",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
    ]


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(
    "single_thread")``): on 2 shared cores, 2 threads per process mostly spin, and kernel
    benchmarks / routing decisions see the 1-thread case."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _thread_count_unchanged(request):
    """A test module that changes torch's intra-op thread count must restore it: a leaked
    count changes float reduction order (and results) of every later module, so tests then
    pass or fail by their order (issue 14)."""
    import torch

    n = torch.get_num_threads()
    yield
    leaked = torch.get_num_threads()
    if leaked != n:
        torch.set_num_threads(n)
        pytest.fail(f"{request.module.__name__} left torch.set_num_threads({leaked}) "
                    f"(was {n}): restore it (the single_thread fixture does)", pytrace=False)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def python() -> str:
    return sys.executable


def pytest_configure(config):
    # torch 2.14 deprecates torch.jit.script, which detectron2 0.6 calls at import time.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")
