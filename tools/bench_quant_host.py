#!/usr/bin/env python
"""Host (Python) overhead of one quantized layer call, float vs quantized, on tiny tensors.

On a GPU a quantized detector step is bound by the host: each quantized conv runs Python
(quantizer flags, kernel choice, the autograd Function, shape bookkeeping) and launches
kernels, and with tensors this small the arithmetic is negligible, so what this measures is
that per-layer cost. For each layer configuration it times, single-threaded, median over
``--repeats`` batches of ``--calls`` calls (process CPU time per call):

* ``train``: forward + backward of ``y.sum()`` through the layer (training mode);
* ``eval``: forward under ``torch.no_grad()`` (eval mode), the inference path;

and prints the ratio to detectron2's float ``Conv2d`` (or ``nn.Linear``) of the same shape.

Paths (``--path``):

* ``eager``: the CPU eager kernels (what CPU training runs);
* ``fused``: the Triton (fused) path's Python with every kernel launch replaced by a no-op
  (``TRITON_INTERPRET=1``, ``fused_kernels="force"`` on CPU tensors, ``triton_ops._launch``
  stubbed): the host work a CUDA step does around its launches, minus Triton's own launcher,
  and the number of launches per call (each costs a Triton launch on a GPU). Outputs are
  garbage on this path; only the time and the launch count mean something.

With ``--device cuda`` the layers run on the GPU for real (``fused``: Triton kernels,
``eager``: ``fused_kernels="off"``), timed by wall clock with a synchronisation after each
batch of calls: on tensors this small that is the host cost per call, Triton's launcher
included.

Usage::

    python tools/bench_quant_host.py [--device cpu|cuda] [--path eager fused] [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--path", nargs="*", default=["eager", "fused"], choices=["eager", "fused"])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--configs", nargs="*", default=None, help="subset of configuration names")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if "fused" in args.path and not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

    import torch
    import aqd_d2  # noqa: F401  (detectron2 compat shims before detectron2.layers)
    from detectron2.layers import Conv2d
    from torch import nn

    from aqd_d2.layers import QConv2d, QLinear
    from aqd_d2.quantization import build_quantizer

    torch.set_num_threads(1)
    launches = [0]
    if "fused" in args.path and not cuda:
        from aqd_d2.quantization import triton_ops

        def _no_launch(*a, **k):
            launches[0] += 1

        triton_ops._launch = _no_launch
        torch.set_flush_denormal(True)  # unwritten outputs may hold denormals: slow convs

    def q(method, bits, role, **kw):
        return build_quantizer(method, bits, role, **kw)

    # name -> (layer factory, input shape)
    configs: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
        "float-conv": (lambda: Conv2d(16, 16, 3, padding=1, bias=True), (1, 16, 8, 8)),
        "liq4-wn": (lambda: QConv2d(16, 16, 3, padding=1, bias=True,
                                    weight_quantizer=q("liq", 4, "weight"),
                                    input_quantizer=q("liq", 4, "activation")), (1, 16, 8, 8)),
        "liq2-nowd": (lambda: QConv2d(16, 16, 3, padding=1, bias=True,
                                      weight_quantizer=q("liq", 2, "weight", weight_norm=False),
                                      input_quantizer=q("liq", 2, "activation")), (1, 16, 8, 8)),
        "lsq4": (lambda: QConv2d(16, 16, 3, padding=1, bias=True,
                                 weight_quantizer=q("lsq", 4, "weight"),
                                 input_quantizer=q("lsq", 4, "activation")), (1, 16, 8, 8)),
        "bireal": (lambda: QConv2d(16, 16, 3, padding=1, bias=False,
                                   weight_quantizer=q("bireal", 1, "weight"),
                                   input_quantizer=q("bireal", 1, "activation")), (1, 16, 8, 8)),
        "float-linear": (lambda: nn.Linear(16, 16), (4, 16)),
        "liq4-linear": (lambda: QLinear(16, 16, weight_quantizer=q("liq", 4, "weight"),
                                        input_quantizer=q("liq", 4, "activation")), (4, 16)),
    }
    names = args.configs or list(configs)
    clock = "wall time (CUDA synchronised per batch)" if cuda else "process CPU time"
    print(f"torch {torch.__version__}, device {args.device}, 1 thread, {args.repeats} x "
          f"{args.calls} calls, {clock} per call (median)", flush=True)
    print(f"{'path':<7}{'layer':<14}{'train us':>10}{'x float':>9}{'eval us':>10}{'x float':>9}"
          f"{'launches t/e':>14}")
    for path in args.path:
        results: Dict[str, Tuple[float, float, float, float]] = {}
        for name in names:
            make, shape = configs[name]
            torch.manual_seed(0)
            layer = make()
            for m in layer.modules():
                if hasattr(m, "set_fused_kernels"):
                    m.set_fused_kernels(("auto" if cuda else "force") if path == "fused" else "off")
                if hasattr(m, "set_integer_eval") and path == "fused":
                    # CPU tensors stand in for CUDA ones: eval runs the fake-quant path there
                    # (MODEL.QUANT.INTEGER_EVAL auto is for CPU tensors only)
                    m.set_integer_eval("off")
            layer.to(args.device)
            x = torch.randn(*shape, device=args.device, requires_grad=True)

            def train_call():
                layer(x).sum().backward()

            def eval_call():
                layer(x)

            layer.train()
            train_call()  # data initialisation
            t_us, t_l = _time(train_call, args, launches, cuda)
            layer.eval()
            with torch.no_grad():
                e_us, e_l = _time(eval_call, args, launches, cuda)
            results[name] = (t_us, e_us, t_l, e_l)
        for name in names:
            t_us, e_us, t_l, e_l = results[name]
            ref = "float-linear" if "linear" in name else "float-conv"
            rt, re_ = results.get(ref, (t_us, e_us, 0, 0))[:2]
            print(f"{path:<7}{name:<14}{t_us:>10.1f}{t_us / rt:>9.2f}{e_us:>10.1f}{e_us / re_:>9.2f}"
                  f"{(f'{t_l:.0f}/{e_l:.0f}' if path == 'fused' and not cuda else '-'):>14}",
                  flush=True)
    return 0


def _time(fn, args, launches, cuda: bool = False) -> Tuple[float, float]:
    import torch

    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(20):
        fn()
    samples: List[float] = []
    n0 = launches[0]
    for _ in range(args.repeats):
        sync()
        t0 = clock()
        for _ in range(args.calls):
            fn()
        sync()
        samples.append((clock() - t0) / args.calls * 1e6)
    per_call = (launches[0] - n0) / (args.repeats * args.calls)
    return statistics.median(samples), per_call


if __name__ == "__main__":
    sys.exit(main())
