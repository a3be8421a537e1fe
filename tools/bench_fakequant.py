#!/usr/bin/env python
"""Training-step time and saved-for-backward memory of fake quantization vs float.

A ResNet-18-like stack (7x7 stem, 4 stages x 2 BasicBlocks of 64..512 channels, 1x1
downsample convs, global pool, fc) built from plain torch modules. Every conv except the
stem is a tiny local ``BenchConv`` whose weight and input go through aqd_d2 quantizers; the
stem and fc stay float (the usual first/last-layer rule). All configurations share the same
topology (conv-BN-ReLU), so the numbers isolate the quantizer cost.

Configurations: ``float``; 4-bit ``liq`` and ``lsq`` (weights + inputs); binary ``bnn`` and
``xnor`` (weights + inputs), each through :func:`aqd_d2.quantization.quant_conv2d` (one
autograd node per conv, recomputing the quantized operands in backward); ``--unfused`` adds
the naive ``F.conv2d(Q_x(x), Q_w(W))`` composition for comparison.

Timing: one SGD step (forward, backward, update); configurations are interleaved within each
repeat and the median over repeats is reported, both as process CPU time and as wall time
(``min x``: ratio of the fastest repeats, the least disturbed by other processes).
By default torch runs single-threaded and the CPU-time ratio is the headline number: on a
shared machine other processes stretch wall time (and OpenMP barriers with more threads
make that far worse), while a single thread's CPU time only counts its own work.
``--tune-malloc`` keeps freed memory in glibc's heap (``mallopt``: no mmap, no trimming), so
large temporaries stop paying page faults on every allocation; that is what a caching
allocator (the CUDA one, jemalloc, tcmalloc) gives, and on a VM where a fresh page costs
microseconds it changes the quantized steps (more temporaries) far more than the float one.
Memory: bytes of distinct storages saved for backward during one forward
(``torch.autograd.graph.saved_tensors_hooks``; a tensor saved by two ops, e.g. a ReLU
output that is also the next conv's input, counts once; parameters included).

Usage::

    python tools/bench_fakequant.py [--batch 8] [--size 128] [--repeats 15] [--threads 1]
                                    [--unfused] [--tune-malloc]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from aqd_d2.quantization import Quantizer, build_quantizer, quant_conv2d

Spec = Optional[Tuple[str, int]]


class BenchConv(nn.Conv2d):
    """``nn.Conv2d`` with optional weight / input quantizers (fused or naive forward)."""

    def __init__(self, cin, cout, k, stride=1, spec: Spec = None, fused: bool = True):
        super().__init__(cin, cout, k, stride, k // 2, bias=False)
        self.wq: Optional[Quantizer] = None
        self.xq: Optional[Quantizer] = None
        if spec:
            self.wq = build_quantizer(spec[0], spec[1], "weight")
            self.xq = build_quantizer(spec[0], spec[1], "activation")
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wq is None:
            return F.conv2d(x, self.weight, None, self.stride, self.padding)
        if self.fused:
            return quant_conv2d(x, self.weight, None, self.stride, self.padding, 1, 1,
                                input_quantizer=self.xq, weight_quantizer=self.wq)
        ph, pw = self.padding
        xq = F.pad(self.xq(x), (pw, pw, ph, ph), value=self.xq.padding_value)
        return F.conv2d(xq, self.wq(self.weight), None, self.stride, 0)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, spec: Spec, fused: bool):
        super().__init__()
        self.conv1 = BenchConv(cin, cout, 3, stride, spec, fused)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = BenchConv(cout, cout, 3, 1, spec, fused)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                BenchConv(cin, cout, 1, stride, spec, fused), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu_(out + (x if self.down is None else self.down(x)))


class ResNet18Like(nn.Module):
    def __init__(self, spec: Spec = None, fused: bool = True, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, spec, fused))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def tune_glibc_malloc() -> bool:
    """Keep freed memory for reuse: no mmap'd chunks, no heap trimming (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    ok &= libc.mallopt(m_top_pad, 256 << 20) == 1
    return bool(ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--unfused", action="store_true", help="also time the naive composition")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc: no mmap, no trimming")
    args = ap.parse_args()
    malloc = "tuned" if (args.tune_malloc and tune_glibc_malloc()) else "default"
    if args.threads:
        torch.set_num_threads(args.threads)

    configs: List[Tuple[str, Spec, bool]] = [
        ("float", None, True), ("liq4", ("liq", 4), True), ("lsq4", ("lsq", 4), True),
        ("bnn", ("bnn", 1), True), ("xnor", ("xnor", 1), True),
    ]
    if args.unfused:
        configs += [("liq4-unfused", ("liq", 4), False), ("bnn-unfused", ("bnn", 1), False)]

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name, spec, fused in configs:
        torch.manual_seed(0)
        model = ResNet18Like(spec, fused).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = (model, opt)

    def step(model, opt) -> Tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
        return time.process_time() - c0, time.perf_counter() - t0

    for model, opt in runs.values():  # warm-up (also runs the quantizers' data init)
        step(model, opt)
        step(model, opt)
    cpu: Dict[str, List[float]] = {name: [] for name in runs}
    wall: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, opt) in runs.items():
            c, w = step(model, opt)
            cpu[name].append(c)
            wall[name].append(w)
    mem = {name: saved_bytes(model, x) for name, (model, _) in runs.items()}

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}, "
          f"input {tuple(x.shape)}, repeats {args.repeats} (interleaved, median)")
    print(f"{'config':<14}{'cpu ms':>9}{'cpu x':>8}{'(min x)':>9}{'wall ms':>10}{'wall x':>8}"
          f"{'saved MiB':>11}{'mem x':>8}")
    c_f, w_f = statistics.median(cpu["float"]), statistics.median(wall["float"])
    for name in runs:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        c_min = min(cpu[name]) / min(cpu["float"])
        print(f"{name:<14}{c * 1e3:>9.1f}{c / c_f:>8.3f}{c_min:>9.3f}{w * 1e3:>10.1f}"
              f"{w / w_f:>8.3f}{mem[name] / 2**20:>11.1f}{mem[name] / mem['float']:>8.3f}")


if __name__ == "__main__":
    main()
