"""Non-finite loss / gradient policy of AQDTrainLoop (AQD.NONFINITE.*)."""

import pytest
import torch
from torch import nn



def _cfg(policy="raise", max_skips=2, check_grads=False):
    from detectron2.config import get_cfg

    import aqd_d2

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.AQD.NONFINITE.POLICY = policy
    cfg.AQD.NONFINITE.MAX_SKIPS = max_skips
    cfg.AQD.NONFINITE.CHECK_GRADS = check_grads
    cfg.MODEL.DEVICE = "cpu"
    return cfg


class _ToyModel(nn.Module):
    """Loss dict with two terms; ``loss_b`` becomes NaN for inputs listed in ``nan_at``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        x, poison = batch
        loss_a = (self.w * x).sum()
        loss_b = (self.w ** 2).sum() * (float("nan") if poison else 1.0)
        return {"loss_a": loss_a, "loss_b": loss_b}


def _loop(cfg, batches):
    from aqd_d2.engine.train_loop import AQDTrainLoop

    model = _ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return AQDTrainLoop(cfg, model, batches, opt)


def test_check_finite_api():
    from aqd_d2.engine.train_loop import NonFiniteLossError

    loop = _loop(_cfg("raise"), [])
    loop.iter = 7
    assert loop.check_finite({"a": torch.tensor(1.0), "b": torch.tensor([2.0, 3.0])}) is True
    with pytest.raises(NonFiniteLossError, match=r"iteration 7.*\['loss_gan'\]"):
        loop.check_finite({"loss_det": torch.tensor(1.0), "loss_gan": torch.tensor(float("inf"))},
                          what="GAN loss")
    skip = _loop(_cfg("skip", max_skips=1), [])
    skip.iter = 3
    assert skip.check_finite({"x": torch.tensor(float("nan"))}) is False
    assert skip.check_finite({"y": torch.tensor(float("nan"))}) is False  # same iteration
    assert (skip.skipped_iters, skip.consecutive_skips) == (1, 1)


def test_raise_policy_names_term_and_iteration():
    from detectron2.utils.events import EventStorage

    from aqd_d2.engine.train_loop import NonFiniteLossError

    data = [(torch.ones(3), False), (torch.ones(3), True)]
    loop = _loop(_cfg("raise"), iter(data))
    with EventStorage(0):
        loop.iter = 0
        loop.run_step()
        loop.iter = 1
        with pytest.raises(NonFiniteLossError) as e:
            loop.run_step()
    msg = str(e.value)
    assert "iteration 1" in msg and "loss_b" in msg and "loss_a" not in msg.split("(")[0]
    assert "AQD.NONFINITE.POLICY" in msg


def test_skip_policy_skips_counts_and_gives_up():
    from detectron2.utils.events import EventStorage

    from aqd_d2.engine.train_loop import NonFiniteLossError

    poison = [False, True, False, True, True, True]
    loop = _loop(_cfg("skip", max_skips=2), iter([(torch.ones(3), p) for p in poison]))
    w = loop.model.w
    with EventStorage(0) as storage:
        # iteration 0: finite, SGD step: w <- 1 - 0.1 * (1 + 2w) = 0.7
        loop.iter = 0
        loop.run_step()
        assert torch.allclose(w.detach(), torch.full((3,), 0.7))
        # iteration 1: NaN -> no step, no gradient left behind
        loop.iter = 1
        loop.run_step()
        assert torch.allclose(w.detach(), torch.full((3,), 0.7)) and w.grad is None
        assert storage.history("nonfinite/skipped_iters").latest() == 1
        loop.iter = 2  # finite again: w <- 0.7 - 0.1 * (1 + 1.4) = 0.46
        loop.run_step()
        assert torch.allclose(w.detach(), torch.full((3,), 0.46))
        for it in (3, 4):  # two consecutive skips are allowed (MAX_SKIPS = 2) ...
            loop.iter = it
            loop.run_step()
        assert (loop.skipped_iters, loop.consecutive_skips) == (3, 2)
        loop.iter = 5  # ... a third in a row is not
        with pytest.raises(NonFiniteLossError, match="3 consecutive iterations skipped"):
            loop.run_step()
    state = loop.state_dict()["nonfinite"]
    assert state == {"skipped_iters": 4, "consecutive_skips": 3, "last_skipped_iter": 5}
    fresh = _loop(_cfg("skip"), [])
    fresh.load_state_dict(loop.state_dict())
    assert (fresh.skipped_iters, fresh.consecutive_skips, fresh.last_skipped_iter) == (4, 3, 5)


def test_nonfinite_gradient_check():
    from detectron2.utils.events import EventStorage

    from aqd_d2.engine.train_loop import NonFiniteLossError

    class SqrtModel(_ToyModel):
        def forward(self, batch):  # finite loss, infinite gradient at w = 0
            return {"loss_sqrt": self.w.abs().sqrt().sum()}

    for policy in ("raise", "skip"):
        from aqd_d2.engine.train_loop import AQDTrainLoop

        model = SqrtModel()
        with torch.no_grad():
            model.w[1] = 0.0
        loop = AQDTrainLoop(_cfg(policy, check_grads=True), model, iter([None]),
                            torch.optim.SGD(model.parameters(), lr=0.1))
        with EventStorage(0):
            if policy == "raise":
                with pytest.raises(NonFiniteLossError, match=r"non-finite gradient.*\['w'\]"):
                    loop.run_step()
            else:
                loop.run_step()
                assert model.w.grad is None and torch.equal(model.w.detach(),
                                                            torch.tensor([1.0, 0.0, 1.0]))


def test_config_keys_validated():
    from aqd_d2.config import ConfigError, validate_aqd_config

    cfg = _cfg()
    validate_aqd_config(cfg)
    cfg.AQD.NONFINITE.POLICY = "ignore"
    with pytest.raises(ConfigError, match=r"AQD.NONFINITE.POLICY.*'raise', 'skip'"):
        validate_aqd_config(cfg)
    cfg = _cfg()
    cfg.AQD.NONFINITE.MAX_SKIPS = -1
    with pytest.raises(ConfigError, match="AQD.NONFINITE.MAX_SKIPS"):
        validate_aqd_config(cfg)


def _ddp_worker(policy, out_dir):
    """Each of 2 gloo ranks: DDP toy model, rank 1's loss is NaN at iteration 1 only."""
    import os

    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from aqd_d2.engine.train_loop import AQDTrainLoop, NonFiniteLossError

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(_ToyModel(), device_ids=None)
    data = iter([(torch.full((3,), 1.0 + rank), rank == 1 and it == 1) for it in range(3)])
    loop = AQDTrainLoop(_cfg(policy), model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    result = {"error": None}
    with EventStorage(0):
        try:
            for it in range(3):
                loop.iter = it
                loop.run_step()
        except NonFiniteLossError as e:
            result["error"] = str(e)
    result.update(w=model.module.w.detach().clone(), skipped=loop.skipped_iters,
                  last=loop.last_skipped_iter)
    torch.save(result, os.path.join(out_dir, f"{policy}{rank}.pth"))


def test_ddp_ranks_take_the_same_decision(tmp_path):
    from aqd_d2.engine import launch_cpu

    for policy in ("skip", "raise"):
        launch_cpu(_ddp_worker, num_processes=2, args=(policy, str(tmp_path)))
        r0, r1 = (torch.load(tmp_path / f"{policy}{r}.pth") for r in (0, 1))
        if policy == "skip":
            # both ranks skipped iteration 1 (only rank 1 saw the NaN) and stayed identical:
            # 2 averaged SGD steps, grad = mean_r(x_r) + 2w = 1.5 + 2w
            assert r0["error"] is None and r1["error"] is None
            assert r0["skipped"] == r1["skipped"] == 1 and r0["last"] == r1["last"] == 1
            w = torch.ones(3)
            for _ in range(2):
                w = w - 0.1 * (1.5 + 2 * w)
            assert torch.equal(r0["w"], r1["w"]) and torch.allclose(r0["w"], w)
        else:
            # both ranks stop at iteration 1; rank 0's message names rank 1's term
            for r in (r0, r1):
                assert "iteration 1" in r["error"] and "rank 1: ['loss_b']" in r["error"]
            assert torch.equal(r0["w"], r1["w"])
