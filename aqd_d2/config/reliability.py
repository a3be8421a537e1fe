"""Reliability keys (AQD.NONFINITE.*, AQD.BAD_INPUT.*): how long runs react to faults and bad input.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range, get_key


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""
    _C = cfg
    _C.AQD.NONFINITE = CN()
    # What a NaN/Inf loss term does (aqd_d2.engine.train_loop.AQDTrainLoop.check_finite):
    # "raise" stops the run with an error naming the term(s), rank(s) and iteration; "skip"
    # skips that update (no optimizer step, gradients cleared; all DDP ranks together) and
    # counts it in the event storage as nonfinite/skipped_iters.
    _C.AQD.NONFINITE.POLICY = "raise"
    # Under "skip": the run still raises once more than this many CONSECUTIVE iterations were
    # skipped (a diverged run produces NaN every step). 0 = raise at the first one.
    _C.AQD.NONFINITE.MAX_SKIPS = 10
    # Also check the gradients after backward (one norm per step) under the same policy.
    _C.AQD.NONFINITE.CHECK_GRADS = False
    # Resumed runs continue exactly like uninterrupted ones: the train loader skips the
    # batches consumed before the checkpoint (aqd_d2.data.resumable_loader; augmentation
    # randomness is a function of the sample's position) and the global RNGs are reseeded
    # from (seed, rank, iteration) before every iteration (aqd_d2.engine.step_seed). False:
    # detectron2's train loader, whose stream restarts from its beginning on resume.
    _C.AQD.EXACT_RESUME = True
    _C.AQD.BAD_INPUT = CN()
    # What an image that cannot be read or used (missing, truncated/corrupt file, size
    # differing from the annotation) does in the train/test loaders: "raise" stops with an
    # error naming the file; "skip" drops it with a warning (training: the next image is
    # used; inference: it is left out of evaluation) and counts it.
    _C.AQD.BAD_INPUT.POLICY = "raise"
    # Under "skip": raise anyway once a process has skipped more than this many images.
    _C.AQD.BAD_INPUT.MAX_SKIPS = 100


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
    check_choice(cfg, "AQD.NONFINITE.POLICY", {"raise", "skip"})
    _check_int(cfg, "AQD.NONFINITE.MAX_SKIPS")
    if not isinstance(cfg.AQD.NONFINITE.CHECK_GRADS, bool):
        raise ConfigError(f"AQD.NONFINITE.CHECK_GRADS = {cfg.AQD.NONFINITE.CHECK_GRADS!r}: "
                          "must be True or False")
    if not isinstance(cfg.AQD.EXACT_RESUME, bool):
        raise ConfigError(f"AQD.EXACT_RESUME = {cfg.AQD.EXACT_RESUME!r}: must be True or False")
    check_choice(cfg, "AQD.BAD_INPUT.POLICY", {"raise", "skip"})
    _check_int(cfg, "AQD.BAD_INPUT.MAX_SKIPS")


def _check_int(cfg: CN, key: str) -> None:
    value = get_key(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: must be an integer >= 0")
    check_range(cfg, key, lo=0)
