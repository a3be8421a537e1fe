"""MultiLevelBatchNorm: per-level statistics and affine, the level invariant, checkpoint
layouts, and synchronization of per-level statistics across 2 CPU processes (gloo)."""
import os

import pytest
import torch
from detectron2.layers import CycleBatchNormList
from torch import nn

import aqd_d2  # noqa: F401  (compat shims before detectron2 layers are used)
from aqd_d2.layers.multilevel_bn import (
    MultiLevelBatchNorm,
    forward_at_level,
    level_pass,
    merge_levels_into_shared_bn,
)


def _level_inputs(levels=3, channels=4, seed=0, offset=0.0):
    """Level l: (2, C, 6-l, 6-l) with mean 3*l + offset and std l+1 (levels differ)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, 6 - lv, 6 - lv, generator=g) * (lv + 1) + 3 * lv + offset
            for lv in range(levels)]


def test_each_level_has_own_statistics_and_affine():
    bn = MultiLevelBatchNorm(4, 3, momentum=1.0)  # momentum 1: running stats = last batch
    xs = _level_inputs()
    with level_pass([bn]):
        outs = [bn(x, level=lv) for lv, x in enumerate(xs)]
    for lv, (x, out) in enumerate(zip(xs, outs)):
        torch.testing.assert_close(bn[lv].running_mean, x.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    means = torch.stack([bn[lv].running_mean for lv in range(3)])
    assert (means[1:] - means[:-1]).abs().min() > 1.0  # statistics differ per level
    names = {n for n, _ in bn.named_parameters()}
    assert names == {f"{lv}.{p}" for lv in range(3) for p in ("weight", "bias")}
    # eval: each level normalizes with its own running statistics and affine
    with torch.no_grad():
        bn[2].weight.fill_(2.0)
    bn.eval()
    y = bn(xs[2], level=2)
    expected = (xs[2] - bn[2].running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn[2].running_var.view(1, -1, 1, 1) + bn[2].eps) * 2.0
    torch.testing.assert_close(y, expected)


def test_level_pass_guards_the_call_order():
    bn = MultiLevelBatchNorm(4, 3)
    xs = _level_inputs()
    with pytest.raises(RuntimeError, match="exactly once"):
        with level_pass([bn]):
            bn(xs[0], level=0)
            bn(xs[1], level=1)  # level 2 never called
    with pytest.raises(RuntimeError, match="called twice"):
        with level_pass([bn]):
            bn(xs[0], level=0)
            bn(xs[0], level=0)
    with pytest.raises(IndexError):
        bn(xs[0], level=3)
    with level_pass([bn]):  # the guard is reset after a failure
        for lv, x in enumerate(xs):
            bn(x, level=lv)


def test_cycling_without_level_matches_explicit_levels():
    torch.manual_seed(0)
    a, b = MultiLevelBatchNorm(4, 3), MultiLevelBatchNorm(4, 3)
    b.load_state_dict(a.state_dict())
    xs = _level_inputs()
    for _ in range(2):
        for lv, x in enumerate(xs):
            torch.testing.assert_close(a(x), b(x, level=lv))
    for lv in range(3):
        torch.testing.assert_close(a[lv].running_var, b[lv].running_var)


def test_forward_at_level_passes_level_only_to_multilevel_norms():
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), MultiLevelBatchNorm(4, 3), nn.ReLU())
    xs = _level_inputs()
    with level_pass([tower[1]]):
        outs = [forward_at_level(tower, x, lv) for lv, x in enumerate(xs)]
    assert [o.shape for o in outs] == [x.shape for x in xs]
    assert all((o >= 0).all() for o in outs)


def test_shared_affine_has_cycle_batchnorm_list_layout():
    ours = MultiLevelBatchNorm(4, 3, shared_affine=True)
    d2 = CycleBatchNormList(length=3, bn_class=nn.BatchNorm2d, num_features=4)
    assert set(ours.state_dict()) == set(d2.state_dict())
    d2.train()
    xs = _level_inputs()
    for x in xs:
        d2(x)
    with torch.no_grad():
        d2.weight.uniform_()
    ours.load_state_dict(d2.state_dict())
    ours.eval(), d2.eval()
    for lv, x in enumerate(xs):
        torch.testing.assert_close(ours(x, level=lv), d2(x))


@pytest.mark.parametrize("sync", [False, True])
def test_shared_affine_sync_and_plain_agree_in_one_process(sync):
    torch.manual_seed(0)
    plain = MultiLevelBatchNorm(4, 2, shared_affine=True)
    other = MultiLevelBatchNorm(4, 2, shared_affine=True, sync=sync)
    other.load_state_dict(plain.state_dict())
    x = _level_inputs(2)[1]
    torch.testing.assert_close(plain(x, level=1), other(x, level=1))
    assert set(other.state_dict()) == set(plain.state_dict())


def test_checkpoint_layout_conversions():
    xs = _level_inputs()
    shared = nn.BatchNorm2d(4)
    with torch.no_grad():
        shared.weight.uniform_(), shared.bias.uniform_()
    shared(torch.cat([x.flatten(2) for x in xs], dim=2).unsqueeze(-1))
    # a plain BN checkpoint initialises every level (own or shared affine)
    for shared_affine in (False, True):
        ml = MultiLevelBatchNorm(4, 3, shared_affine=shared_affine)
        missing, unexpected = ml.load_state_dict(shared.state_dict(), strict=True)
        assert not missing and not unexpected
        for lv in range(3):
            torch.testing.assert_close(ml[lv].running_mean, shared.running_mean)
        w = ml.weight if shared_affine else ml[2].weight
        torch.testing.assert_close(w, shared.weight)
    # per-level affines <-> shared affine
    own = MultiLevelBatchNorm(4, 3)
    with torch.no_grad():
        for lv in range(3):
            own[lv].weight.fill_(lv + 1.0)
    cyc = MultiLevelBatchNorm(4, 3, shared_affine=True)
    cyc.load_state_dict(own.state_dict())
    torch.testing.assert_close(cyc.weight, torch.full((4,), 2.0))
    own2 = MultiLevelBatchNorm(4, 3)
    own2.load_state_dict(cyc.state_dict())
    torch.testing.assert_close(own2[0].weight, torch.full((4,), 2.0))


def test_merge_levels_pools_statistics_of_the_union():
    ml = MultiLevelBatchNorm(4, 3, momentum=1.0)
    xs = [torch.randn(2, 4, 5, 5) * (lv + 1) + 3 * lv for lv in range(3)]  # equal sizes
    with level_pass([ml]):
        for lv, x in enumerate(xs):
            ml(x, level=lv)
    sd = {f"head.norm.{k}": v for k, v in ml.state_dict().items()}
    merge_levels_into_shared_bn(sd, "head.norm.")
    union = torch.cat(xs, dim=0)
    torch.testing.assert_close(sd["head.norm.running_mean"], union.mean(dim=(0, 2, 3)))
    # BN keeps the unbiased batch variance: pooled value within the n/(n-1) factor of the union's
    torch.testing.assert_close(sd["head.norm.running_var"], union.var(dim=(0, 2, 3)), rtol=0.05, atol=0)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict({k[len("head.norm."):]: v for k, v in sd.items()})


# ---- 2 processes ----------------------------------------------------------------------------
def _two_rank_worker(out_dir: str) -> None:
    """Each rank: an FCOS head with per-level BN (sync and not), rank-dependent inputs whose
    levels differ, one forward/backward; save the per-level running statistics."""
    from detectron2.layers import ShapeSpec
    from detectron2.utils import comm

    from aqd_d2.modeling.meta_arch.fcos import AQDFCOSHead

    rank = comm.get_rank()
    result = {}
    for norm in ("SyncMultiLevelBN", "MultiLevelBN", "SyncCycleBN"):
        torch.manual_seed(0)  # identical initial weights on both ranks
        head = AQDFCOSHead(input_shape=[ShapeSpec(channels=8, stride=8 * 2 ** lv) for lv in range(3)],
                           conv_dims=[8, 8], num_classes=2, norm=norm)
        feats = _level_inputs(3, channels=8, seed=10 + rank, offset=5.0 * rank)
        logits, reg, ctr = head(feats)
        sum(t.sum() for t in logits + reg + ctr).backward()
        result[norm] = {k: v.clone() for k, v in head.state_dict().items() if "running_mean" in k}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_sync_multilevel_bn_keeps_ranks_identical(tmp_path):
    from aqd_d2.engine import launch_cpu

    launch_cpu(_two_rank_worker, num_processes=2, args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for norm in ("SyncMultiLevelBN", "SyncCycleBN"):
        stats = r0[norm]
        assert stats and stats.keys() == r1[norm].keys()
        # two towers x two convs x three levels
        assert len([k for k in stats if k.endswith(".0.running_mean")]) == 4
        for k in stats:
            torch.testing.assert_close(stats[k], r1[norm][k], rtol=0, atol=1e-6)
        first = [k for k in stats if k.startswith("cls_subnet.1.")]
        means = torch.stack([stats[k] for k in sorted(first)])
        assert (means[0] - means[1]).abs().max() > 1e-3  # levels keep their own statistics
    # without synchronization the ranks' statistics differ (the inputs differ per rank)
    unsynced = r0["MultiLevelBN"]
    assert any(not torch.allclose(unsynced[k], r1["MultiLevelBN"][k]) for k in unsynced)
