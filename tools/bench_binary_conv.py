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

``--emulate-isa avx2`` measures what a CPU with AVX2 but without AVX-512 would see, on a CPU
that has AVX-512: the whole comparison runs in a subprocess whose float side is capped to
AVX2 as well (``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN, which runs torch's float convolution;
``ATEN_CPU_CAPABILITY=avx2`` for ATen's own kernels; ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for
MKL's BLAS, which the convolution does not use) and whose binary kernel is the AVX2 variant
(``AQD_BINARY_ISA=avx2``). Before timing, probe subprocesses verify that the caps took effect
and print the evidence: the ISA and the convolution implementation oneDNN reports with
``ONEDNN_VERBOSE=1``, ATen's CPU capability, the binary kernel in use, and the float
convolution's time uncapped vs capped (about 2x slower on AVX2). A cap that does not take
effect is an error.

Usage::

    python tools/bench_binary_conv.py [--threads 1,2] [--repeats 21] [--all-isas] [--clock cpu]
                                      [--emulate-isa avx2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping

import torch
import torch.nn.functional as F

from aqd_d2.export import binary_conv as bc

# (channels, spatial size, target ratio at 1 thread)
LAYERS = [(64, 56, 4.0), (128, 28, 6.0), (256, 14, 7.5)]

# --emulate-isa: environment of the subprocesses, and what each cap must make the probes report
EMULATION_ENV: Dict[str, Dict[str, str]] = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN: torch's float F.conv2d (NCHW and CL)
        "ATEN_CPU_CAPABILITY": "avx2",      # ATen's vectorized kernels (DEFAULT/AVX2/AVX512)
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL BLAS (not on the conv path; capped anyway)
        "AQD_BINARY_ISA": "avx2",           # aqd_d2's binary kernel variant
    },
}
EMULATION_MARK = "AQD_BENCH_EMULATED"  # set in the benchmark subprocess: name of the ISA


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
            main_isa = bc.kernel_backend("cpp")[len("cpp-"):]
            for name in bc.available_isas()[:bc.ISA_NAMES.index(main_isa)]:
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


def _probe(verbose: bool) -> None:
    """``--probe``: run in a subprocess by :func:`emulate`. Prints one ``PROBE {json}`` line:
    ATen's CPU capability, the binary kernel in use and, unless ``verbose``, the float conv
    time per layer (best of NCHW / channels_last, 1 thread, median of 7). With ``verbose``
    (``ONEDNN_VERBOSE=1`` set by the caller) it only runs each conv once, so that oneDNN
    prints its ISA and the implementation it dispatched."""
    torch.set_num_threads(1)
    out = {"aten_capability": torch.backends.cpu.get_cpu_capability(),
           "binary_kernel": bc.kernel_backend(), "float_ms": {}}
    gen = torch.Generator().manual_seed(0)
    for channels, size, _ in LAYERS:
        x = torch.randn(1, channels, size, size, generator=gen)
        w = torch.randn(channels, channels, 3, 3, generator=gen)
        pairs = [(x, w), (x.contiguous(memory_format=torch.channels_last),
                          w.contiguous(memory_format=torch.channels_last))]
        best = float("inf")
        for xx, ww in pairs:
            F.conv2d(xx, ww, None, 1, 1)
            if verbose:
                continue
            samples = [_sample(lambda: F.conv2d(xx, ww, None, 1, 1), 5, time.perf_counter)
                       for _ in range(7)]
            best = min(best, statistics.median(samples) * 1e3)
        if not verbose:
            out["float_ms"][f"{channels}x{size}"] = best
    print("PROBE " + json.dumps(out), flush=True)


def _run_probe(env: Mapping[str, str], verbose: bool) -> Dict[str, object]:
    """Run :func:`_probe` in a subprocess with ``env`` added; parse its report and, with
    ``verbose``, oneDNN's ISA line and the convolution implementations it executed."""
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    full.pop("ONEDNN_VERBOSE", None)
    if verbose:
        full["ONEDNN_VERBOSE"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--probe"] + (["--verbose-probe"] if verbose else [])
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    report = [json.loads(ln[len("PROBE "):]) for ln in lines if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not report:
        raise SystemExit(f"probe subprocess failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = dict(report[0])
    isa = [ln.split("isa:", 1)[1].strip() for ln in lines if re.search(r",info,cpu,isa:", ln)]
    out["onednn_isa"] = isa[0] if isa else None
    # exec lines: onednn_verbose,v1,primitive,exec,cpu,convolution,<implementation>,...
    out["onednn_conv_impls"] = sorted({ln.split(",")[6] for ln in lines
                                       if ",primitive,exec,cpu,convolution," in ln})
    return out


def _check_caps(isa: str, capped: Dict[str, object]) -> List[str]:
    """Problems with the capped probe's report (empty when every cap took effect)."""
    problems = []
    onednn = str(capped.get("onednn_isa"))
    if isa == "avx2":
        if "AVX2" not in onednn or re.search(r"AVX-?512|AMX", onednn, re.I):
            problems.append(f"ONEDNN_MAX_CPU_ISA=AVX2: oneDNN reports isa {onednn!r}")
        impls = capped.get("onednn_conv_impls") or []
        if not impls or any(re.search(r"avx512|amx", i, re.I) for i in impls):
            problems.append(f"ONEDNN_MAX_CPU_ISA=AVX2: float convolutions ran as {impls}")
        if capped.get("aten_capability") != "AVX2":
            problems.append(f"ATEN_CPU_CAPABILITY=avx2: ATen reports {capped.get('aten_capability')!r}")
        if capped.get("binary_kernel") != "cpp-avx2":
            problems.append(f"AQD_BINARY_ISA=avx2: the binary kernel is {capped.get('binary_kernel')!r}")
    return problems


def strip_option(argv: List[str], option: str) -> List[str]:
    """``argv`` without ``option`` and its value (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def emulate(isa: str, child_args: List[str]) -> int:
    """``--emulate-isa``: verify the caps (printing the evidence), then run the benchmark with
    ``child_args`` in a capped subprocess. Returns its exit status."""
    if isa not in EMULATION_ENV:
        raise SystemExit(f"--emulate-isa must be one of {sorted(EMULATION_ENV)}, got {isa!r}")
    if isa not in bc.available_isas():
        raise SystemExit(f"--emulate-isa {isa}: this CPU / build has no {isa} binary kernel "
                         f"(variants here: {bc.available_isas()})")
    env = EMULATION_ENV[isa]
    print(f"== emulating an {isa.upper()} CPU: " + " ".join(f"{k}={v}" for k, v in env.items()))
    native, capped = _run_probe({}, True), _run_probe(env, True)
    for name, rep in (("uncapped", native), ("capped", capped)):
        print(f"{name:>9}: oneDNN isa: {rep['onednn_isa']}; float conv ran as "
              f"{', '.join(rep['onednn_conv_impls']) or 'nothing reported'}; ATen capability: "
              f"{rep['aten_capability']}; binary kernel: {rep['binary_kernel']}")
    problems = _check_caps(isa, capped)
    if problems:
        raise SystemExit("the ISA caps did not take effect:\n  " + "\n  ".join(problems))
    t_native, t_capped = _run_probe({}, False), _run_probe(env, False)
    print("float conv, 1 thread, best of NCHW / CL (ms): " + "  ".join(
        f"{k}: {t_native['float_ms'][k]:.3f} -> {t_capped['float_ms'][k]:.3f} "
        f"({t_capped['float_ms'][k] / t_native['float_ms'][k]:.2f}x)" for k in t_native["float_ms"]))
    print("caps verified; benchmark follows in the capped subprocess\n", flush=True)
    full = dict(os.environ, **env)
    full[EMULATION_MARK] = isa
    return subprocess.run([sys.executable, os.path.abspath(__file__)] + child_args,
                          env=full, check=False).returncode


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
    ap.add_argument("--emulate-isa", choices=sorted(EMULATION_ENV), default=None,
                    help="run the comparison in a subprocess with the float side (oneDNN, ATen, "
                    "MKL) and the binary kernel capped to this instruction set, after verifying "
                    "the caps take effect (see the module docstring)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verbose-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        _probe(args.verbose_probe)
        return
    if args.emulate_isa:
        raise SystemExit(emulate(args.emulate_isa, strip_option(sys.argv[1:], "--emulate-isa")))

    emulated = os.environ.get(EMULATION_MARK)
    if emulated:
        print(f"EMULATED {emulated.upper()} CPU: " + " ".join(
            f"{k}={os.environ.get(k)}" for k in EMULATION_ENV[emulated]) + "; ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}")
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
