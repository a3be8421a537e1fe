"""SOLVER.OPTIMIZER: SGD (detectron2's), Adam (BiDet / AutoBiDet, paper 000 sec. 4.1), AdamW."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_optimizer as d2_build_optimizer
from torch import nn

import aqd_d2
from aqd_d2.config import ConfigError
from aqd_d2.engine import Trainer
from aqd_d2.engine.optimizer import build_optimizer
from tests.conftest import REPO, tiny_train_opts


def _cfg(*opts):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_list(list(opts))
    return cfg


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.norm = nn.BatchNorm2d(3)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def _groups(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_sgd_default_is_detectron2s_optimizer():
    cfg = _cfg("SOLVER.BASE_LR", "0.02", "SOLVER.WEIGHT_DECAY_NORM", "0.0")
    model = _Tiny()
    ours, theirs = build_optimizer(cfg, model), d2_build_optimizer(cfg, model)
    assert type(ours) is type(theirs) and isinstance(ours, torch.optim.SGD)
    assert _groups(ours) == _groups(theirs)
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == \
        [[id(p) for p in g["params"]] for g in theirs.param_groups]
    assert all(p is not model.frozen for g in ours.param_groups for p in g["params"])


@pytest.mark.parametrize("name, cls", [("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW)])
def test_adam_first_step_matches_hand_value(name, cls):
    # Adam's first step with bias correction: m^ = g, v^ = g^2, so the update is
    # -lr * g / (|g| + eps) (Kingma & Ba, Algorithm 1) when there is no weight decay.
    cfg = _cfg("SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", "0.5", "SOLVER.WEIGHT_DECAY", "0.0",
               "SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.ADAM_BETAS", "(0.8, 0.99)",
               "SOLVER.ADAM_EPS", "0.25")
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    holder = nn.Module()
    holder.p = p
    opt = build_optimizer(cfg, holder)
    assert type(opt) is cls
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["eps"] == 0.25
    p.grad = torch.tensor([0.75, -0.25, 0.0])
    opt.step()
    # 1 - 0.5*0.75/1.0 = 0.625; -2 + 0.5*0.25/0.5 = -1.75; 3 - 0 = 3
    assert torch.allclose(p.detach(), torch.tensor([0.625, -1.75, 3.0]))


def test_adam_weight_decay_coupled_vs_decoupled():
    base = ("SOLVER.BASE_LR", "0.1", "SOLVER.WEIGHT_DECAY", "0.5", "SOLVER.WEIGHT_DECAY_NORM", "0.5",
            "SOLVER.ADAM_EPS", "1e-12")
    out = {}
    for name in ("Adam", "AdamW"):
        holder = nn.Module()
        holder.p = nn.Parameter(torch.tensor([2.0]))
        opt = build_optimizer(_cfg("SOLVER.OPTIMIZER", name, *base), holder)
        holder.p.grad = torch.tensor([0.0])
        opt.step()
        out[name] = float(holder.p)
    # Adam: g' = 0 + 0.5*2 = 1 -> step -lr*sign = 2 - 0.1 = 1.9
    # AdamW: p *= 1 - lr*wd = 0.95 -> 1.9, then the zero-gradient Adam step leaves it
    assert out["Adam"] == pytest.approx(1.9) and out["AdamW"] == pytest.approx(1.9)
    holder = nn.Module()
    holder.p = nn.Parameter(torch.tensor([2.0]))
    opt = build_optimizer(_cfg("SOLVER.OPTIMIZER", "AdamW", *base), holder)
    holder.p.grad = torch.tensor([1.0])
    opt.step()
    # AdamW: 2 * 0.95 - 0.1 * 1 = 1.8 (Adam would give 2 - 0.1 = 1.9: the decay folds into g)
    assert float(holder.p) == pytest.approx(1.8)


def test_gradient_clipping_wraps_every_optimizer():
    cfg = _cfg("SOLVER.OPTIMIZER", "Adam", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
               "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1")
    opt = build_optimizer(cfg, _Tiny())
    assert isinstance(opt, torch.optim.Adam) and type(opt) is not torch.optim.Adam


@pytest.mark.parametrize("key, value, words", [
    ("SOLVER.OPTIMIZER", "'RMSprop'", "SOLVER.OPTIMIZER"),
    ("SOLVER.ADAM_BETAS", "(0.9,)", "SOLVER.ADAM_BETAS"),
    ("SOLVER.ADAM_BETAS", "(0.9, 1.0)", "SOLVER.ADAM_BETAS"),
    ("SOLVER.ADAM_EPS", "0.0", "SOLVER.ADAM_EPS"),
])
def test_bad_values_name_the_key(key, value, words):
    cfg = _cfg(key, value)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        aqd_d2.validate_aqd_config(cfg)


def test_trainer_trains_with_adam_from_a_bidet_config(tmp_path):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "BiDet" / "SSD300-VGG16-VOC-BiDet.yaml"))
    assert cfg.SOLVER.OPTIMIZER == "Adam" and cfg.SOLVER.BASE_LR == pytest.approx(1e-3)
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-FP.yaml"))
    cfg.merge_from_list(tiny_train_opts(str(tmp_path), max_iter=2) + [
        "SOLVER.OPTIMIZER", "Adam", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "SOLVER.CHECKPOINT_PERIOD", "100"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and trainer.optimizer.state  # Adam moments exist after the steps
