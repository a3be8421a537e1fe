#!/usr/bin/env python
"""Speed of the real binary convolution against torch's float32 convolution on the CPU.

For each layer (3x3, stride 1, padding 1, batch 1 by default) and thread count, times:

* ``torch NCHW`` / ``torch CL``: ``F.conv2d`` in float32 with NCHW and channels_last
  tensors (the baseline is the faster of the two);
* ``binary NCHW`` / ``binary CL``: :func:`aqd_d2.export.binary_conv2d`, float in -> float out
  (binarize + pack the input, XNOR-popcount convolution, per-channel scale, output write),
  with the input (and so the output) in NCHW / channels_last; the weight is packed once
  beforehand, as a deployed layer holds it;
* ``fallback``: the pure-PyTorch path of the same function (``backend="torch"``).

Method: all candidates of a layer run interleaved within each repeat (round robin), each
sample is the mean of several calls (about ``--sample-ms`` long), and the median over
repeats is reported, so slow phases of a shared machine hit every candidate alike. The
ratio is ``min(torch NCHW, torch CL) / binary`` at the same thread count. The headline
ratio (and PASS/FAIL against the target) uses ``binary NCHW``, the slower binary format.
Before timing, each layer checks that the kernel equals the fallback bit for bit.

Usage::

    python tools/bench_binary_conv.py [--threads 1,2] [--repeats 21] [--all-isas] [--clock cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from aqd_d2.export import binary_conv as bc

# (channels, spatial size, target ratio at 1 thread)
LAYERS = [(64, 56, 4.0), (128, 28, 6.0), (256, 14, 7.5)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _sample(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def bench_layer(channels: int, size: int, batch: int, repeats: int, sample_ms: float,
                all_isas: bool, clock: Callable[[], float]) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    w = torch.randn(channels, channels, 3, 3, generator=gen)
    alpha = torch.rand(channels, generator=gen) + 0.5
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    packed = bc.pack_weights(w, alpha)
    isa = None
    y_ref = bc.binary_conv2d(x, packed, 1, 1, backend="torch")
    cands: Dict[str, Callable[[], object]] = {
        "torch NCHW": lambda: F.conv2d(x, w, None, 1, 1),
        "torch CL": lambda: F.conv2d(x_cl, w_cl, None, 1, 1),
    }
    if bc.kernel_available():
        for fmt, xx in (("NCHW", x), ("CL", x_cl)):
            y = bc.binary_conv2d(xx, packed, 1, 1, backend="cpp", isa=isa)
            if not torch.equal(y, y_ref):
                raise SystemExit(f"kernel != fallback for {channels}x{size} {fmt}")
            cands[f"binary {fmt}"] = lambda xx=xx: bc.binary_conv2d(xx, packed, 1, 1, backend="cpp")
        if all_isas:
            for name in bc.available_isas()[:-1]:
                cands[f"binary NCHW {name}"] = (
                    lambda name=name: bc.binary_conv2d(x, packed, 1, 1, backend="cpp", isa=name))
    cands["fallback"] = lambda: bc.binary_conv2d(x, packed, 1, 1, backend="torch")

    calls = {}
    for name, fn in cands.items():  # warm up, then size each sample to about sample_ms
        fn()
        once = _sample(fn, 3, time.perf_counter)
        calls[name] = max(1, int(sample_ms * 1e-3 / max(once, 1e-7)))
    times: Dict[str, List[float]] = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            times[name].append(_sample(fn, calls[name], clock))
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--sample-ms", type=float, default=5.0, help="length of one timing sample")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--all-isas", action="store_true", help="also time the slower kernel variants")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (default); cpu: CPU time of the whole process, which "
                    "leaves out time the process waited for a core on a busy shared machine "
                    "(meaningful for 1 thread; spinning OpenMP workers inflate it with 2)")
    args = ap.parse_args()

    print(f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}")
    print(f"kernel: {bc.kernel_backend()} (variants here: {', '.join(bc.available_isas()) or 'none'})")
    if hasattr(os, "getloadavg"):
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s); {args.clock} times in ms (median of {args.repeats}); "
              "ratio = best torch / binary ==")
        for channels, size, target in LAYERS:
            t = bench_layer(channels, size, args.batch, args.repeats, args.sample_ms, args.all_isas,
                            CLOCKS[args.clock])
            best = min(t["torch NCHW"], t["torch CL"])
            cols = "  ".join(f"{k} {v:7.3f}" for k, v in t.items())
            print(f"{channels:3d}ch {size:2d}x{size:<2d} | {cols}")
            parts = [f"{k} {best / v:5.2f}x" for k, v in t.items() if not k.startswith("torch")]
            line = f"{'':11s} | ratio: " + "  ".join(parts)
            if "binary NCHW" in t and threads == 1:
                ok = best / t["binary NCHW"] >= target
                line += f"  | target >= {target}x (binary NCHW): {'PASS' if ok else 'FAIL'}"
            print(line)
    if hasattr(os, "getloadavg"):
        print("\nload average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
