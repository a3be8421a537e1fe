"""Stage-wise binarization (paper 004): the detector carries the schedule and flips exactly the
configured groups at the configured iterations, under aqd_d2's Trainer and detectron2's
stock DefaultTrainer alike; a resumed run continues in its stage; the trainer hook still
serves models that carry no schedule."""
import pytest
import torch
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from aqd_d2.config import ConfigError
from aqd_d2.convert import quantized_layers
from aqd_d2.engine import Trainer
from aqd_d2.engine.stage_hook import StageBinarizationHook, apply_stage_state, build_aqd_hooks
from aqd_d2.modeling.stage_schedule import StageSchedule
from tests.conftest import tiny_train_opts
from tests.test_configs import load_test_config, tiny_batch

CFG = "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml"
GROUPS = [r"head\.conv(7|8)_.*", r"backbone\.conv(5|6)_.*", r"backbone\.conv(2|3_.*|4_.*)"]


def enabled_map(model):
    return {n: bool(l.weight_quantizer.enabled) for n, l in quantized_layers(model)}


class Recorder(HookBase):
    """The quantizer state each step trained with (the model sets it in its forward)."""

    def __init__(self):
        self.states = {}

    def after_step(self):
        self.states[self.trainer.iter] = enabled_map(self.trainer.model)


def make_cfg(out, max_iter, iters):
    opts = tiny_train_opts(out, max_iter) + [
        "DATASETS.TRAIN", "('aqd_kitti_tiny_train',)", "DATASETS.TEST", "()",
        "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.SCOPE", "['m0', 'm1', 'm2']",
        "AQD.STAGE_BINARIZATION.GROUPS", str(GROUPS),
        "AQD.STAGE_BINARIZATION.ITERS", str(list(iters)), "SOLVER.BASE_LR", "0.0001",
    ]
    return load_test_config(CFG, opts, narrow=True)  # DarkNet-19 at 1/8 width


def expected(names, iteration, iters):
    import re

    group = {}
    for i, g in enumerate(GROUPS):
        for n in names:
            if re.fullmatch(g, n):
                group[n] = i
    assert set(group) == set(names)  # every converted layer belongs to exactly one stage
    return {n: iteration >= iters[group[n]] for n in names}


def test_model_carries_the_schedule_and_the_trainer_adds_no_hook(tmp_path):
    cfg = make_cfg(tmp_path, 1, [0, 1, 2])
    model = build_model(cfg)
    stage = model.training_features.stage
    assert isinstance(stage, StageSchedule) and stage.iters == [0, 1, 2]
    assert sum(len(g) for g in stage.layers) == 20
    assert build_aqd_hooks(cfg, None) == []
    cfg.defrost()
    cfg.AQD.STAGE_BINARIZATION.GROUPS, cfg.AQD.STAGE_BINARIZATION.ITERS = [], []
    assert build_model(cfg).training_features.stage is None


def test_schedule_follows_the_storage_iteration_and_nothing_outside_a_run(tmp_path):
    model = build_model(make_cfg(tmp_path, 1, [0, 2, 5])).train()
    names = list(enabled_map(model))
    model(tiny_batch())  # no event storage: not a training run, the state is left as it is
    assert all(enabled_map(model).values())
    for it in (0, 3, 7, 1):  # also backwards: the state is a function of the iteration
        with EventStorage(it), torch.no_grad():
            model(tiny_batch())
        assert enabled_map(model) == expected(names, it, [0, 2, 5]), it
    with EventStorage(6), torch.no_grad():  # a nested storage (e.g. detectron2's PreciseBN)
        with EventStorage(0):  # restarts at 0: the run's (outermost) iteration counts
            model(tiny_batch())
    assert enabled_map(model) == expected(names, 6, [0, 2, 5])


def test_a_group_matching_nothing_fails_at_build_time(tmp_path):
    cfg = make_cfg(tmp_path, 1, [0, 1, 2])
    cfg.defrost()
    cfg.AQD.STAGE_BINARIZATION.GROUPS = [GROUPS[0], r"nothing\..*", GROUPS[2]]
    with pytest.raises(ConfigError, match=r"AQD.STAGE_BINARIZATION.GROUPS\[1\]"):
        build_model(cfg)


@pytest.mark.parametrize("trainer_cls", [Trainer, DefaultTrainer])
def test_trainers_flip_groups_and_resume_keeps_state(tmp_path, trainer_cls):
    iters = [0, 1, 3]
    trainer = trainer_cls(make_cfg(tmp_path, 2, iters))
    rec = Recorder()
    trainer.register_hooks([rec])
    trainer.resume_or_load(resume=False)
    trainer.train()
    names = list(rec.states[0])
    assert len(names) == 20
    for it in (0, 1):
        assert rec.states[it] == expected(names, it, iters), it
    # the checkpoint holds the stage state (quantizer buffers)
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert bool(ckpt["backbone.conv5_1.weight_quantizer.enabled"])
    assert not bool(ckpt["backbone.conv2.weight_quantizer.enabled"])

    # resume with a longer schedule: starts at 2 in stage M1, M2 switches on at 3
    trainer2 = trainer_cls(make_cfg(tmp_path, 4, iters))
    rec2 = Recorder()
    trainer2.register_hooks([rec2])
    trainer2.resume_or_load(resume=True)
    assert trainer2.start_iter == 2
    trainer2.train()
    assert sorted(rec2.states) == [2, 3]
    assert rec2.states[2] == expected(names, 2, iters)
    assert rec2.states[3] == expected(names, 3, iters) and all(rec2.states[3].values())


def test_apply_stage_state_reapplies_from_iteration():
    model = build_model(make_cfg("/tmp/unused", 1, [0, 5, 9]))
    apply_stage_state(model, GROUPS, [0, 5, 9], 6)
    state = enabled_map(model)
    assert state == expected(list(state), 6, [0, 5, 9])


def test_hook_drives_a_converted_model_without_schedule(tmp_path):
    """The trainer hook, for converted models that do not carry the schedule."""
    cfg = make_cfg(tmp_path, 1, [0, 1, 2])
    cfg.defrost()
    cfg.AQD.STAGE_BINARIZATION.GROUPS, cfg.AQD.STAGE_BINARIZATION.ITERS = [], []
    model = build_model(cfg)
    names = list(enabled_map(model))
    batches = iter([tiny_batch()] * 3)
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=1e-5))
    seen = {}

    class See(HookBase):
        def after_step(self):
            seen[self.trainer.iter] = enabled_map(self.trainer.model)

    trainer.register_hooks([StageBinarizationHook(GROUPS, [0, 1, 2]), See()])
    trainer.train(0, 3)
    assert all(seen[it] == expected(names, it, [0, 1, 2]) for it in range(3))


def test_steady_state_reads_no_tensor_value(tmp_path, monkeypatch):
    """Applying the schedule reads no device value once the quantizers' flags are known (a
    CUDA read would stall the GPU every step): checked by making every tensor read raise."""
    from aqd_d2.quantization.base import Quantizer

    if not hasattr(Quantizer, "_host_flag"):
        pytest.skip("this Quantizer reads its enabled flag from the tensor (no host copy)")
    model = build_model(make_cfg(tmp_path, 1, [0, 1, 3])).train()
    hook = model.training_features
    batch = (tiny_batch(),)
    with EventStorage(0):
        hook(model, batch)  # the first application may read the flags
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "__index__"):
        def boom(*a, _n=name, **k):
            raise AssertionError(f"tensor read ({_n}) while applying the stage schedule")
        monkeypatch.setattr(torch.Tensor, name, boom)
    for it in (1, 2, 3, 3):
        with EventStorage(it):
            hook(model, batch)
    monkeypatch.undo()
    assert enabled_map(model) == expected(list(enabled_map(model)), 3, [0, 1, 3])
