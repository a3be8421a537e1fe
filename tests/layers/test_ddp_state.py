"""Quantizer state stays identical across DDP ranks, and rank 1 uses rank 0's state after a
broadcast: the host copies of the enabled / initialized flags and the cached quantized weight
follow in-place writes into their tensors (DDP's parameter and buffer broadcasts are such
writes), so no rank keeps computing with its own stale copy.

* simulated, one process: "rank 1" with other weights, ranges and flags (host copies read,
  weight cache filled) gets rank 0's parameters and buffers by in-place ``copy_``; its next
  forward equals rank 0's bit for bit;
* two CPU processes (gloo): ``DistributedDataParallel(broadcast_buffers=True)`` over ranks that
  start with different weights, ranges, flags and caches; eval forwards then agree, a flag
  flipped locally on rank 1 is overwritten by the next training forward's buffer broadcast,
  data initialisation averages the ranges, and synchronized multi-level BN keeps identical
  running statistics after steps on different data.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.layers.multilevel_bn import MultiLevelBatchNorm
from aqd_d2.quantization import Quantizer, build_quantizer


class Net(nn.Module):
    """Quantized convs (LIQ with data init, LSQ, binary with -1 padding), a synchronized
    multi-level BN used at two levels, a quantized linear."""

    def __init__(self, sync_bn: bool = False):
        super().__init__()
        q = build_quantizer
        self.c1 = QConv2d(3, 6, 3, padding=1, weight_quantizer=q("liq", 4, "weight"),
                          input_quantizer=q("liq", 4, "activation"))
        self.c2 = QConv2d(6, 6, 3, padding=1, weight_quantizer=q("lsq", 3, "weight"),
                          input_quantizer=q("lsq", 3, "activation"))
        self.c3 = QConv2d(6, 6, 3, padding=1, weight_quantizer=q("bireal", 1, "weight"),
                          input_quantizer=q("bireal", 1, "activation"))
        self.bn = MultiLevelBatchNorm(6, 2, sync=sync_bn)
        self.fc = QLinear(6, 2, weight_quantizer=q("liq", 2, "weight"),
                          input_quantizer=q("liq", 2, "activation"))

    def forward(self, x):
        h = F.relu(self.c1(x))
        levels = [h, F.avg_pool2d(h, 2)]
        outs = []
        for lv, f in enumerate(levels):  # c2 / c3 / bn shared across two "levels"
            f = self.bn(self.c3(F.relu(self.c2(f))), level=lv)
            outs.append(f.mean(dim=(2, 3)))
        return self.fc(F.relu(sum(outs)))


def quantizers(m: nn.Module):
    return [q for q in m.modules() if isinstance(q, Quantizer)]


def diverge(model: nn.Module, x: torch.Tensor) -> None:
    """Give ``model`` its own state and warm every host-side copy of it: a training forward
    (data init), flags flipped by set_enabled, eval forwards (host flags read, weight caches
    filled in eval mode)."""
    model.train()
    model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    qs = quantizers(model)
    qs[1].set_enabled(False)  # c1's input quantizer
    qs[4].set_enabled(False)  # c3's weight quantizer
    model.eval()
    with torch.no_grad():
        model(x)
        model(x)
    assert any(q._wcache is not None for q in qs)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_in_place_broadcast_reaches_host_flags_and_weight_cache():
    torch.manual_seed(0)
    rank0, x0 = Net(), torch.randn(2, 3, 8, 8)
    rank0(x0).sum().backward()  # initialised, all quantizers enabled
    rank0.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    rank1 = Net()
    diverge(rank1, torch.randn(2, 3, 8, 8) * 3)
    rank0.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = rank0(x)
        assert not same(rank1(x), want)
        # what DDP's broadcasts do: rank 0's values copied into rank 1's tensors in place
        for (n, a), (_, b) in zip(rank0.state_dict(keep_vars=True).items(),
                                  rank1.state_dict(keep_vars=True).items()):
            b.copy_(a)
        assert same(rank1(x), want)
    for q0, q1 in zip(quantizers(rank0), quantizers(rank1)):
        assert q1.is_enabled == q0.is_enabled
        if q1.needs_init:
            assert q1._host_flag("initialized") == q0._host_flag("initialized")
    # and training mode: rank 1 flips a flag locally, the next "broadcast" restores it
    rank0.train(), rank1.train()
    quantizers(rank1)[0].enabled.fill_(False)
    with torch.no_grad():
        for a, b in zip(rank0.buffers(), rank1.buffers()):
            b.copy_(a)
    ya, yb = rank0(x), rank1(x)
    assert same(ya, yb)


# ---- two processes --------------------------------------------------------------------------
def _rank_main(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # (a timeout: ranks that disagree on a flag run different collectives and would hang)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _rank_body(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _rank_body(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)  # same input on both ranks
    torch.manual_seed(10 + rank)  # different weights per rank
    model = Net(sync_bn=True)
    if rank == 1:  # other ranges, flags, warm host copies and caches (no collectives inside:
        # data init averages over ranks, so init happens in a separate process group run)
        model.eval()
        for q in quantizers(model):
            if q.needs_init:
                q.initialized.fill_(True)
                q._host_flag("initialized")
            for p in q.parameters(recurse=False):
                with torch.no_grad():
                    p.mul_(1.7)
        qs = quantizers(model)
        qs[1].set_enabled(False)
        qs[4].set_enabled(False)
        with torch.no_grad():
            model(x)
        assert any(q._wcache is not None for q in qs)
    else:
        model.eval()
    ddp = DDP(model, broadcast_buffers=True)  # broadcasts rank 0's parameters and buffers
    rec = {}
    with torch.no_grad():
        rec["eval_after_wrap"] = ddp(x)  # buffers broadcast again in forward
    rec["flags"] = torch.tensor([q.is_enabled for q in quantizers(model)])
    # training: rank 0's flags win at every forward, whatever rank 1 does locally
    model.train()
    for q in quantizers(model):
        if q.needs_init:  # both ranks re-initialise from their own data: averaged
            q.initialized.fill_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)
    for step in range(3):
        if rank == 1 and step == 1:
            quantizers(model)[2].enabled.fill_(False)  # local flip: overwritten by broadcast
        xs = torch.randn(2, 3, 8, 8) * (1 + rank)  # different data per rank
        opt.zero_grad()
        y = ddp(xs)
        y.square().mean().backward()
        opt.step()
    rec["flags_after"] = torch.tensor([q.is_enabled for q in quantizers(model)])
    rec["initialized"] = torch.tensor([q._host_flag("initialized") for q in quantizers(model)
                                       if q.needs_init])
    rec["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        rec["eval_after_training"] = ddp(x)
    torch.save(rec, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_ddp_quantizer_state_identical(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert same(r0["eval_after_wrap"], r1["eval_after_wrap"])
    assert r0["flags"].all() and same(r0["flags"], r1["flags"])
    assert same(r0["flags_after"], r1["flags_after"]) and r0["flags_after"].all()
    assert r0["initialized"].all() and r1["initialized"].all()
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:  # ranges, flags, weights, multi-level BN statistics
        assert same(r0["state"][k], r1["state"][k]), k
    assert any("running_mean" in k for k in r0["state"])
    assert same(r0["eval_after_training"], r1["eval_after_training"])
