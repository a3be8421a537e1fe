"""AQDTrainLoop on both detectron2s: v0.6 (SimpleTrainer starts its iterator in __init__) and
main (lazy ``_data_loader_iter`` property, ``after_backward`` hooks, metric options)."""
import inspect

import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase, SimpleTrainer, TrainerBase
from detectron2.utils.events import EventStorage
from torch import nn

import aqd_d2
from aqd_d2.engine.train_loop import AQDTrainLoop


class _CountingLoader:
    """An endless loader that counts how many iterators were started over it."""

    def __init__(self):
        self.iterators = 0

    def __iter__(self):
        self.iterators += 1
        while True:
            yield [torch.ones(2)]


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, batch):
        return {"loss_a": (self.w * batch[0]).sum() ** 2}


def _loop(data_iter=None):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    model = _Model()
    loader = _CountingLoader()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return AQDTrainLoop(cfg, model, loader, opt, data_iter=data_iter), loader


def test_no_iterator_until_the_first_step_then_exactly_one():
    loop, loader = _loop()
    assert loader.iterators == 0
    with EventStorage(0):
        for i in range(3):
            loop.iter = i
            loop.run_step()
    assert loader.iterators == 1
    assert not torch.equal(loop.model.w.detach(), torch.tensor([0.5, -1.0]))


def test_handed_over_iterator_is_used_and_assignable():
    other = _CountingLoader()
    it = iter(other)
    loop, loader = _loop(data_iter=it)
    assert loop._data_loader_iter is it and loader.iterators == 0
    kept = iter([[torch.zeros(2)]])
    loop._data_loader_iter = kept  # the GAN loop feeds the detector step one kept batch
    with EventStorage(0):
        loop.run_step()
    assert loop.model.w.grad is not None and torch.equal(loop.model.w.grad, torch.zeros(2))
    loop.reset_data_loader(_CountingLoader)
    assert isinstance(loop.data_loader, _CountingLoader) and loop.data_loader.iterators == 0


def test_simple_trainer_attributes_of_the_installed_detectron2_are_set():
    loop, _ = _loop()
    params = inspect.signature(SimpleTrainer.__init__).parameters
    for name in ("gather_metric_period", "zero_grad_before_forward", "async_write_metrics"):
        if name in params:  # detectron2 main: its _write_metrics / after_train read them
            assert hasattr(loop, name), name
    with EventStorage(0) as loop.storage:
        loop.run_step()
        loop.after_train()  # main shuts its metric executor down here


def test_after_backward_hooks_run_where_detectron2_has_them():
    loop, _ = _loop()
    calls = []

    class _Hook(HookBase):
        def after_backward(self):
            calls.append(self.trainer.model.w.grad.clone())

    loop.register_hooks([_Hook()])
    with EventStorage(0):
        loop.run_step()
    if hasattr(TrainerBase, "after_backward"):
        # (0.5 - 1)^2 -> gradient 2 * (-0.5) * x = -1 for both weights
        assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([-1.0, -1.0]))
    else:
        assert calls == []
