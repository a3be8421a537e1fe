"""tools/pretrain_backbone.py end to end (issue 17, "Done when"): trains a CPU twin for a few
iterations, is killed with SIGKILL after a checkpoint, resumes with --resume from it, ends with
a top-1 / top-5 evaluation; --eval-only evaluates a checkpoint; bad input exits with status 2
and one line naming the problem."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.classification.common import PRETRAIN_DIR, TOOL, tiny_pretrain_opts
from tests.conftest import REPO

CONFIG = str(PRETRAIN_DIR / "R18-shapes-cpu.yaml")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _metrics(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_kill_resume_evaluate(tmp_path):
    out = tmp_path / "run"
    # 60 iterations of ~0.05 s: the first run is killed at its first checkpoint, long
    # before the end
    opts = tiny_pretrain_opts(out, max_iter=60) + ["SOLVER.CHECKPOINT_PERIOD", "2"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, str(TOOL), "--config-file", CONFIG, *opts],
                            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    tag = out / "last_checkpoint"
    t0 = time.monotonic()
    while not (tag.is_file() and tag.read_text().strip().startswith("model_0")):
        if proc.poll() is not None:
            pytest.fail(f"first run exited (rc {proc.returncode}) before its first checkpoint:\n"
                        + (tmp_path / "first.log").read_text()[-3000:])
        assert time.monotonic() - t0 < 300, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (out / "model_final.pth").exists()

    res = _run(["--config-file", CONFIG, "--resume", *opts])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "Starting training from iteration" in text
    start = int(text.split("Starting training from iteration", 1)[1].split()[0])
    assert start >= 2, f"resumed from iteration {start}, not from the checkpoint"
    assert tag.read_text().strip() == "model_final.pth"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 59
    assert any(k.startswith("backbone.bottom_up.res5.") for k in final["model"])
    evals = [m for m in _metrics(out) if "classification/top1" in m]
    assert evals, "no top-1 / top-5 evaluation at the end of training"
    assert 0.0 <= evals[-1]["classification/top1"] <= evals[-1]["classification/top5"] <= 100.0

    res = _run(["--config-file", CONFIG, "--eval-only", *opts,
                "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "ev")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "top1" in res.stdout + res.stderr


@pytest.mark.parametrize("args, message", [
    (["--config-file", str(PRETRAIN_DIR / "nope.yaml")], "does not exist"),
    (["--config-file", str(REPO / "configs/RetinaNet/R18-FPN-shapes-cpu.yaml")],
     "trains an image classifier"),
    (["--config-file", CONFIG, "DATASETS.TRAIN", "('imagenet_train',)"],
     "'imagenet_train' is not registered"),
    (["--config-file", CONFIG, "--image-folder", "t17_cli", "/nonexistent/imagenet/train",
      "DATASETS.TRAIN", "('t17_cli',)"], "image folder not found: /nonexistent/imagenet/train"),
    (["--config-file", CONFIG, "MODEL.CLS.NUM_CLASSES", "1000"], "NUM_CLASSES = 1000 but"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    from aqd_d2.pretrain_backbone import cli

    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _top(text):
    """The evaluator's line: '<dataset>: top1 x%, top5 y% over N images' -> (top1, top5, N)."""
    line = [l for l in text.splitlines() if "top1 " in l and " over " in l][-1]
    tail = line.split("top1 ", 1)[1]
    top1 = float(tail.split("%", 1)[0])
    top5 = float(tail.split("top5 ", 1)[1].split("%", 1)[0])
    n = int(tail.split(" over ", 1)[1].split()[0])
    return top1, top5, n


def test_two_cpu_processes_train_and_evaluate_every_image_once(tmp_path):
    """--num-cpu-procs 2 (gloo DDP, detectron2's launch path): trains, saves one checkpoint, and
    the final evaluation sums the two ranks' counts: every validation image exactly once, with
    the same top-1 / top-5 as a one-process --eval-only of that checkpoint."""
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("aqd_shapes_cls_tiny_val")  # generate once, before two ranks race for it
    DatasetCatalog.get("aqd_shapes_cls_tiny_train")
    n_val = len(DatasetCatalog.get("aqd_shapes_cls_tiny_val"))
    out = tmp_path / "ddp"
    opts = tiny_pretrain_opts(out, max_iter=3) + ["SOLVER.CHECKPOINT_PERIOD", "100"]
    res = _run(["--config-file", CONFIG, "--num-cpu-procs", "2", *opts], timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "World size: 2" in text
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2
    assert not any(k.startswith("module.") for k in final["model"])  # saved unwrapped
    top1, top5, n = _top(text)
    assert n == n_val

    res = _run(["--config-file", CONFIG, "--eval-only", *opts, "MODEL.WEIGHTS",
                str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "ev")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert _top(res.stdout + res.stderr) == (top1, top5, n_val)
