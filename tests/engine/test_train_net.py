"""train_net.py end to end on the tiny embedded dataset, and its errors on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqd_d2.config import ConfigError
from tests.conftest import REPO, tiny_train_opts

CONFIG = str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu.yaml")


def _load_train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw,
    )


def test_two_iterations_train_evaluate_resume_and_eval_only(tmp_path):
    out = tmp_path / "run"
    # score threshold 0: a 3-iteration model must still produce detections to evaluate
    r = _run(["--config-file", CONFIG, *tiny_train_opts(out, max_iter=3),
              "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    # detectron2's own logging: losses with ETA, and the COCO evaluation table
    assert "eta:" in log and "loss_cls" in log
    assert "Evaluation results for bbox" in log
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in m for m in metrics)
    assert any("bbox/AP" in m for m in metrics)
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events written"

    # --resume continues from the last checkpoint (iteration 3) up to MAX_ITER 4
    r = _run(["--config-file", CONFIG, "--resume", *tiny_train_opts(out, max_iter=4)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting training from iteration 3" in r.stdout + r.stderr

    # --eval-only with the trained weights
    r = _run(["--config-file", CONFIG, "--eval-only", *tiny_train_opts(out),
              "MODEL.WEIGHTS", str(out / "model_final.pth"),
              "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Evaluation results for bbox" in r.stdout + r.stderr


def test_missing_config_file_names_it():
    r = _run(["--config-file", "configs/does_not_exist.yaml"])
    assert r.returncode != 0
    assert "configs/does_not_exist.yaml" in r.stderr and "does not exist" in r.stderr


def _setup(opts, config=CONFIG):
    train_net = _load_train_net()
    args = train_net.build_parser().parse_args(["--config-file", config, *opts])
    return train_net.setup(args)


def test_unknown_config_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.NOT_A_KEY"):
        _setup(["MODEL.NOT_A_KEY", "1", "OUTPUT_DIR", str(tmp_path)])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nSOLVER:\n  NOT_A_SOLVER_KEY: 3\n')
    with pytest.raises(ConfigError, match="SOLVER.NOT_A_SOLVER_KEY") as e:
        _setup([], config=str(bad))
    assert "bad.yaml" in str(e.value)


def test_cuda_device_without_cuda_is_named(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="MODEL.DEVICE"):
        _setup(["MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path)])


def test_missing_dataset_files_are_named(tmp_path):
    """A builtin COCO name whose files are absent under DETECTRON2_DATASETS names the path.

    detectron2 binds the builtin datasets' root when it is first imported, so this runs in a
    fresh process with DETECTRON2_DATASETS pointing at an empty folder.
    """
    code = (
        "import aqd_d2\n"
        "from detectron2.data import DatasetCatalog\n"
        "DatasetCatalog.get('coco_2017_val')\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert str(tmp_path / "coco" / "annotations" / "instances_val2017.json") in r.stderr

    from detectron2.data import DatasetCatalog

    with pytest.raises(KeyError, match="not_registered_dataset"):
        DatasetCatalog.get("not_registered_dataset")


def test_missing_dataset_fails_training_with_its_name(tmp_path):
    r = _run(["--config-file", CONFIG, *tiny_train_opts(tmp_path / "o"),
              "DATASETS.TRAIN", "('no_such_dataset_train',)"])
    assert r.returncode != 0
    assert "no_such_dataset_train" in r.stderr
