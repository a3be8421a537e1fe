"""The detector's optimizer, chosen by ``SOLVER.OPTIMIZER``.

detectron2 0.6's ``build_optimizer`` always builds SGD. BiDet and AutoBiDet train their
binary detectors with Adam (paper 000 sec. 4.1: "the Adam optimizer was applied", learning
rate 1e-3, decayed 10x at epochs 40 and 60 of 80 on VOC), so :class:`~aqd_d2.engine.Trainer`
builds the optimizer here:

* ``"SGD"``: detectron2's own ``build_optimizer``, whichever detectron2 is installed (v0.6
  builds plain SGD; main adds ``foreach=True``), so it is always exactly detectron2's;
* ``"Adam"``: ``torch.optim.Adam`` with ``SOLVER.ADAM_BETAS`` / ``SOLVER.ADAM_EPS`` and
  ``SOLVER.WEIGHT_DECAY`` as an L2 term in the gradient (PyTorch's Adam);
* ``"AdamW"``: the same with decoupled weight decay.

Parameter groups are detectron2's ``get_default_optimizer_params`` (``BASE_LR``,
``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``; parameters without
``requires_grad`` are left out), gradient clipping is detectron2's
``maybe_add_gradient_clipping`` (``SOLVER.CLIP_GRADIENTS``), and detectron2's LR schedulers
drive every choice. detectron2's own ``DefaultTrainer`` does not read ``SOLVER.OPTIMIZER``
(it always builds SGD): use :class:`~aqd_d2.engine.Trainer` (``train_net.py``), call
:func:`build_optimizer` from your trainer's ``build_optimizer``, or call
:func:`aqd_d2.engine.setup` on your trainer. :func:`build_optimizer` marks the model with the
optimizer it built; a detector whose config names Adam / AdamW refuses to train under an
optimizer nobody marked (:mod:`aqd_d2.modeling.training_features`).
"""
from __future__ import annotations

import torch
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from aqd_d2.modeling.training_features import mark_trainer_setup

__all__ = ["OPTIMIZERS", "build_optimizer", "optimizer_matches"]

#: the values of SOLVER.OPTIMIZER
OPTIMIZERS = ("SGD", "Adam", "AdamW")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER`` over ``model``'s trainable parameters.

    Args:
        cfg: a config with aqd_d2's keys (``add_aqd_config``).
        model: the detector (DDP-wrapped or not).
    Returns:
        ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (with detectron2's gradient clipping when
        ``SOLVER.CLIP_GRADIENTS.ENABLED``). ``model`` is marked as trained with it.
    """
    optimizer = _build(cfg, model)
    mark_trainer_setup(model, "SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER)
    return optimizer


def optimizer_matches(optimizer: torch.optim.Optimizer, name: str) -> bool:
    """Whether ``optimizer`` is of the kind ``SOLVER.OPTIMIZER = name`` builds (gradient
    clipping subclasses included)."""
    if name == "AdamW":
        return isinstance(optimizer, torch.optim.AdamW)
    if name == "Adam":
        return isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    if name == "SGD":
        return isinstance(optimizer, torch.optim.SGD)
    raise ValueError(f"SOLVER.OPTIMIZER = {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def _build(cfg, model: nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    name = s.OPTIMIZER
    if name == "SGD":
        return d2_build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model, base_lr=s.BASE_LR, weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR, weight_decay_bias=s.WEIGHT_DECAY_BIAS)
    if name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        extra = {"betas": tuple(float(b) for b in s.ADAM_BETAS), "eps": float(s.ADAM_EPS)}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER = {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return maybe_add_gradient_clipping(cfg, cls)(params, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY,
                                                 **extra)
