"""The pretraining recipes (configs/Pretrain, issue 17 item 2): every paper recipe merges,
validates and cites its source; every recipe has a CPU twin; each CPU twin trains a few
iterations with detectron2's engine (PretrainTrainer) on the tiny embedded set and ends with a
top-1 / top-5 evaluation."""
import re

import pytest
import torch

from aqd_d2.engine.pretrain import PretrainTrainer
from tests.classification.common import PRETRAIN_DIR, pretrain_cfg, tiny_pretrain_opts

RECIPES = sorted(p.name for p in PRETRAIN_DIR.glob("*.yaml")
                 if not p.name.startswith("Base-") and "shapes-cpu" not in p.name)
TWINS = sorted(p.name for p in PRETRAIN_DIR.glob("*-shapes-cpu.yaml"))

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_recipe_has_a_cpu_twin_and_cites_its_source():
    assert len(RECIPES) >= 20
    for name in RECIPES:
        assert name.replace(".yaml", "-shapes-cpu.yaml") in TWINS, name
        head = " ".join((PRETRAIN_DIR / name).read_text().split("_BASE_")[0].replace("#", " ").split())
        assert re.search(r"(?i)paper 00\d|Simonyan|YOLO9000|Howard|Ma et al|He et al|R18\.yaml|"
                         r"R18-C4\.yaml|R50\.yaml", head), f"{name}: its comment cites no source"
    for name in TWINS:
        assert name.replace("-shapes-cpu", "") in RECIPES, name


@pytest.mark.parametrize("name", RECIPES)
def test_paper_recipe_merges_and_validates(name):
    cfg = pretrain_cfg(PRETRAIN_DIR / name, ["MODEL.DEVICE", "cpu"])
    assert cfg.DATASETS.TRAIN == ("imagenet_train",) and cfg.MODEL.CLS.NUM_CLASSES == 1000
    assert cfg.SOLVER.IMS_PER_BATCH == 256
    arch = cfg.MODEL.QUANT.META_ARCHITECTURE
    assert cfg.MODEL.META_ARCHITECTURE == "QuantizedDetector" and arch == "ImageClassifier"


@pytest.mark.parametrize("name", TWINS)
def test_cpu_twin_trains_and_evaluates(name, tmp_path):
    torch.manual_seed(0)
    size = 64 if name.startswith("QuickNet") else 32  # QuickNet: stride 32 at three scales
    cfg = pretrain_cfg(PRETRAIN_DIR / name, tiny_pretrain_opts(tmp_path, max_iter=2, size=size)
                       + ["MODEL.WEIGHTS", "", "SOLVER.CHECKPOINT_PERIOD", "100"])
    cfg.freeze()
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    top = trainer._last_eval_results["classification"]  # DefaultTrainer's final evaluation
    assert 0.0 <= top["top1"] <= top["top5"] <= 100.0
    assert (tmp_path / "model_final.pth").is_file()
    assert trainer.iter == 2  # detectron2 leaves iter = MAX_ITER after a completed run
