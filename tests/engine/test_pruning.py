"""SFP / PFEC filter pruning: norms and counts against hand values; the trainer hook
(aqd_d2.engine.pruning) pruning at the right iterations with detectron2's own SimpleTrainer,
SFP regrowth, the permanent PFEC mask, the state through checkpoint / resume; and the schedule
the detector carries (aqd_d2.pruning.schedule), which gives the hook's weights bit for bit
under any trainer and checkpoints its masks in the model."""
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.layers import Conv2d
from torch import nn

import aqd_d2
from aqd_d2.config import ConfigError
from aqd_d2.engine.pruning import FilterPruningHook, build_pruning_hook
from aqd_d2.modeling.training_features import TrainingFeatures
from aqd_d2.pruning import apply_filter_masks, filter_norms, lowest_norm_mask, num_pruned_filters
from aqd_d2.pruning.compact import masks_from_checkpoint
from aqd_d2.pruning.schedule import FilterPruningSchedule, PruningRule, mask_buffer_name
from aqd_d2.engine.stage_hook import build_aqd_hooks

import pytest


def test_filter_norms_hand_values():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0]]).view(3, 1, 1, 2)
    assert torch.allclose(filter_norms(w, 2), torch.tensor([5.0, 1.0, 8 ** 0.5]))  # SFP: L2 norm of each filter
    assert torch.allclose(filter_norms(w, 1), torch.tensor([7.0, 1.0, 4.0]))  # PFEC s_j


def test_num_pruned_filters_both_readings():
    assert num_pruned_filters(64, 0.7) == 44           # floor(64 * 0.7)
    assert num_pruned_filters(64, 0.3) == 19           # floor(19.2)
    assert num_pruned_filters(10, 0.3) == 3            # 0.3 * 10 is 3 despite float error
    assert num_pruned_filters(64, 0.7, "kept") == 19   # SFP code: --rate 0.7 keeps 70%
    assert num_pruned_filters(1, 0.9) == 0             # never the last filter


def test_l1_and_l2_rank_differently():
    # filter 0 = [3, 0]: L1 3, L2 3;  filter 1 = [2, 2]: L1 4, L2 2.83;  filter 2 = [5, 5]
    w = torch.tensor([[3.0, 0.0], [2.0, 2.0], [5.0, 5.0]]).view(3, 1, 1, 2)
    assert lowest_norm_mask(w, 1, 2).tolist() == [True, False, True]   # SFP prunes filter 1
    assert lowest_norm_mask(w, 1, 1).tolist() == [False, True, True]   # PFEC prunes filter 0


def test_masks_zero_conv_bias_and_norm_so_channel_outputs_zero():
    conv = Conv2d(2, 4, 3, padding=1, bias=True, norm=nn.BatchNorm2d(4), activation=nn.ReLU())
    model = nn.Module()
    model.backbone = conv
    with torch.no_grad():
        conv.norm.running_mean.fill_(0.3)
        conv.norm.bias.fill_(0.5)
    keep = torch.tensor([True, False, True, False])
    apply_filter_masks(model, {"backbone": keep})
    conv.eval()
    y = conv(torch.randn(2, 2, 5, 5))
    assert torch.all(y[:, [1, 3]] == 0) and torch.any(y[:, [0, 2]] != 0)


# ---- the hook on detectron2's SimpleTrainer ----------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 10, 1), nn.Conv2d(10, 6, 1))
        self.head = nn.Conv2d(6, 1, 1)

    def forward(self, batch):
        x, t = batch
        return {"loss": ((self.head(self.backbone(x)) - t) ** 2).mean()}


def _loader():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)


class _Record(HookBase):
    """Records per completed iteration the backbone weights (after the hooks before it)."""

    def __init__(self):
        self.weights = {}

    def before_train(self):
        self.weights[self.trainer.iter] = self._snap()

    def after_step(self):
        self.weights[self.trainer.iter + 1] = self._snap()

    def _snap(self):
        return [m.weight.detach().clone() for m in self.trainer.model.backbone]


def _run(hook, max_iter, start=0, model=None, state=None):
    torch.manual_seed(0)
    model = model or _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = SimpleTrainer(model, _loader(), opt)
    pre, post = _Record(), _Record()
    trainer.register_hooks([pre, hook, post])
    if state is not None:
        trainer.load_state_dict(state)
    trainer.train(start, max_iter)
    return trainer, pre, post


def _zero_rows(w):
    return (w.flatten(1).abs().sum(1) == 0).tolist()


def test_sfp_prunes_lowest_l2_filters_at_interval_and_lets_them_regrow():
    hook = FilterPruningHook("sfp", 0.3, [r"^backbone\."], p=2, interval=3)
    trainer, pre, post = _run(hook, max_iter=8)
    pruning_iters = {0, 3, 6, 8}  # before training, every 3 completed iterations, the end
    for k in range(9):
        for w_pre, w_post in zip(pre.weights[k], post.weights[k]):
            zero = _zero_rows(w_post)
            if k in pruning_iters:
                expected = (~lowest_norm_mask(w_pre, num_pruned_filters(w_pre.shape[0], 0.3), 2)).tolist()
                assert zero == expected, k
                assert sum(zero) == int(w_pre.shape[0] * 0.3)
            else:
                assert not any(zero), k  # the zeroed filters were updated: they regrow
    assert hook.last_prune_iter == 8
    sd = trainer.state_dict()["hooks"]["FilterPruningHook"]
    assert sd["last_prune_iter"] == 8 and set(sd["masks"]) == {"backbone.0", "backbone.1"}


def test_sfp_start_iter_delays_pruning():
    hook = FilterPruningHook("sfp", 0.5, [r"^backbone\.0$"], p=2, interval=2, start_iter=3)
    _, _, post = _run(hook, max_iter=6)
    assert [any(_zero_rows(post.weights[k][0])) for k in range(7)] == \
        [False, False, False, True, False, True, True]


def test_pfec_ranks_by_l1_once_and_mask_persists():
    hook = FilterPruningHook("pfec", 0.3, [r"^backbone\."], p=1)
    _, pre, post = _run(hook, max_iter=5)
    masks = {n: (~lowest_norm_mask(w, num_pruned_filters(w.shape[0], 0.3), 1)).tolist()
             for n, w in zip(["backbone.0", "backbone.1"], pre.weights[0])}
    assert hook.last_prune_iter == 0
    for k in range(6):
        for name, w in zip(["backbone.0", "backbone.1"], post.weights[k]):
            assert _zero_rows(w) == masks[name], (k, name)
    assert sum(masks["backbone.0"]) == 3 and sum(masks["backbone.1"]) == 1


def test_state_survives_trainer_checkpoint_and_resume():
    hook = FilterPruningHook("pfec", 0.3, [r"^backbone\."], p=1)
    trainer, _, _ = _run(hook, max_iter=3)
    state = trainer.state_dict()
    saved = {k: v.clone() for k, v in hook.masks.items()}
    # a new run: fresh (unpruned) model carrying the checkpointed weights, new hook
    model = _Net()
    model.load_state_dict(trainer.model.state_dict())
    hook2 = FilterPruningHook("pfec", 0.3, [r"^backbone\."], p=1)
    _, _, post = _run(hook2, max_iter=6, start=3, model=model, state=state)
    assert hook2.last_prune_iter == 0  # not pruned again: the checkpointed mask is kept
    assert all(torch.equal(saved[k], hook2.masks[k]) for k in saved)
    for k in range(3, 7):
        assert _zero_rows(post.weights[k][0]) == (~saved["backbone.0"]).tolist()


class _Checkpoint(HookBase):
    """Keeps trainer + model state after ``at`` completed iterations (as PeriodicCheckpointer)."""

    def __init__(self, at):
        self.at, self.saved = at, None

    def after_step(self):
        if self.trainer.iter + 1 == self.at:
            self.saved = (self.trainer.state_dict(),
                          {k: v.clone() for k, v in self.trainer.model.state_dict().items()})


def test_sfp_resume_keeps_regrown_filters_until_next_step():
    hook = FilterPruningHook("sfp", 0.3, [r"^backbone\."], p=2, interval=4)
    ckpt = _Checkpoint(at=2)
    torch.manual_seed(0)
    model = _Net()
    trainer = SimpleTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.05))
    trainer.register_hooks([hook, ckpt])
    trainer.train(0, 8)  # the run that "crashed": its state after 2 iterations is resumed
    state, weights = ckpt.saved
    assert state["hooks"]["FilterPruningHook"]["last_prune_iter"] == 0
    model = _Net()
    model.load_state_dict(weights)
    hook2 = FilterPruningHook("sfp", 0.3, [r"^backbone\."], p=2, interval=4)
    _, pre, post = _run(hook2, max_iter=5, start=2, model=model, state=state)
    assert not any(_zero_rows(post.weights[2][0]))          # resumed: regrown filters kept
    assert not any(_zero_rows(post.weights[3][0]))
    assert any(_zero_rows(post.weights[4][0]))              # the next SFP step (4 = 0 + 4)
    assert hook2.last_prune_iter == 5                       # and the final one


# ---- config ------------------------------------------------------------------------------------
def _cfg(*opts):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_config_builds_the_hook():
    cfg = _cfg("AQD.PRUNING.METHOD", "sfp", "AQD.PRUNING.RATE", "0.7", "AQD.PRUNING.INTERVAL", "5")
    aqd_d2.config.validate_aqd_config(cfg)
    hook = build_pruning_hook(cfg)
    assert hook.p == 2 and hook.interval == 5 and hook.rate == 0.7 and hook.method == "sfp"
    assert build_aqd_hooks(cfg, None) == []  # aqd_d2's Trainer: the detector carries pruning
    pfec = build_pruning_hook(_cfg("AQD.PRUNING.METHOD", "pfec"))
    assert pfec.p == 1 and pfec.method == "pfec"
    assert build_pruning_hook(_cfg()) is None


def test_sfp_default_interval_is_one_epoch():
    cfg = _cfg("AQD.PRUNING.METHOD", "sfp", "DATASETS.TRAIN", "('aqd_shapes_tiny_train',)",
               "SOLVER.IMS_PER_BATCH", "3")
    from detectron2.data import DatasetCatalog

    n = len(DatasetCatalog.get("aqd_shapes_tiny_train"))
    assert build_pruning_hook(cfg).interval == -(-n // 3)


@pytest.mark.parametrize("key,value,needle", [
    ("AQD.PRUNING.METHOD", "l1", "'pfec'"),
    ("AQD.PRUNING.RATE", "1.0", "AQD.PRUNING.RATE"),
    ("AQD.PRUNING.NORM", "l3", "'l2'"),
    ("AQD.PRUNING.LAYERS", "['(']", "AQD.PRUNING.LAYERS"),
    ("AQD.PRUNING.RATE_MEANS", "left", "'kept'"),
    ("AQD.PRUNING.COUPLED", "['a->b']", "regex=>replacement"),
])
def test_bad_values_name_key_and_choices(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        aqd_d2.config.validate_aqd_config(_cfg(key, value))


def test_coupled_layer_gets_the_ranked_layers_mask():
    hook = FilterPruningHook("pfec", 0.5, [r"^backbone\.0$"], p=1,
                             coupled=[r"^(backbone)\.0$=>\1.9"])
    with pytest.raises(ValueError, match="backbone.9"):
        hook.prune(_Net(), 0)
    net = _Net()
    net.backbone[1] = nn.Conv2d(10, 10, 1)
    hook = FilterPruningHook("pfec", 0.5, [r"^backbone\.0$"], p=1, coupled=[r"\.0$=>.1"])
    masks = hook.prune(net, 0)
    assert torch.equal(masks["backbone.1"], masks["backbone.0"])
    assert _zero_rows(net.backbone[1].weight) == (~masks["backbone.0"]).tolist()


def test_layers_matching_nothing_fail_clearly():
    hook = FilterPruningHook("sfp", 0.3, [r"^nothing"], interval=1)
    with pytest.raises(ValueError, match="AQD.PRUNING.LAYERS"):
        hook.prune(_Net(), 0)


# ---- the schedule the detector carries -------------------------------------------------------
def _attach(net, rule, max_iter):
    """What the QuantizedDetector builder does for a config with AQD.PRUNING."""
    net.filter_pruning = FilterPruningSchedule(rule, net, max_iter=max_iter)
    features = TrainingFeatures({})
    net.register_forward_pre_hook(features)
    net.register_state_dict_pre_hook(features.before_state_dict)
    return net


class _Checkpoints(HookBase):
    """The model's state_dict after each step, as detectron2's PeriodicCheckpointer takes it."""

    def __init__(self):
        self.states = {}

    def after_step(self):
        self.states[self.trainer.iter + 1] = {
            k: v.clone() for k, v in self.trainer.model.state_dict().items()}


@pytest.mark.parametrize("method,interval", [("sfp", 3), ("pfec", 1)])
def test_model_schedule_equals_the_hook_bit_for_bit(method, interval):
    """Driven by the event storage inside a plain SimpleTrainer (no pruning hook), the model's
    schedule gives what the hook gives: the same weights for every step's forward and in every
    checkpoint (state_dict after each step, final SFP step included), the same masks."""
    kw = dict(method=method, rate=0.3, layers=[r"^backbone\."], p=2 if method == "sfp" else 1,
              interval=interval)
    hook, ref_ckpt = FilterPruningHook(**kw), _Checkpoints()
    torch.manual_seed(0)
    ref_net = _Net()
    trainer = SimpleTrainer(ref_net, _loader(), torch.optim.SGD(ref_net.parameters(), lr=0.05, momentum=0.9))
    trainer.register_hooks([hook, ref_ckpt])
    trainer.train(0, 7)

    torch.manual_seed(0)
    net = _attach(_Net(), PruningRule(**kw), max_iter=7)
    seen, ckpt = {}, _Checkpoints()
    net.register_forward_pre_hook(  # the weights each step computes with
        lambda m, a: seen.__setitem__(len(seen), [w.weight.detach().clone() for w in m.backbone]))
    trainer = SimpleTrainer(net, _loader(), torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    trainer.register_hooks([ckpt])
    trainer.train(0, 7)
    assert len(seen) == 7
    for k in range(1, 8):
        a, b = ref_ckpt.states[k], ckpt.states[k]
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
        if k < 7:  # the next step's forward sees what the checkpoint holds
            assert all(torch.equal(w, b[f"backbone.{i}.weight"]) for i, w in enumerate(seen[k]))
    sched = net.filter_pruning
    assert sched.last_prune == hook.last_prune_iter == (7 if method == "sfp" else 0)
    assert set(sched.masks()) == set(hook.masks)
    assert all(torch.equal(sched.masks()[n], m) for n, m in hook.masks.items())
    final = ckpt.states[7]
    assert int(final["filter_pruning.last_prune_iter"]) == hook.last_prune_iter
    assert all(torch.equal(final["filter_pruning." + mask_buffer_name(n)], m)
               for n, m in hook.masks.items())


def test_model_schedule_catches_up_in_eval_and_travels_in_state_dict():
    """An eval forward applies the step due after the last training step; load_state_dict
    restores the schedule's state."""
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    rule = PruningRule("sfp", 0.3, [r"^backbone\."], p=2, interval=2)
    net = _attach(_Net(), rule, max_iter=None)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    batch = next(_loader())
    with torch.no_grad():
        net.eval()(batch)  # never trained: nothing to catch up with
    assert net.filter_pruning.last_prune == -1
    net.train()
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            loss = net(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert net.filter_pruning.last_prune == 0
    assert not any(_zero_rows(net.backbone[0].weight))  # regrown after the two steps
    net.eval()
    with torch.no_grad():
        net(batch)  # 2 completed iterations: the SFP step due at 2 comes first
    assert net.filter_pruning.last_prune == 2 and sum(_zero_rows(net.backbone[0].weight)) == 3
    other = _attach(_Net(), rule, None)
    other.load_state_dict(net.state_dict())
    assert other.filter_pruning.last_prune == 2
    assert all(torch.equal(other.filter_pruning.masks()[n], m)
               for n, m in net.filter_pruning.masks().items())


# ---- through aqd_d2's Trainer (detectron2 DefaultTrainer) -------------------------------------
def test_trainer_checkpoints_pfec_masks_in_the_model_and_resume_restores_them(tmp_path):
    from aqd_d2.engine import Trainer
    from tests.conftest import tiny_train_opts
    from tests.test_configs import load_test_config

    def cfg(max_iter):
        return load_test_config("configs/Pruned/R18-FPN-shapes-voc-cpu-PFEC.yaml",
                                tiny_train_opts(tmp_path, max_iter) + ["DATASETS.TEST", "()"])

    trainer = Trainer(cfg(2))
    assert not any(isinstance(h, FilterPruningHook) for h in trainer._hooks)
    sched = trainer.model.filter_pruning
    assert sched.rule.method == "pfec" and sched.rule.p == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    masks = {k: v.clone() for k, v in sched.masks().items()}
    assert len(masks) == 8 and all(int((~m).sum()) == int(m.numel() * 0.3) for m in masks.values())
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert int(ckpt["model"]["filter_pruning.last_prune_iter"]) == 0
    saved = masks_from_checkpoint(str(tmp_path / "model_final.pth"))
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)
    for name, keep in masks.items():  # the saved weights carry the permanent mask
        assert _zero_rows(ckpt["model"][name + ".weight"]) == (~keep).tolist()
        assert torch.all(ckpt["model"][name + ".norm.weight"][~keep] == 0)
        assert torch.all(ckpt["model"][name + ".norm.bias"][~keep] == 0)

    trainer2 = Trainer(cfg(4))
    trainer2.resume_or_load(resume=True)
    sched2 = trainer2.model.filter_pruning
    assert trainer2.start_iter == 2 and sched2.last_prune == 0
    assert all(torch.equal(sched2.masks()[k], masks[k]) for k in masks)
    trainer2.train()
    assert sched2.last_prune == 0  # PFEC prunes once: not again after the resume
    state = trainer2.model.state_dict()
    for name, keep in masks.items():
        assert _zero_rows(state[name + ".weight"]) == (~keep).tolist()


def test_stock_default_trainer_prunes_sfp_once_per_epoch_of_the_dataset(tmp_path):
    """AQD.PRUNING.INTERVAL 0 = one epoch: read from DATASETS.TRAIN at the first batch of a
    stock DefaultTrainer (16 images / 4 per batch = 4 iterations): steps at 0, 4 and 5 (final)."""
    from detectron2.engine import DefaultTrainer

    from tests.conftest import tiny_train_opts
    from tests.test_configs import load_test_config

    cfg = load_test_config("configs/LightHead/ShuffleNetV2-x0.5-LightHead-shapes-voc-cpu-SFP.yaml",
                           tiny_train_opts(tmp_path, 5) + [
                               "DATASETS.TRAIN", "('aqd_shapes_voc_tiny_train',)",
                               "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "4",
                               "SOLVER.CHECKPOINT_PERIOD", "100", "AQD.PRUNING.INTERVAL", "0"])
    trainer = DefaultTrainer(cfg)
    sched = trainer.model.filter_pruning
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a: seen.append(sched.last_prune) if m.training else None)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert sched.interval() == 4 and seen == [0, 0, 0, 0, 4]
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(state["filter_pruning.last_prune_iter"]) == 5  # the final step, in the checkpoint
    for name, keep in sched.masks().items():
        assert _zero_rows(state[name + ".weight"]) == (~keep).tolist(), name


@pytest.mark.parametrize("rel_path", ["configs/Pruned/R18-FPN-shapes-voc-cpu-PFEC.yaml",
                                      "configs/Pruned/R18-FPN-shapes-voc-cpu-SFP.yaml"])
def test_schedule_reads_no_tensor_value_between_pruning_steps(rel_path, monkeypatch):
    """Between pruning steps (PFEC: re-zeroing the permanent mask every step) the schedule
    reads no tensor value: on a GPU each read would stall the launch queue."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tests.test_configs import load_test_config, tiny_batch

    cfg = load_test_config(rel_path, ["AQD.PRUNING.INTERVAL", "0" if "PFEC" in rel_path else "10"],
                           narrow=True)
    model = build_model(cfg).train()
    hook, batch = model.training_features, (tiny_batch(),)
    for it in (0, 1):  # the pruning step at 0 ranks filters (reads), then one plain step
        with EventStorage(it):
            hook(model, batch)
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "__index__"):
        def boom(*a, _n=name, **k):
            raise AssertionError(f"tensor read ({_n}) while applying the pruning schedule")
        monkeypatch.setattr(torch.Tensor, name, boom)
    for it in (2, 3):
        with EventStorage(it):
            hook(model, batch)
        hook.before_state_dict(model, "", False)  # a checkpoint between steps
    monkeypatch.undo()
    assert model.filter_pruning.last_prune == 0


def test_every_rank_catches_up_before_rank0_buffers_are_broadcast(monkeypatch):
    """aqd_d2's Trainer.test gives every rank rank 0's buffers (BN statistics). Rank 0 may have
    applied a due SFP step when it saved a checkpoint, the other ranks not yet: each rank
    catches up itself (the schedule's counters are not broadcast): all weights then agree."""
    import copy

    import torch.distributed as dist
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from aqd_d2.engine.trainer import _broadcast_buffers_from_rank0

    torch.manual_seed(0)
    rank0 = _attach(_Net(), PruningRule("sfp", 0.3, [r"^backbone\."], p=2, interval=2), None)
    rank1 = copy.deepcopy(rank0)
    batch = next(_loader())
    for net in (rank0, rank1):  # the same two DDP steps on both ranks
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        with EventStorage(0) as storage:
            for it in range(2):
                storage.iter = it
                opt.zero_grad()
                net(batch)["loss"].backward()
                opt.step()
    rank0.state_dict()  # rank 0 writes a checkpoint: the SFP step due at 2 is applied
    assert rank0.filter_pruning.last_prune == 2 and rank1.filter_pruning.last_prune == 0
    sent = []
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", lambda t, src=0, **k: sent.append(t))
    _broadcast_buffers_from_rank0(rank1)  # on rank 1
    assert not sent  # _Net's only buffers are the schedule's
    assert rank1.filter_pruning.last_prune == 2
    for a, b in zip(rank0.parameters(), rank1.parameters()):
        assert torch.equal(a, b)
