"""Checkpointing that survives crashes and explains bad files.

:class:`AQDCheckpointer` is detectron2's ``DetectionCheckpointer`` with three changes:

* **atomic writes**: a checkpoint (and the ``last_checkpoint`` tag) is written to a temporary
  file in the same folder, flushed to disk, then renamed over the target, so a crash while
  saving never leaves a half-written file as the newest (or only) checkpoint;
* **clear read errors**: a truncated, empty or foreign file raises :class:`CheckpointError`
  naming the file, instead of an unpickling error deep inside torch;
* **architecture check**: when fewer than ``min_match`` of the model's parameters find a
  same-named, same-shaped tensor in the checkpoint (excluding quantizer state, which float
  checkpoints never have), loading fails with :class:`CheckpointError` listing examples of
  the mismatch. Otherwise missing and unexpected keys are reported in one summary line;
  missing quantizer state is the expected case when a quantized model starts from a float
  checkpoint (the normal start of quantized training, AQD sec. 4.3).
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AQDCheckpointer", "CheckpointError", "QUANTIZER_STATE_MARKERS", "BACKBONE_CHECKPOINT_KEY"]

#: substrings of state_dict keys that belong to quantizers (absent from float checkpoints)
QUANTIZER_STATE_MARKERS = ("weight_quantizer.", "input_quantizer.", "act_quantizer.")
#: checkpoint entry of a backbone-pretraining run (aqd_d2.engine.pretrain): its value lists
#: the key prefixes that are not the backbone (the classifier head), which a detector ignores
BACKBONE_CHECKPOINT_KEY = "aqd_backbone_pretraining"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AQDCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, clear load errors and an architecture check.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        min_match: fraction of the model's (non-quantizer) parameters that must load from a
            checkpoint; below it, loading raises :class:`CheckpointError`.
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, min_match: float = 0.5,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.min_match = float(min_match)
        #: entries added to every checkpoint this checkpointer saves (e.g. the
        #: backbone-pretraining marker, BACKBONE_CHECKPOINT_KEY)
        self.extra_state: Dict[str, Any] = {}

    # ---- writing ----------------------------------------------------------------------
    def _is_local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        if not self._is_local():
            return super().save(name, **kwargs)
        if not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(self.extra_state)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        os.makedirs(self.save_dir, exist_ok=True)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    # ---- reading ----------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist (MODEL.WEIGHTS?)")
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # detectron2 main keeps the URL being loaded in _parsed_url_during_load, asserts
            # it is None when load() starts and resets it only after a successful load: one
            # failed load (a CheckpointError above) would turn every later load() into a bare
            # AssertionError. v0.6 has no such attribute.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch.load's errors for bad bytes vary by file content

            raise CheckpointError(
                f"cannot read checkpoint {filename!r}: the file is truncated, corrupt or not a "
                f"PyTorch / detectron2 checkpoint ({type(e).__name__}: {e})"
            ) from None
        model = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(model, dict) or not model:
            raise CheckpointError(
                f"checkpoint {filename!r} holds no model state_dict (found "
                f"{type(model).__name__ if model is not None else type(loaded).__name__})"
            )
        return loaded

    def _load_model(self, checkpoint: Any):
        ckpt = checkpoint["model"]
        model_state = self.model.state_dict()
        float_keys = [k for k in model_state if not any(m in k for m in QUANTIZER_STATE_MARKERS)]
        backbone = checkpoint.get(BACKBONE_CHECKPOINT_KEY)
        if backbone is not None:
            self._check_backbone_fits(ckpt, model_state, backbone)
        elif not checkpoint.get("matching_heuristics", False) and float_keys:
            matched = [
                k for k in float_keys
                if k in ckpt and hasattr(ckpt[k], "shape")
                and tuple(ckpt[k].shape) == tuple(model_state[k].shape)
            ]
            if len(matched) < self.min_match * len(float_keys):
                absent = [k for k in float_keys if k not in ckpt][:5]
                shaped = [k for k in float_keys if k in ckpt and k not in matched][:5]
                raise CheckpointError(
                    f"the checkpoint does not fit this model: only {len(matched)} of "
                    f"{len(float_keys)} parameters match by name and shape (need "
                    f"{self.min_match:.0%}); missing e.g. {absent}, wrong shape e.g. {shaped}. "
                    "Was it saved from a different architecture or config?"
                )
        incompatible = super()._load_model(checkpoint)
        if incompatible is not None:
            quant_missing = [k for k in incompatible.missing_keys
                             if any(m in k for m in QUANTIZER_STATE_MARKERS)]
            other_missing = len(incompatible.missing_keys) - len(quant_missing)
            self.logger.info(
                "Checkpoint loaded: %d missing keys (%d of them quantizer state, expected when "
                "starting from a float checkpoint), %d unexpected keys, %d skipped for shape",
                len(incompatible.missing_keys), len(quant_missing),
                len(incompatible.unexpected_keys), len(incompatible.incorrect_shapes),
            )
            self.last_incompatible = incompatible
            self.last_other_missing = other_missing
        return incompatible

    def _check_backbone_fits(self, ckpt: Dict[str, Any], model_state: Dict[str, Any],
                             info: Dict[str, Any]) -> None:
        """A pretrained-backbone checkpoint covers only the backbone of a detector: at least
        ``min_match`` of *its* backbone tensors must match the model by name and shape."""
        head = tuple(info.get("head_prefixes", ()))
        keys = [k for k in ckpt if not k.startswith(head) if hasattr(ckpt[k], "shape")]
        matched = [k for k in keys if k in model_state
                   and tuple(ckpt[k].shape) == tuple(model_state[k].shape)]
        if keys and len(matched) < self.min_match * len(keys):
            raise CheckpointError(
                f"this pretrained backbone ({info.get('backbone', '?')}) does not fit the model: "
                f"only {len(matched)} of its {len(keys)} tensors match by name and shape, e.g. "
                f"not {[k for k in keys if k not in matched][:3]}. Pretrain with the config that "
                "the detection config names ('# Pretrained backbone:')")
