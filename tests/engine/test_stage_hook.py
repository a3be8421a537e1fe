"""Stage-wise binarization hook (paper 004): flips exactly the configured groups at the
configured iterations, through aqd_d2's Trainer, and a resumed run keeps the state."""
import torch
from detectron2.engine import HookBase

from aqd_d2.convert import quantized_layers
from aqd_d2.engine import Trainer
from aqd_d2.engine.stage_hook import apply_stage_state, build_aqd_hooks, StageBinarizationHook
from tests.conftest import tiny_train_opts
from tests.test_configs import load_test_config

CFG = "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml"
GROUPS = [r"head\.conv(7|8)_.*", r"backbone\.conv(5|6)_.*", r"backbone\.conv(2|3_.*|4_.*)"]


def enabled_map(model):
    return {n: bool(l.weight_quantizer.enabled) for n, l in quantized_layers(model)}


class Recorder(HookBase):
    def __init__(self):
        self.states = {}

    def before_step(self):
        self.states[self.trainer.iter] = enabled_map(self.trainer.model)


def make_cfg(out, max_iter, iters):
    opts = tiny_train_opts(out, max_iter) + [
        "DATASETS.TRAIN", "('aqd_kitti_tiny_train',)", "DATASETS.TEST", "()",
        "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.SCOPE", "['m0', 'm1', 'm2']",
        "AQD.STAGE_BINARIZATION.GROUPS", str(GROUPS),
        "AQD.STAGE_BINARIZATION.ITERS", str(list(iters)), "SOLVER.BASE_LR", "0.0001",
    ]
    return load_test_config(CFG, opts)


def expected(names, iteration, iters):
    import re

    group = {}
    for i, g in enumerate(GROUPS):
        for n in names:
            if re.fullmatch(g, n):
                group[n] = i
    assert set(group) == set(names)  # every converted layer belongs to exactly one stage
    return {n: iteration >= iters[group[n]] for n in names}


def test_hooks_from_config(tmp_path):
    cfg = make_cfg(tmp_path, 1, [0, 1, 2])
    hooks = build_aqd_hooks(cfg, None)
    assert len(hooks) == 1 and isinstance(hooks[0], StageBinarizationHook)
    cfg.defrost()
    cfg.AQD.STAGE_BINARIZATION.GROUPS, cfg.AQD.STAGE_BINARIZATION.ITERS = [], []
    assert build_aqd_hooks(cfg, None) == []


def test_stage_hook_flips_groups_and_resume_keeps_state(tmp_path):
    iters = [0, 1, 3]
    trainer = Trainer(make_cfg(tmp_path, 2, iters))
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
    trainer2 = Trainer(make_cfg(tmp_path, 4, iters))
    rec2 = Recorder()
    trainer2.register_hooks([rec2])
    trainer2.resume_or_load(resume=True)
    assert trainer2.start_iter == 2
    trainer2.train()
    assert sorted(rec2.states) == [2, 3]
    assert rec2.states[2] == expected(names, 2, iters)
    assert rec2.states[3] == expected(names, 3, iters) and all(rec2.states[3].values())


def test_apply_stage_state_reapplies_from_iteration():
    from detectron2.modeling import build_model

    model = build_model(make_cfg("/tmp/unused", 1, [0, 5, 9]))
    apply_stage_state(model, GROUPS, [0, 5, 9], 6)
    state = enabled_map(model)
    assert state == expected(list(state), 6, [0, 5, 9])
