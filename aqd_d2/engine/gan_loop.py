"""``BiDetGANLoop``: AutoBiDet's alternating training (paper 000 sec. 3.2.1 and 4.1).

Each iteration, on one batch:

1. detector step: the model's loss dict (beta = T(D(G(f))) from the current estimator,
   without gradient to G / D), detectron2's optimizer (which holds no estimator parameter:
   they do not require grad outside the estimator's steps, see
   :mod:`aqd_d2.modeling.bidet.estimator`);
2. ``D_STEPS`` discriminator steps (eq. 9, D maximises log D(x) + log(1 - D(G(f)))), Adam
   ``D_LR`` (2e-4), only D's parameters;
3. one generator step (eq. 9, G minimises log(1 - D(G(f)))), Adam ``G_LR`` (5e-5), only
   G's parameters (the whole VAE for the beta-VAE estimator, which has no D steps).

The estimator's inputs are the batch's features from one extra no-grad backbone forward
(``model.estimator_inputs``). Both D steps use the current batch (the paper does not say
whether the two steps see different batches; reading extra batches would change the
detector's data order). The paper trains the GAN "until the generator loss converged" in
each round; here every iteration is one round (D_STEPS + 1 GAN steps), a documented
simplification. Every GAN loss dict goes through :meth:`AQDTrainLoop.check_finite`; a
non-finite one skips that GAN step under POLICY "skip". Under DDP the estimator's parameters
are broadcast from rank 0 when the loop is built and its gradients are averaged over ranks
before each GAN step, so the replicas stay identical.

The loop marks the detector as trained with its GAN steps; a detector whose config names
this loop refuses to train under a trainer that did not build it (e.g. detectron2's stock
``DefaultTrainer``; :mod:`aqd_d2.modeling.training_features`). ``aqd_d2.engine.setup(trainer)``
installs it in such a trainer.

Checkpointing: :meth:`state_dict` / :meth:`load_state_dict` add the two Adam states to the
loop's state. detectron2 0.6's DefaultTrainer does not save its loop's state, so
:class:`LoopStateHook` (added by ``build_aqd_hooks`` for this loop) puts it into the
trainer checkpoint as a hook state.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional

import torch
from detectron2.engine import HookBase, TrainerBase
from detectron2.utils import comm
from torch import nn

from aqd_d2.modeling.bidet.estimator import ComplexityEstimator, trainable
from aqd_d2.modeling.training_features import mark_trainer_setup
from aqd_d2.utils import unwrap_model

from .train_loop import TRAIN_LOOP_REGISTRY, AQDTrainLoop

__all__ = ["BiDetGANLoop", "LoopStateHook", "build_loop_state_hooks", "find_estimator"]

logger = logging.getLogger(__name__)


def find_estimator(model: nn.Module) -> ComplexityEstimator:
    """The model's complexity estimator (``model.bidet.estimator``).

    Raises:
        ValueError: the model has none (MODEL.BIDET.AUTO.ENABLED is False or the
            meta-architecture is not a BiDet one).
    """
    est = getattr(getattr(unwrap_model(model), "bidet", None), "estimator", None)
    if not isinstance(est, ComplexityEstimator):
        raise ValueError("AQD.TRAIN_LOOP = 'BiDetGANLoop' needs a BiDet detector with "
                         "MODEL.BIDET.AUTO.ENABLED True (it has no complexity estimator)")
    return est


def _average_grads(params: List[nn.Parameter]) -> None:
    """All-reduce-mean the gradients of ``params`` over ranks (no-op in one process)."""
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= comm.get_world_size()


def _broadcast(params: List[nn.Parameter]) -> None:
    """Copy rank 0's values of ``params`` to every rank (DDP does not sync parameters that do
    not require grad, and detectron2 seeds every rank differently)."""
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


@TRAIN_LOOP_REGISTRY.register()
class BiDetGANLoop(AQDTrainLoop):
    """Detector step, then the complexity estimator's D / G steps (see module doc).

    Args: as :class:`AQDTrainLoop`; reads ``MODEL.BIDET.AUTO.{D_LR, G_LR, ADAM_BETAS, D_STEPS}``.
    """

    def __init__(self, cfg, model, data_loader, optimizer, data_iter: Optional[Iterator] = None):
        super().__init__(cfg, model, data_loader, optimizer, data_iter=data_iter)
        a = cfg.MODEL.BIDET.AUTO
        self.estimator = find_estimator(model)
        self.d_params = self.estimator.discriminator_parameters()
        self.g_params = self.estimator.generator_parameters()
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) in ids for p in self.d_params + self.g_params):
            raise ValueError("the detector's optimizer holds complexity-estimator parameters; "
                             "build it after the model (they must not require grad)")
        _broadcast(self.d_params + self.g_params)
        betas = tuple(float(b) for b in a.ADAM_BETAS)
        self.d_steps = int(a.D_STEPS)
        self.d_optimizer = (torch.optim.Adam(self.d_params, lr=a.D_LR, betas=betas)
                            if self.d_params else None)
        self.g_optimizer = (torch.optim.Adam(self.g_params, lr=a.G_LR, betas=betas)
                            if self.g_params else None)
        # the detector now trains with its GAN steps (aqd_d2.modeling.training_features)
        mark_trainer_setup(model, "AQD.TRAIN_LOOP", "BiDetGANLoop")

    def _gan_step(self, name: str, params: List[nn.Parameter], optimizer, loss_fn,
                  f: torch.Tensor, real: torch.Tensor) -> Dict[str, float]:
        with trainable(params):
            loss = loss_fn(f, real)
            optimizer.zero_grad(set_to_none=True)
            if not self.check_finite({name: loss}, what="GAN loss"):
                return {}
            loss.backward()
            _average_grads(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {name: float(loss.detach())}

    def estimator_step(self, data) -> Dict[str, float]:
        """The D_STEPS discriminator steps and the generator step on ``data``.

        Returns:
            the float GAN losses of the last D step and of the G step (for logging).
        """
        f, real = unwrap_model(self.model).estimator_inputs(data)
        out: Dict[str, float] = {}
        if self.d_optimizer is not None:
            for _ in range(self.d_steps):
                out.update(self._gan_step("gan_loss_d", self.d_params, self.d_optimizer,
                                          self.estimator.discriminator_loss, f, real))
        if self.g_optimizer is not None:
            out.update(self._gan_step("gan_loss_g", self.g_params, self.g_optimizer,
                                      self.estimator.generator_loss, f, real))
        return out

    def run_step(self) -> None:
        """Detector step (AQDTrainLoop's, on a batch kept for the estimator), then GAN steps."""
        data = next(self._data_loader_iter)
        batch_iter, self._data_loader_iter = self._data_loader_iter, iter([data])
        try:
            super().run_step()
        finally:
            self._data_loader_iter = batch_iter
        logs = self.estimator_step(data)
        if logs and comm.is_main_process():
            from detectron2.utils.events import get_event_storage

            get_event_storage().put_scalars(**logs)

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["gan"] = {"d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer else None,
                      "g_optimizer": self.g_optimizer.state_dict() if self.g_optimizer else None}
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        gan = state_dict.get("gan", {})
        for key, opt in (("d_optimizer", self.d_optimizer), ("g_optimizer", self.g_optimizer)):
            if opt is not None and gan.get(key) is not None:
                opt.load_state_dict(gan[key])


class LoopStateHook(HookBase):
    """Checkpoints the training loop's own state (GAN optimizers, ...) through detectron2
    0.6's hook-state mechanism (``TrainerBase.state_dict`` saves every hook's state_dict).

    Idle (empty state, which TrainerBase skips) when the trainer's class defines its own
    ``state_dict`` (newer detectron2, or an aqd_d2 Trainer that saves the loop as
    ``"_trainer"``), so the loop state is never saved twice."""

    def _trainer_saves_loop(self) -> bool:
        return "state_dict" in {k for c in self.trainer.__class__.__mro__[:-1]
                                if c is not TrainerBase for k in vars(c)}

    def state_dict(self) -> dict:
        if self._trainer_saves_loop():
            return {}
        return {"loop": self.trainer._trainer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.trainer._trainer.load_state_dict(state_dict["loop"])


def build_loop_state_hooks(cfg) -> List[HookBase]:
    """[LoopStateHook()] when ``AQD.TRAIN_LOOP`` is the GAN loop (its state must persist)."""
    return [LoopStateHook()] if cfg.AQD.TRAIN_LOOP == "BiDetGANLoop" else []
