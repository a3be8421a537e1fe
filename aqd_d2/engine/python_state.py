"""Training state that detectron2 keeps in plain Python attributes, checkpointed by the Trainer.

detectron2's dense detectors (``RetinaNet``, ``FCOS`` and their aqd_d2 subclasses) normalise
their losses by an exponential moving average of the number of foreground anchors,
``DenseDetector._ema_update("loss_normalizer", ...)``, stored as a Python float attribute,
not a buffer, so it is missing from ``model.state_dict()``: a resumed run restarts it from
its initial value (100 or 300) and its losses, hence its weights, drift from the
uninterrupted run's. The Trainer saves these attributes with its own state and restores
them on resume (``AQD.EXACT_RESUME``).
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from aqd_d2.utils import unwrap_model

__all__ = ["PYTHON_STATE_PREFIXES", "collect_python_state", "restore_python_state"]

#: attribute-name prefixes of per-module Python training state (detectron2's EMA normalisers)
PYTHON_STATE_PREFIXES = ("loss_normalizer",)


def collect_python_state(model: nn.Module) -> Dict[str, float]:
    """``{"<module name>.<attribute>": value}`` for every numeric attribute named by
    :data:`PYTHON_STATE_PREFIXES` on any submodule (a DDP wrapper is looked through)."""
    out: Dict[str, float] = {}
    for name, module in unwrap_model(model).named_modules():
        for attr, value in vars(module).items():
            if (attr.startswith(PYTHON_STATE_PREFIXES) and isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                out[f"{name}.{attr}" if name else attr] = value
    return out


def restore_python_state(model: nn.Module, state: Dict[str, float]) -> None:
    """Set the attributes saved by :func:`collect_python_state` (unknown modules: KeyError)."""
    modules = dict(unwrap_model(model).named_modules())
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        if name not in modules:
            raise KeyError(f"checkpointed Python state {key!r}: the model has no module {name!r}")
        setattr(modules[name], attr, value)
