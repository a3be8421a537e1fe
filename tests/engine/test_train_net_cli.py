"""train_net.py / aqd-train as a user meets it: custom datasets from the command line, the
installed command outside the repository, CPU twins without their float checkpoint,
--eval-only refusing incomplete checkpoints, one-line errors (issue 19, items 3, 5-8)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

import aqd_d2.train_net as tn
from aqd_d2.config import ConfigError
from aqd_d2.engine import CheckpointError
from tests.conftest import REPO, tiny_train_opts

RETINA_2BIT = str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-2bit.yaml")
RETINA_FP = str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-FP.yaml")
FCOS_FP = str(REPO / "configs" / "FCOS" / "R18-FPN-shapes-cpu-FP.yaml")


def _args(config, *opts, extra=()):
    return tn.build_parser().parse_args(["--config-file", config, *extra, *opts])


def _coco_files(name="aqd_shapes_tiny_train"):
    DatasetCatalog.get(name)  # generated on first use
    meta = MetadataCatalog.get(name)
    return os.path.abspath(meta.json_file), os.path.abspath(meta.image_root)


def _aqd_train() -> str:
    exe = Path(sys.executable).parent / "aqd-train"
    if not exe.is_file():
        pytest.fail(f"{exe} missing: aqd_d2 is not installed with its entry point (pip install -e .)")
    return str(exe)


def test_installed_command_trains_a_twin_on_a_command_line_coco_dataset_outside_the_repo(tmp_path):
    """aqd-train from a folder that is not the repository: a 2-bit CPU twin whose float
    checkpoint does not exist there (AQD.MISSING_WEIGHTS scratch: one log line), trained on a
    COCO-json dataset registered with --coco."""
    json_file, image_root = _coco_files()
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = work / "run"
    opts = tiny_train_opts(out, max_iter=2) + [
        "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "()",
        "MODEL.QUANT.W_KWARGS", "['init=max']", "MODEL.QUANT.A_KWARGS", "['init=max']"]
    r = subprocess.run([_aqd_train(), "--config-file", RETINA_2BIT,
                        "--coco", "my_train", json_file, image_root, *opts],
                       cwd=work, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "training from scratch, as AQD.MISSING_WEIGHTS 'scratch' says" in log
    assert "output/aqd_retinanet_R18_FPN_shapes_cpu_fp/model_final.pth" in log
    assert (out / "model_final.pth").is_file()
    assert "my_train" in (out / "config.yaml").read_text()


def test_voc_folder_registered_from_the_command_line_with_its_classes():
    DatasetCatalog.get("aqd_shapes_voc_tiny_train")
    src = MetadataCatalog.get("aqd_shapes_voc_tiny_train")
    classes = ",".join(src.thing_classes)
    args = _args(RETINA_FP, "DATASETS.TRAIN", "('cli_voc',)", "DATASETS.TEST", "()",
                 extra=["--voc", "cli_voc", os.path.abspath(src.dirname), "train",
                        "--voc-classes", "cli_voc", classes])
    cfg = tn.prepare(args)
    assert cfg.AQD.DATASETS.VOC == [["cli_voc", os.path.abspath(src.dirname), "train", classes]]
    ours, theirs = DatasetCatalog.get("cli_voc"), DatasetCatalog.get("aqd_shapes_voc_tiny_train")
    assert len(ours) == len(theirs) == 16
    assert [len(d["annotations"]) for d in ours] == [len(d["annotations"]) for d in theirs]
    meta = MetadataCatalog.get("cli_voc")
    assert meta.evaluator_type == "pascal_voc" and meta.thing_classes == src.thing_classes
    tn.prepare(args)  # the same registration again (every launched process runs it): no-op


def test_dataset_registration_errors_name_the_problem(tmp_path):
    json_file, image_root = _coco_files()
    with pytest.raises(FileNotFoundError, match="cli_bad.*annotation file"):
        tn.prepare(_args(RETINA_FP, extra=["--coco", "cli_bad", str(tmp_path / "x.json"), image_root]))
    with pytest.raises(ConfigError, match=r"DATASETS.TRAIN: \['nope_train'\] not registered.*--coco"):
        tn.prepare(_args(RETINA_FP, "DATASETS.TRAIN", "('nope_train',)"))
    with pytest.raises(ConfigError, match="--voc-classes names \\['other'\\]"):
        tn.prepare(_args(RETINA_FP, extra=["--voc-classes", "other", "a,b"]))
    tn.prepare(_args(RETINA_FP, "DATASETS.TEST", "()", extra=["--coco", "cli_ok", json_file, image_root]))
    with pytest.raises(ConfigError, match="already registered with other files"):
        tn.prepare(_args(RETINA_FP, extra=["--coco", "cli_ok", json_file, str(tmp_path)]))


def test_missing_base_names_the_yaml_that_references_it(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "parent.yaml"\n')
    (tmp_path / "parent.yaml").write_text('_BASE_: "gone/Base.yaml"\n')
    with pytest.raises(ConfigError) as e:
        tn.load_config(_args(str(child)))
    assert "parent.yaml" in str(e.value) and "gone/Base.yaml" in str(e.value)


def test_eval_only_with_no_evaluator_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--eval-only with AQD.EVALUATOR 'none'"):
        tn.load_config(_args(RETINA_FP, "AQD.EVALUATOR", "none", extra=["--eval-only"]))


def test_missing_weights_raise_by_default_and_name_the_file(tmp_path):
    args = _args(RETINA_FP, "MODEL.WEIGHTS", "nowhere/model_final.pth", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS 'nowhere/model_final.pth' does not exist"):
        tn.prepare(args)
    cfg = tn.prepare(_args(RETINA_2BIT, "OUTPUT_DIR", str(tmp_path)))  # twin: scratch
    assert cfg.MODEL.WEIGHTS == ""


def test_config_errors_print_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file", RETINA_FP,
                        "MODEL.QUANT.W_BITS", "9", "OUTPUT_DIR", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("aqd_d2: error:")]
    assert len(errors) == 1 and "MODEL.QUANT.W_BITS" in errors[0]
    r = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file", RETINA_FP,
                        "--debug", "MODEL.QUANT.W_BITS", "9", "OUTPUT_DIR", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "MODEL.QUANT.W_BITS" in r.stderr


def _save_model(config, path, *opts):
    cfg = tn.load_config(_args(config, "MODEL.WEIGHTS", "", *opts))
    model = tn.Trainer.build_model(cfg)
    torch.save({"model": model.state_dict()}, path)


def _eval_only(config, weights, out, *extra):
    args = _args(config, *tiny_train_opts(out), "MODEL.WEIGHTS", str(weights),
                 "MODEL.QUANT.W_KWARGS", "['init=max']", "MODEL.QUANT.A_KWARGS", "['init=max']",
                 extra=["--eval-only", *extra])
    return tn.main(args)


def test_eval_only_refuses_a_checkpoint_that_does_not_hold_the_whole_model(tmp_path):
    float_ckpt = tmp_path / "float.pth"
    _save_model(RETINA_FP, float_ckpt)
    # a float checkpoint evaluated with the 2-bit config: quantizer state missing
    with pytest.raises(CheckpointError, match=r"float\.pth.*quantizer state.*--allow-incomplete"):
        _eval_only(RETINA_2BIT, float_ckpt, tmp_path / "a")
    # an FCOS checkpoint evaluated as RetinaNet: head skipped / missing
    fcos_ckpt = tmp_path / "fcos.pth"
    _save_model(FCOS_FP, fcos_ckpt)
    with pytest.raises(CheckpointError, match=r"fcos\.pth.*does not hold the whole model"):
        _eval_only(RETINA_FP, fcos_ckpt, tmp_path / "b")
    # no weights at all: a random model
    with pytest.raises(CheckpointError, match="randomly initialised"):
        _eval_only(RETINA_FP, "", tmp_path / "c")
    # the override evaluates anyway
    res = _eval_only(RETINA_2BIT, float_ckpt, tmp_path / "d", "--allow-incomplete-weights")
    assert "bbox" in res
    # the float checkpoint is complete for the float config
    assert "bbox" in _eval_only(RETINA_FP, float_ckpt, tmp_path / "e")


def test_one_image_per_process_batch_norm_error_names_ims_per_batch(tmp_path):
    """AQD's multi-level BN on P7 of a 64-pixel image sees one value per channel when a process
    gets one image: the error names SOLVER.IMS_PER_BATCH and the process count."""
    args = _args(RETINA_2BIT, *tiny_train_opts(tmp_path, max_iter=1), "SOLVER.IMS_PER_BATCH", "1",
                 "MODEL.WEIGHTS", "", "MODEL.QUANT.W_KWARGS", "['init=max']",
                 "MODEL.QUANT.A_KWARGS", "['init=max']")
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH = 1 over 1 process\(es\)"):
        tn.main(args)
