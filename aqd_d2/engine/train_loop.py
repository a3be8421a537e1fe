"""Training loops (one optimisation step per call of ``run_step``) chosen by ``AQD.TRAIN_LOOP``.

aqd_d2's Trainer replaces detectron2's ``SimpleTrainer`` by the loop the config names, built
as ``Loop(cfg, model, data_loader, optimizer)``. ``"AQDTrainLoop"`` (the default) is
detectron2's SimpleTrainer step plus the non-finite policy below; detectors that need more
than one optimiser per step (AutoBiDet's complexity-estimator GAN) register their own loop,
normally a subclass of :class:`AQDTrainLoop` that calls :meth:`AQDTrainLoop.check_finite` on
each of its loss dicts.

Non-finite policy (``AQD.NONFINITE.*``): a NaN/Inf loss term (or, with ``CHECK_GRADS``, a
NaN/Inf gradient) either stops the run with a :class:`NonFiniteLossError` naming the term(s),
the rank(s) and the iteration (``POLICY "raise"``), or skips the update (``"skip"``: no
optimizer step, gradients cleared, the iteration counted in the event storage as
``nonfinite/skipped_iters``) until more than ``MAX_SKIPS`` *consecutive* iterations were
skipped, which raises. Under DDP the decision is all-reduced, so every rank skips (or
raises) together and the replicas stay identical.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Dict, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry

__all__ = ["TRAIN_LOOP_REGISTRY", "AQDTrainLoop", "NonFiniteLossError", "build_train_loop"]

logger = logging.getLogger(__name__)

TRAIN_LOOP_REGISTRY = Registry("AQD_TRAIN_LOOP")
TRAIN_LOOP_REGISTRY.__doc__ = "Training loops, looked up by cfg.AQD.TRAIN_LOOP."


# Feature detection (never version strings: detectron2 main still says "0.6").
# main (since 2023): SimpleTrainer._data_loader_iter is a lazily created property.
_SIMPLE_TRAINER_ITER_IS_LAZY = isinstance(
    inspect.getattr_static(SimpleTrainer, "_data_loader_iter", None), property)
# main: TrainerBase.after_backward runs the hooks' after_backward after loss.backward().
_HAS_AFTER_BACKWARD = hasattr(TrainerBase, "after_backward")


class NonFiniteLossError(FloatingPointError):
    """A loss term or gradient became NaN/Inf (message: terms, ranks, iteration)."""


def _nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the entries of ``tensors`` holding any NaN/Inf value."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v.detach()).all())]


@TRAIN_LOOP_REGISTRY.register()
class AQDTrainLoop(SimpleTrainer):
    """detectron2's SimpleTrainer step, built from the config, with the non-finite policy.

    Args:
        cfg: the config (loops read their own keys from it; this one ``AQD.NONFINITE.*``).
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        data_iter: an iterator over ``data_loader`` already started (the Trainer passes the
            one of the SimpleTrainer it replaces, so loader workers are not started twice).
    """

    def __init__(self, cfg, model, data_loader, optimizer, data_iter: Optional[Iterator] = None):
        self._aqd_data_iter = data_iter
        if _SIMPLE_TRAINER_ITER_IS_LAZY:
            # detectron2 main: SimpleTrainer.__init__ starts no iterator; it also sets the
            # attributes its _write_metrics / after_train read (gather_metric_period,
            # zero_grad_before_forward, async_write_metrics, concurrent_executor).
            SimpleTrainer.__init__(self, model, data_loader, optimizer)
        else:
            # detectron2 v0.6: SimpleTrainer.__init__ would start a second iterator (and its
            # worker processes); set the same attributes it sets instead.
            TrainerBase.__init__(self)
            model.train()
            self.model = model
            self.data_loader = data_loader
            self.optimizer = optimizer
        self.cfg = cfg
        nf = cfg.AQD.NONFINITE
        self.nonfinite_policy: str = nf.POLICY
        self.max_skips: int = int(nf.MAX_SKIPS)
        self.check_grads: bool = bool(nf.CHECK_GRADS)
        # skipped-iteration bookkeeping; saved with the trainer state (state_dict below)
        self.skipped_iters = 0
        self.consecutive_skips = 0
        self.last_skipped_iter = -1

    # The loop owns its data iterator in both detectron2s (v0.6 assigns a plain attribute,
    # main made it a lazily created read-only property): created on first use unless the
    # Trainer handed over the iterator of the SimpleTrainer it replaces; assignable (the GAN
    # loop feeds the detector step one kept batch).
    @property
    def _data_loader_iter(self) -> Iterator:
        if self._aqd_data_iter is None:
            self._aqd_data_iter = iter(self.data_loader)
        return self._aqd_data_iter

    @_data_loader_iter.setter
    def _data_loader_iter(self, it: Iterator) -> None:
        self._aqd_data_iter = it

    def reset_data_loader(self, data_loader_builder) -> None:
        """As detectron2 main's SimpleTrainer.reset_data_loader (also offered on v0.6)."""
        del self.data_loader
        self.data_loader = data_loader_builder()
        self._aqd_data_iter = None

    # ---------------------------------------------------------------- non-finite policy
    def check_finite(self, loss_dict: Mapping[str, torch.Tensor], what: str = "loss") -> bool:
        """Apply the non-finite policy to ``loss_dict``; call it before ``backward``.

        Every rank must call it at the same point (the decision is all-reduced).

        Args:
            loss_dict: name -> loss tensor (any shape; normally scalars), e.g. the detector's
                loss dict or a GAN loop's generator/discriminator losses.
            what: word used in messages ("loss", "gradient", "GAN loss", ...).
        Returns:
            True: every value on every rank is finite, go on. False: skip this update
            (``POLICY "skip"``); the iteration has been counted.
        Raises:
            NonFiniteLossError: under ``POLICY "raise"``, or when more than ``MAX_SKIPS``
                consecutive iterations were skipped; names the terms, ranks and iteration.
        """
        bad = _nonfinite_names(loss_dict)
        if not self._any_rank(bool(bad), loss_dict):
            return True
        per_rank = comm.all_gather(bad)  # rare path: every rank enters it together
        where = "; ".join(f"rank {r}: {names}" for r, names in enumerate(per_rank) if names)
        values = {k: float(loss_dict[k].detach().float().sum()) for k in bad}
        msg = (f"non-finite {what} at iteration {self.iter}: {where}"
               + (f" (this rank's values: {values})" if values else ""))
        if self.nonfinite_policy == "raise":
            raise NonFiniteLossError(
                msg + ". Set AQD.NONFINITE.POLICY 'skip' to skip such steps instead.")
        self._count_skip()
        if self.consecutive_skips > self.max_skips:
            raise NonFiniteLossError(
                f"{msg}. {self.consecutive_skips} consecutive iterations skipped, more than "
                f"AQD.NONFINITE.MAX_SKIPS = {self.max_skips}: training has diverged.")
        logger.warning("%s: skipping this update (%d iteration(s) skipped so far, %d in a row)",
                       msg, self.skipped_iters, self.consecutive_skips)
        return False

    def check_finite_grads(self) -> bool:
        """:meth:`check_finite` applied to the gradients of the optimizer's parameters."""
        grads: Dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names.get(id(p), f"param@{id(p)}")] = p.grad
        # one reduction per step: a non-finite norm means some gradient is non-finite
        norms = torch._foreach_norm(list(grads.values())) if grads else []
        total = torch.stack([n.float() for n in norms]).sum() if norms else torch.zeros(())
        if not self._any_rank(not math.isfinite(float(total)), {"t": total}):
            return True
        # every rank gets here together; ranks with finite gradients pass an empty dict
        bad = {k: g for k, g in grads.items() if not bool(torch.isfinite(g).all())}
        return self.check_finite(bad, what="gradient")

    def _any_rank(self, flag: bool, like: Mapping[str, torch.Tensor]) -> bool:
        """``flag`` OR-ed over all ranks (a MAX all-reduce of one element)."""
        if comm.get_world_size() == 1:
            return flag
        device = next((v.device for v in like.values() if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _count_skip(self) -> None:
        it = int(self.iter)
        if it != self.last_skipped_iter:  # several checks per iteration count once
            self.skipped_iters += 1
            self.consecutive_skips = (self.consecutive_skips + 1
                                      if self.last_skipped_iter == it - 1 else 1)
            self.last_skipped_iter = it
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a training run (no storage)
            return
        storage.put_scalar("nonfinite/skipped_iters", self.skipped_iters, smoothing_hint=False)

    # ---------------------------------------------------------------- the step
    def run_step(self) -> None:
        """One SimpleTrainer step (load, forward, backward, step) with the non-finite checks."""
        assert self.model.training, "[AQDTrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        self.optimizer.zero_grad()
        if not self.check_finite(loss_dict):
            return  # every rank skips backward and step together
        losses = sum(loss_dict.values())
        losses.backward()
        if _HAS_AFTER_BACKWARD:
            self.after_backward()  # detectron2 main: hooks' after_backward
        if self.check_grads and not self.check_finite_grads():
            self.optimizer.zero_grad()
            return
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["nonfinite"] = {"skipped_iters": self.skipped_iters,
                            "consecutive_skips": self.consecutive_skips,
                            "last_skipped_iter": self.last_skipped_iter}
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        nf = state_dict.get("nonfinite", {})
        self.skipped_iters = int(nf.get("skipped_iters", 0))
        self.consecutive_skips = int(nf.get("consecutive_skips", 0))
        self.last_skipped_iter = int(nf.get("last_skipped_iter", -1))


def build_train_loop(cfg, model, data_loader, optimizer, data_iter: Optional[Iterator] = None
                     ) -> SimpleTrainer:
    """The loop named by ``cfg.AQD.TRAIN_LOOP`` (arguments as for :class:`AQDTrainLoop`)."""
    name = cfg.AQD.TRAIN_LOOP
    if name not in TRAIN_LOOP_REGISTRY:
        from aqd_d2.config import ConfigError

        raise ConfigError(f"AQD.TRAIN_LOOP = {name!r} is not a registered training loop; known: "
                          f"{sorted(k for k, _ in TRAIN_LOOP_REGISTRY)}")
    return TRAIN_LOOP_REGISTRY.get(name)(cfg, model, data_loader, optimizer, data_iter=data_iter)
