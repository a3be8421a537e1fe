"""Every shipped config under detectron2's stock ``DefaultTrainer`` (get_cfg + add_aqd_config +
the yaml, no aqd_d2 trainer code): it trains the same as under aqd_d2's ``Trainer`` (same
quantizers enabled at each iteration, same filters pruned at the same iterations, same loss
terms, same data mapper, same optimizer and training loop), or it refuses on its first step
with :class:`~aqd_d2.engine.TrainerSetupError` naming each missing feature and the two ways
out; and ``aqd_d2.engine.setup(trainer)`` makes the stock trainer train such a config as
aqd_d2's Trainer does.

What a trainer contributes to training is the optimizer (``SOLVER.OPTIMIZER``), the loop
(``AQD.TRAIN_LOOP``), the mapper (``INPUT.TRAIN_MAPPER``), and, before the detectors carried
them, the stage-wise binarization and pruning schedules. The configs are grouped by the raw
values of those keys (read here from the yaml, not through aqd_d2's own classification);
everything else a config sets (detector family, bit widths, norms, losses) is the model's,
built and run for every config by tests/test_configs.py. One representative per group (a
CPU twin where the group has one) runs 3 iterations on a tiny dataset at 64 px with narrow
layers, under both trainers.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from detectron2.engine import DefaultTrainer

import aqd_d2  # noqa: F401  (registrations)
from aqd_d2.convert import quantized_layers
from aqd_d2.data.mappers import TRAIN_MAPPER_TAG
from aqd_d2.engine import Trainer, TrainerSetupError, setup
from aqd_d2.engine.gan_loop import BiDetGANLoop
from aqd_d2.utils import unwrap_model
from tests.conftest import tiny_train_opts
from tests.test_configs import CONFIGS, load_test_config

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_ITER = 3
#: what detectron2's stock DefaultTrainer gives
STOCK = {"SOLVER.OPTIMIZER": "SGD", "AQD.TRAIN_LOOP": "AQDTrainLoop",
         "INPUT.TRAIN_MAPPER": "DatasetMapper"}


def _signature(cfg) -> tuple:
    return (cfg.SOLVER.OPTIMIZER, cfg.AQD.TRAIN_LOOP, cfg.INPUT.TRAIN_MAPPER,
            len(cfg.AQD.STAGE_BINARIZATION.GROUPS) > 0, cfg.AQD.PRUNING.METHOD)


def _group_configs():
    groups = defaultdict(list)
    for path in CONFIGS:
        groups[_signature(load_test_config(path, narrow=True))].append(path)
    # the representative: a CPU twin if any (cheapest), a plain detector before a BiDet one
    # (whose sampled features are the least stable on 3 steps of random data), then by name
    return {sig: sorted(paths, key=lambda p: ("cpu" not in Path(p).name, "BiDet" in p, p))
            for sig, paths in sorted(groups.items())}


GROUPS = _group_configs()


def _expected_refusal(cfg) -> dict:
    return {k: str(aqd_d2.config.get_key(cfg, k)) for k, v in STOCK.items()
            if aqd_d2.config.get_key(cfg, k) != v}


def _tiny_cfg(path, out):
    cfg = load_test_config(path, narrow=True)
    train = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else ""
    data = ("aqd_kitti_tiny_train" if "kitti" in train else
            "aqd_shapes_voc_tiny_train" if "voc" in train else "aqd_shapes_tiny_train")
    opts = tiny_train_opts(out, MAX_ITER) + [
        "DATASETS.TRAIN", f"('{data}',)", "DATASETS.TEST", "()",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "0"]
    if len(cfg.AQD.STAGE_BINARIZATION.GROUPS):  # the stages switch on at 0, 1, 2, ...
        opts += ["AQD.STAGE_BINARIZATION.ITERS", str(list(range(len(cfg.AQD.STAGE_BINARIZATION.GROUPS))))]
    if cfg.AQD.PRUNING.METHOD == "sfp":  # SFP steps at 0 and 2, and the final one at 3
        opts += ["AQD.PRUNING.INTERVAL", "2"]
    cfg.merge_from_list(opts)
    return cfg


def _state(model) -> dict:
    """What the model trains with at this forward: quantizer flags and pruning state."""
    sched = getattr(model, "filter_pruning", None)
    masks = sched.masks() if sched is not None else {}
    return {"enabled": {n: [q.is_enabled for _, q in l.quantizers()] for n, l in quantized_layers(model)},
            "pruned": (sched.last_prune if sched is not None else None,
                       {n: int((~m).sum()) for n, m in masks.items()}),
            "masks": {n: m.clone() for n, m in masks.items()}}


def _train(make, cfg) -> dict:
    """Build a trainer with ``make(cfg)``, train MAX_ITER iterations, and record per training
    forward the batch's mapper tag and the model's state (after the model's own hook)."""
    torch.manual_seed(0)
    trainer = make(cfg)
    model = unwrap_model(trainer.model)
    steps = []

    def record(module, args):
        if module.training and steps is not None:
            steps.append({"tag": args[0][0].get(TRAIN_MAPPER_TAG), **_state(module)})

    model.register_forward_pre_hook(record)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
    except TrainerSetupError as e:
        return {"error": e, "iter": trainer.iter, "steps": steps,
                "losses": [k for k in trainer.storage.histories() if "loss" in k]}
    return {"error": None, "steps": steps, "optimizer": type(trainer.optimizer),
            "gan": isinstance(trainer._trainer, BiDetGANLoop),
            "losses": sorted(k for k in trainer.storage.histories() if "loss" in k),
            "final": _state(model)}


def _assert_same_training(a: dict, b: dict) -> None:
    assert a["error"] is None and b["error"] is None
    assert len(a["steps"]) == len(b["steps"]) == MAX_ITER
    for it, (x, y) in enumerate(zip(a["steps"], b["steps"])):
        assert x["tag"] == y["tag"], it                    # the same mapper
        assert x["enabled"] == y["enabled"], it            # the same quantizers on
        assert x["pruned"] == y["pruned"], it              # pruned at the same iterations
    for n, m in a["steps"][0]["masks"].items():            # same init: the same first masks
        assert torch.equal(m, b["steps"][0]["masks"][n]), n
    assert a["final"]["enabled"] == b["final"]["enabled"]
    assert a["final"]["pruned"] == b["final"]["pruned"]
    assert a["losses"] == b["losses"]
    assert a["optimizer"] is b["optimizer"]
    assert a["gan"] == b["gan"]


def _assert_refusal(run: dict, need: dict) -> None:
    err = run["error"]
    assert isinstance(err, TrainerSetupError), "trained without the features it needs"
    assert run["iter"] == 0 and not run["losses"]          # refused on the first step
    msg = str(err)
    for key in STOCK:
        if key in need:
            assert f"{key} = {need[key]!r}" in msg, (key, msg)
        else:
            assert f"{key} =" not in msg, (key, msg)
    assert "aqd_d2.engine.Trainer" in msg and "aqd_d2.engine.setup(trainer)" in msg


def test_every_config_is_in_a_group():
    assert sum(len(v) for v in GROUPS.values()) == len(CONFIGS) > 150
    # the groups that exist today: plain, stage-wise, both pruning methods, each trainer feature
    sigs = set(GROUPS)
    assert any(s[3] for s in sigs) and {"sfp", "pfec"} <= {s[4] for s in sigs}
    assert {"Adam", "SGD"} <= {s[0] for s in sigs} and "SSDMapper" in {s[2] for s in sigs}
    assert "BiDetGANLoop" in {s[1] for s in sigs}


@pytest.mark.parametrize("sig", list(GROUPS), ids=[
    f"{Path(v[0]).stem}(+{len(v) - 1})" for v in GROUPS.values()])
def test_stock_default_trainer_trains_the_same_or_refuses(sig, tmp_path):
    rep = GROUPS[sig][0]
    cfg = _tiny_cfg(rep, tmp_path / "stock")
    need = _expected_refusal(cfg)
    stock = _train(DefaultTrainer, cfg)
    if need:
        _assert_refusal(stock, need)
        return
    ours = _train(Trainer, _tiny_cfg(rep, tmp_path / "ours"))
    _assert_same_training(stock, ours)
    if sig[3]:  # stage-wise: one more stage on at each iteration, all on at the end
        on = [sum(all(v) for v in s["enabled"].values()) for s in stock["steps"]]
        assert on[0] < on[1] < on[2] == len(stock["steps"][0]["enabled"]), on
    if sig[4] == "sfp":  # pruned before steps 0 and 2, and after the last
        assert [s["pruned"][0] for s in stock["steps"]] == [0, 0, 2]
        assert stock["final"]["pruned"][0] == MAX_ITER
    if sig[4] == "pfec":
        assert [s["pruned"][0] for s in stock["steps"]] == [0, 0, 0]


# The representative of each feature set a trainer must provide, chosen so that together
# they cover every feature: optimizer + loop (Faster R-CNN, DatasetMapper) and mapper + loop.
SETUP_CASES = [
    "configs/BiDet/FasterRCNN-R18-VOC-AutoBiDet.yaml",              # Adam + BiDetGANLoop
    "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-AutoBiDet.yaml",      # SSDMapper + BiDetGANLoop
]


@pytest.mark.parametrize("path", SETUP_CASES, ids=[Path(p).stem for p in SETUP_CASES])
def test_setup_gives_a_stock_trainer_what_aqd_trainer_gives(path, tmp_path):
    cfg = _tiny_cfg(path, tmp_path / "stock")
    assert _expected_refusal(cfg)

    def stock_with_setup(c):
        t = DefaultTrainer(c)
        done = setup(t)
        assert done and setup(t) == []  # idempotent
        return t

    ours = _train(Trainer, _tiny_cfg(path, tmp_path / "ours"))
    stock = _train(stock_with_setup, cfg)
    _assert_same_training(stock, ours)
    assert stock["gan"] and any(k.startswith("gan_loss") for k in stock["losses"])
    assert stock["optimizer"].__name__ == cfg.SOLVER.OPTIMIZER
    assert stock["steps"][0]["tag"] == (None if cfg.INPUT.TRAIN_MAPPER == "DatasetMapper"
                                        else cfg.INPUT.TRAIN_MAPPER)


def test_setup_changes_nothing_on_aqd_trainer(tmp_path):
    cfg = _tiny_cfg("configs/BiDet/FasterRCNN-R18-VOC-AutoBiDet.yaml", tmp_path)
    trainer = Trainer(cfg)
    loop, opt = trainer._trainer, trainer.optimizer
    assert setup(trainer) == []
    assert trainer._trainer is loop and trainer.optimizer is opt


@pytest.mark.parametrize("how", ["build_aqd_train_loader", "build_train_mapper"])
def test_a_project_loader_from_the_documented_builders_needs_no_setup(how, tmp_path):
    """A project's DefaultTrainer whose build_train_loader uses aqd_d2's builders gets the
    SSD augmentation (the batches carry the mapper's tag) and trains without setup()."""
    from detectron2.data import build_detection_train_loader

    from aqd_d2.data import build_aqd_train_loader, build_train_mapper

    class ProjectTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            if how == "build_aqd_train_loader":
                return build_aqd_train_loader(cfg)
            return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    cfg = _tiny_cfg("configs/SSD/MobileNetV1-shapes-voc-cpu-FP.yaml", tmp_path)
    assert _expected_refusal(cfg) == {"INPUT.TRAIN_MAPPER": "SSDMapper"}
    run = _train(ProjectTrainer, cfg)
    assert run["error"] is None and [s["tag"] for s in run["steps"]] == ["SSDMapper"] * MAX_ITER
