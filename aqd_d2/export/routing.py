"""Measured choice between the int8 GEMM path and float for each k-bit layer.

``torch._int_mm`` beats a float32 convolution on most conv shapes of a detector, but not on
all of them: for small layers (a 1x1 conv on a 10x10 map) the fixed costs of encoding the
input, the im2col copy and the int32 -> float32 epilogue can outweigh the cheaper GEMM, and
which shapes lose depends on the CPU, its load and the thread count. A static rule would be
right on one machine only, so :func:`aqd_d2.export.deploy.convert_for_inference` can decide
per layer by measuring (``int8="auto"`` with ``example_inputs``):

1. :func:`record_layer_inputs` runs the model once on the example inputs and keeps the input
   tensor each candidate layer receives (its real shape and value distribution);
2. :func:`measure_speedup` times the int8 module and the fallback module (the same layer with
   its fake-quantized weight frozen, BN folded: what the layer would otherwise run) on that
   input, interleaved, and returns ``float time / int8 time`` (median of ``repeats``);
3. the layer keeps the int8 path when the speed-up is at least ``int8_min_speedup``
   (default 1.0: whichever is faster), else it is deployed as the fallback.

Both choices compute the same layer (the int8 path exactly, the fallback up to float32
rounding), so the decision changes speed only. Because it is measured, two conversions on a
busy machine may choose differently for layers near the threshold; the deploy report lists
each layer's measured speed-up so the choice can be audited.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable

import torch
from torch import nn

__all__ = ["record_layer_inputs", "measure_speedup"]


@torch.no_grad()
def record_layer_inputs(model: nn.Module, example_inputs, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Run ``model(example_inputs)`` once and return the first input tensor each named layer
    received (cloned).

    Args:
        model: the model (eval mode); not modified (hooks are removed afterwards).
        example_inputs: what ``model`` is called with (a detectron2 batch: list of dicts).
        names: module names (``model.named_modules()``) whose inputs to record.
    Returns:
        ``{name: input tensor}`` for the layers that ran (layers not reached are absent).
    """
    wanted = set(names)
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if name in wanted:
            def hook(module, inputs, name=name):
                if name not in seen and inputs and isinstance(inputs[0], torch.Tensor):
                    seen[name] = inputs[0].detach().clone()
            handles.append(m.register_forward_pre_hook(hook))
    try:
        model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def measure_speedup(int8_fn: Callable[[], torch.Tensor], float_fn: Callable[[], torch.Tensor],
                    repeats: int = 5, warmup: int = 2) -> float:
    """Median over ``repeats`` interleaved rounds of ``float time / int8 time``.

    Args:
        int8_fn, float_fn: zero-argument calls of the two candidate modules on the same input.
        repeats: timed rounds (each round times one call of each, in alternating order).
        warmup: untimed calls of each first (allocations, kernel set-up).
    Returns:
        the speed-up of the int8 path (> 1: int8 is faster).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        int8_fn()
        float_fn()
    ratios = []
    for r in range(repeats):
        order = (int8_fn, float_fn) if r % 2 == 0 else (float_fn, int8_fn)
        t = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            t[fn] = time.perf_counter() - start
        ratios.append(t[float_fn] / max(t[int8_fn], 1e-9))
    return statistics.median(ratios)
