"""A real train_net.py run killed with SIGKILL between checkpoints and restarted with
--resume ends with exactly the weights, optimizer, scheduler, quantizer state (LIQ alphas,
stage-wise ``enabled`` flags), non-finite counters and loader position of an uninterrupted
run with the same seed (``AQD.EXACT_RESUME``, the default)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-2bit.yaml")
MAX_ITER = 8
PERIOD = 2  # checkpoints after iterations 1, 3, 5 and the final one


def _opts(out: Path, seed: int = 3):
    """2-bit LIQ AQD RetinaNet (multi-level BN head), narrow FPN, 64 px, batch 2, random
    flip on; the head's quantizers switch on at iteration 3 (stage-wise binarization hook)."""
    return [
        "DATASETS.TRAIN", "('aqd_shapes_tiny_train',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(5,)",
        "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MIN_SIZE_TEST", "64",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "", "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.QUANT.W_KWARGS", "['init=max']", "MODEL.QUANT.A_KWARGS", "['init=max']",
        "AQD.STAGE_BINARIZATION.GROUPS", r"['head\..*']", "AQD.STAGE_BINARIZATION.ITERS", "[3]",
        "SEED", str(seed), "OUTPUT_DIR", str(out),
    ]


def _start(opts, resume=False, log=None):
    # one thread in every run: float sums are then reduced in the same order in all runs
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [sys.executable, str(REPO / "train_net.py"), "--config-file", CONFIG]
    return subprocess.Popen(args + (["--resume"] if resume else []) + opts, cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for_checkpoint(out: Path, proc, name: str, timeout: float = 900) -> None:
    tag = out / "last_checkpoint"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if tag.is_file() and tag.read_text().strip() == name:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before writing {name}")
        time.sleep(0.05)
    pytest.fail(f"no {name} within {timeout} s")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_9_between_checkpoints_then_resume_matches_uninterrupted_run(tmp_path):
    # generate the tiny dataset once, before two processes could race to do it
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("aqd_shapes_tiny_train")
    full, killed = tmp_path / "full", tmp_path / "killed"
    with open(tmp_path / "full.log", "w") as flog, open(tmp_path / "killed.log", "w") as klog:
        ref = _start(_opts(full), log=flog)  # the uninterrupted run, in parallel
        victim = _start(_opts(killed), log=klog)
        _wait_for_checkpoint(killed, victim, "model_0000001.pth")
        victim.send_signal(signal.SIGKILL)  # mid-run: iteration 2 is running
        victim.wait()
        assert victim.returncode == -signal.SIGKILL
        tag = (killed / "last_checkpoint").read_text().strip()
        assert tag in ("model_0000001.pth", "model_0000003.pth")  # between checkpoints
        assert not (killed / "model_final.pth").exists()
        resumed = _start(_opts(killed), resume=True, log=klog)
        assert resumed.wait(timeout=900) == 0, (tmp_path / "killed.log").read_text()[-3000:]
        assert ref.wait(timeout=900) == 0, (tmp_path / "full.log").read_text()[-3000:]
    log = (tmp_path / "killed.log").read_text()
    start = int(tag[len("model_"):-len(".pth")]) + 1
    assert f"Starting training from iteration {start}" in log
    assert _load(killed / tag)["trainer"]["data_loader"]["batches"] == start

    a, b = _load(full / "model_final.pth"), _load(killed / "model_final.pth")
    # every parameter and buffer: weights, BN statistics, LIQ alphas, quantizer flags
    _assert_same(a["model"], b["model"], "model")
    alphas = [k for k in a["model"] if k.endswith("quantizer.alpha")]
    enabled = {k: bool(v) for k, v in a["model"].items() if k.endswith("quantizer.enabled")}
    assert alphas and any(enabled.values())
    assert all(enabled[k] for k in enabled if k.startswith("head."))  # stage switched on at 3
    # iteration, scheduler (hook state), optimizer with momentum, loader position, seeds
    _assert_same(a["trainer"], b["trainer"], "trainer")
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    assert a["trainer"]["data_loader"]["batches"] == MAX_ITER
    assert a["trainer"]["_trainer"]["optimizer"]["state"], "momentum buffers are checkpointed"
    # and the run was not trivial: the weights moved from the resumed checkpoint
    mid = _load(killed / tag)["model"]
    assert any(not torch.equal(mid[k], a["model"][k]) for k in alphas)
