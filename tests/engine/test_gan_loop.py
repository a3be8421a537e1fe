"""BiDetGANLoop: each sub-step updates only its own parameters (paper 000 sec. 4.1: detector,
then two D steps, then one G step), the GAN losses are logged, and the GAN optimizers' state
survives a checkpoint round trip (loop state_dict and the Trainer's checkpoint)."""
import itertools

import torch

from detectron2.modeling import build_model
from detectron2.engine import TrainerBase
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from aqd_d2.engine import Trainer
from aqd_d2.engine.gan_loop import BiDetGANLoop, LoopStateHook
from aqd_d2.engine.train_loop import AQDTrainLoop
from tests.conftest import tiny_train_opts
from tests.test_configs import load_test_config, tiny_batch

AUTO = "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-AutoBiDet.yaml"


def _loop():
    torch.manual_seed(0)
    cfg = load_test_config(AUTO, narrow=True)
    model = build_model(cfg).train()
    batches = [tiny_batch(), tiny_batch()]
    loop = BiDetGANLoop(cfg, model, batches, build_optimizer(cfg, model),
                        data_iter=iter(itertools.cycle(batches)))
    return loop, model, batches


def _snap(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(a, b):
    return {n for n in a if not torch.equal(a[n], b[n])}


def test_each_substep_updates_only_its_parameters():
    loop, model, batches = _loop()
    est = loop.estimator
    d_names = {n for n, _ in model.named_parameters() if n.startswith("bidet.estimator.discriminator.")}
    g_names = {n for n, _ in model.named_parameters() if n.startswith("bidet.estimator.generator.")}
    assert d_names and g_names
    with EventStorage(0) as storage:
        s0 = _snap(model)
        AQDTrainLoop.run_step(loop)  # the detector step alone
        s1 = _snap(model)
        det = _changed(s0, s1)
        assert det and not any(n.startswith("bidet.") for n in det)
        f, real = model.estimator_inputs(batches[0])
        loop._gan_step("gan_loss_d", loop.d_params, loop.d_optimizer, est.discriminator_loss, f, real)
        s2 = _snap(model)
        assert _changed(s1, s2) and _changed(s1, s2) <= d_names
        loop._gan_step("gan_loss_g", loop.g_params, loop.g_optimizer, est.generator_loss, f, real)
        s3 = _snap(model)
        assert _changed(s2, s3) and _changed(s2, s3) <= g_names
        # a full iteration: detector, D_STEPS = 2 discriminator steps, one generator step
        loop.run_step()
        s4 = _snap(model)
        changed = _changed(s3, s4)
        assert changed & d_names and changed & g_names and changed - d_names - g_names
        assert loop.d_optimizer.state_dict()["state"][0]["step"].item() == 1 + 2
        assert loop.g_optimizer.state_dict()["state"][0]["step"].item() == 1 + 1
        assert {"gan_loss_d", "gan_loss_g"} <= set(storage.latest())
    assert not any(p.requires_grad for p in est.parameters())


def test_loop_state_round_trip_through_hook_state():
    """detectron2 0.6's TrainerBase saves hook states only: LoopStateHook carries the loop's."""
    loop, _, _ = _loop()
    with EventStorage(0):
        loop.run_step()
    src = TrainerBase()
    src._trainer = loop
    src.register_hooks([LoopStateHook()])
    state = src.state_dict()
    assert "gan" in state["hooks"]["LoopStateHook"]["loop"]
    other, _, _ = _loop()
    dst = TrainerBase()
    dst._trainer = other
    dst.register_hooks([LoopStateHook()])
    dst.load_state_dict(state)
    for a, b in ((loop.d_optimizer, other.d_optimizer), (loop.g_optimizer, other.g_optimizer)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    assert other.d_optimizer.param_groups[0]["lr"] == 2e-4
    assert other.g_optimizer.param_groups[0]["lr"] == 5e-5


def test_trainer_checkpoint_keeps_gan_optimizers(tmp_path):
    def trainer(resume):
        cfg = load_test_config(AUTO, extra=tiny_train_opts(tmp_path, max_iter=1)
                               + ["DATASETS.TEST", "()"], narrow=True)
        t = Trainer(cfg)
        t.resume_or_load(resume=resume)
        return t

    t1 = trainer(False)
    assert any(isinstance(h, LoopStateHook) for h in t1._hooks)
    t1.train()
    saved = t1._trainer.d_optimizer.state_dict()["state"]
    assert saved and (tmp_path / "model_final.pth").exists()
    t2 = trainer(True)
    assert t2.start_iter == 1
    loaded = t2._trainer.d_optimizer.state_dict()["state"]
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(saved[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"])
