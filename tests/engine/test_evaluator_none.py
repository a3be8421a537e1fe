"""``AQD.EVALUATOR none``: train, skip evaluation, exit 0 (issue 19, item 4). It used to train
and then fail in build_evaluator with a message blaming the dataset (train_net.py exit 1)."""
import os
import subprocess
import sys

import pytest

from aqd_d2.engine import Trainer, build_evaluator
from tests.conftest import REPO, tiny_train_opts
from tests.test_configs import load_test_config

CONFIG = "configs/RetinaNet/R18-FPN-shapes-cpu.yaml"


def _cfg(out):
    return load_test_config(CONFIG, tiny_train_opts(out, max_iter=1)
                            + ["AQD.EVALUATOR", "none", "MODEL.FPN.OUT_CHANNELS", "16"])


def test_trainer_trains_and_evaluates_nothing(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert len(cfg.DATASETS.TEST)  # a test set is configured, and not evaluated
    trainer = Trainer(cfg)

    def no_loader(*a, **k):
        raise AssertionError("a test loader was built under AQD.EVALUATOR none")

    monkeypatch.setattr(Trainer, "build_test_loader", classmethod(no_loader))
    trainer.resume_or_load(resume=False)
    trainer.train()  # detectron2's EvalHook runs Trainer.test after the last iteration
    assert (tmp_path / "model_final.pth").is_file()
    assert Trainer.test(cfg, trainer.model) == {}


def test_build_evaluator_says_evaluation_is_off(tmp_path):
    with pytest.raises(ValueError, match="AQD.EVALUATOR is 'none'"):
        build_evaluator(_cfg(tmp_path), "aqd_shapes_tiny_val")


def test_train_net_exits_0(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / CONFIG),
         *tiny_train_opts(tmp_path, max_iter=1), "AQD.EVALUATOR", "none",
         "MODEL.FPN.OUT_CHANNELS", "16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "AQD.EVALUATOR is 'none': not evaluating" in log
    assert "Evaluation results" not in log and (tmp_path / "model_final.pth").is_file()
