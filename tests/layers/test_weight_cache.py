"""The cached fake-quantized weight (Quantizer.cached_weight) is never stale.

Every check compares, bit for bit, a layer that has been running with its cache against the
uncached computation of the same state: a deep copy (copies never carry the cache) or a run
with the cache lookup switched off. Between checks the state changes in every way a
training or deployment flow changes it: in-place weight writes (whole tensor, a view, under
no_grad and inference mode), optimizer steps, the quantizer's learned parameter, the enabled
flag (through set_enabled and through the buffer), load_state_dict, parameter re-assignment,
dtype / device moves, and a ``.data`` write followed by clear_weight_caches.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import Quantizer, build_quantizer, clear_weight_caches
from aqd_d2.quantization import fused

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (weight method, bits, kwargs), (activation method, bits) or None
SPECS = [
    (("liq", 4, {}), ("liq", 4)),
    (("liq", 2, {"weight_norm": False}), ("liq", 2)),
    (("lsq", 3, {}), ("lsq", 3)),
    (("dorefa", 3, {}), ("dorefa", 3)),
    (("twn", 2, {}), ("liq", 4)),
    (("xnor", 1, {}), ("xnor", 1)),
    (("bwn", 1, {}), None),
    (("bireal", 1, {}), ("bireal", 1)),
]


@pytest.fixture(autouse=True)
def _deterministic_convs(monkeypatch):
    """cuDNN may pick non-deterministic algorithms: the comparisons are bit for bit."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _learned(layer):
    """The quantizers' learned parameters (alpha / step) of ``layer``."""
    return [p for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None
            for p in q.parameters(recurse=False)]


def make(spec, kind: str, device: str, seed: int = 0, integer_eval: str = "off"):
    (wm, wb, wkw), a = spec
    torch.manual_seed(seed)
    wq = build_quantizer(wm, wb, "weight", **wkw)
    aq = None if a is None else build_quantizer(a[0], a[1], "activation")
    if aq is not None:  # these tests are about the fake-quant path (eval: its cached weight)
        aq.set_integer_eval(integer_eval)
    if kind == "conv":
        layer = QConv2d(4, 6, 3, padding=1, bias=True, weight_quantizer=wq, input_quantizer=aq)
        x = torch.randn(2, 4, 7, 6)
    else:
        layer = QLinear(5, 3, weight_quantizer=wq, input_quantizer=aq)
        x = torch.randn(4, 5)
    layer = layer.to(device)
    x = x.to(device)
    layer.train()
    layer(x).sum().backward()  # data initialisation of the learned ranges
    layer.zero_grad(set_to_none=True)
    return layer, x


def uncached(layer, x):
    """The layer's output computed from scratch (a deep copy holds no cached weight)."""
    twin = copy.deepcopy(layer)
    assert twin.weight_quantizer._wcache is None
    with torch.no_grad():
        return twin(x)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check(layer, x, hit: bool | None = None):
    """Output with the cache == uncached output; ``hit``: whether the cache must have been used."""
    before = layer.weight_quantizer._wcache
    with torch.no_grad():
        y = layer(x)
    after = layer.weight_quantizer._wcache
    assert after is not None
    if hit is not None:
        assert (after is before) == hit
    ref = uncached(layer, x)
    assert same(y, ref)
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0][0]}{s[0][1]}")
def test_eval_cache_equals_uncached_after_every_change(spec, kind, device):
    layer, x = make(spec, kind, device)
    wq = layer.weight_quantizer
    layer.eval()
    check(layer, x, hit=False)
    check(layer, x, hit=True)  # unchanged state: reused
    y0 = check(layer, x, hit=True)

    with torch.no_grad():  # in-place write to the whole weight
        layer.weight.mul_(0.5)
    check(layer, x, hit=False)
    with torch.no_grad():  # through a view
        layer.weight[0].zero_()
    check(layer, x, hit=False)
    with torch.inference_mode():  # inside inference mode
        layer.weight.add_(0.25)
    check(layer, x, hit=False)

    for p in _learned(layer):  # the quantizers' learned ranges
        with torch.no_grad():
            p.mul_(1.5)
        # (the input quantizer's range is not an input of the quantized weight)
        check(layer, x, hit=not any(p is w for w in wq.parameters()))

    # the enabled flag, both ways of writing it
    wq.set_enabled(False)
    with torch.no_grad():
        float_out = layer(x)
    if layer.input_quantizer is None:
        w = layer.weight
        ref = F.conv2d(x, w, layer.bias, padding=1) if kind == "conv" else F.linear(x, w, layer.bias)
        assert same(float_out, ref)
    wq.set_enabled(True)
    check(layer, x, hit=False)
    wq.enabled.fill_(False)
    with torch.no_grad():
        assert same(layer(x), float_out)
    wq.enabled.fill_(True)
    check(layer, x)

    # load_state_dict: another layer's weights and ranges
    other, _ = make(spec, kind, device, seed=1)
    layer.load_state_dict(other.state_dict())
    y1 = check(layer, x, hit=False)
    assert same(y1, uncached(other.eval(), x))
    layer.load_state_dict(other.state_dict())  # same values again: still equal
    check(layer, x)

    # parameter re-assignment
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone() * -1.0)
    check(layer, x, hit=False)

    # a .data write is invisible to version counters: clear_weight_caches is the remedy
    layer.weight.data.mul_(2.0)
    assert clear_weight_caches(layer) == 1
    check(layer, x, hit=False)
    assert not same(check(layer, x, hit=True), y0)

    # inference mode: its own entries, equal values
    with torch.inference_mode():
        yi = layer(x)
    with torch.no_grad():
        assert same(yi, layer(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_optimizer_steps_and_mode_switches(kind):
    layer, x = make(SPECS[0], kind, "cpu")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        layer.train()
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()  # weight and alpha change
        layer.eval()
        check(layer, x)
        check(layer, x, hit=True)
    layer.train()
    assert layer.weight_quantizer._wcache is None  # train() drops it
    layer.eval()
    check(layer, x, hit=False)


def test_dtype_and_pickle_and_copies():
    layer, x = make(SPECS[0], "conv", "cpu")
    layer.eval()
    check(layer, x)
    twin = copy.deepcopy(layer)
    assert twin.weight_quantizer._wcache is None
    assert pickle.loads(pickle.dumps(layer)).weight_quantizer._wcache is None
    layer.double()
    assert layer.weight_quantizer._wcache is None
    check(layer, x.double(), hit=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another output dtype: another entry
        with torch.no_grad():
            yb = layer(x.double())
    twin = copy.deepcopy(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert same(yb, twin(x.double()))


def test_weight_is_quantized_once_per_state(monkeypatch):
    calls = []
    real = fused._quantize

    def counting(spec, t, *a, **k):
        calls.append(t)
        return real(spec, t, *a, **k)

    monkeypatch.setattr(fused, "_quantize", counting)
    layer, x = make(SPECS[0], "conv", "cpu")
    w = layer.weight
    layer.eval()
    calls.clear()
    with torch.no_grad():
        for _ in range(5):
            layer(x)
    assert sum(t is w for t in calls) == 1
    # training: a layer called at five "levels" quantizes its weight once per step, forward
    # and backward included
    layer.train()
    calls.clear()
    sum(layer(x * (i + 1)).sum() for i in range(5)).backward()
    assert sum(t is w for t in calls) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0][0]}{s[0][1]}")
def test_training_with_cache_equals_without(spec, kind, device, monkeypatch):
    """Shared-layer steps (two calls per step, like a head over pyramid levels), SGD
    updates in between, plain and bf16 autocast: outputs and every gradient are the same
    bits with and without the cache."""
    layer, x = make(spec, kind, device)
    twin = copy.deepcopy(layer)

    def run(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        rec = []
        for step in range(4):
            opt.zero_grad()
            amp = torch.autocast(device, dtype=torch.bfloat16, enabled=step == 3)
            with amp:
                xs = [x.clone().requires_grad_(True), (x * 0.5).requires_grad_(True)]
                ys = [m(v) for v in xs]
            sum((y.float() * torch.arange(y.numel(), device=device).view_as(y)).sum()
                for y in ys).backward()
            rec += [y.detach() for y in ys] + [v.grad for v in xs]
            rec += [p.grad.clone() for p in m.parameters() if p.grad is not None]
            opt.step()
        return rec

    cached = run(layer)
    monkeypatch.setattr(Quantizer, "cached_weight", lambda self, *a, **k: None)
    plain = run(twin)
    assert len(cached) == len(plain)
    for a, b in zip(cached, plain):
        assert same(a, b)


# ---- the eval-mode integer plan (aqd_d2.layers.integer_eval) is never stale either ----------
INTEGER_SPECS = [s for s in SPECS if s[1] is not None and s[0][0] != "xnor"]  # (XNOR's K: no integer form)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("spec", INTEGER_SPECS, ids=lambda s: f"{s[0][0]}{s[0][1]}")
def test_integer_plan_equals_fresh_plan_after_every_change(spec, kind):
    layer, x = make(spec, kind, "cpu", integer_eval="auto")
    layer.eval()

    def check_plan():
        with torch.no_grad():
            y = layer(x)
        plan = layer.__dict__.get("_integer_plan")
        assert plan is not None and plan[1] is not None  # the integer form ran
        assert same(y, uncached(layer, x))  # a deep copy's plan is rebuilt from its state
        return y

    y0 = check_plan()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    check_plan()
    with torch.inference_mode():
        layer.weight.add_(0.25)
    check_plan()
    for p in _learned(layer):
        with torch.no_grad():
            p.mul_(1.5)
        check_plan()
    other, _ = make(spec, kind, "cpu", seed=1, integer_eval="auto")
    layer.load_state_dict(other.state_dict())
    assert same(check_plan(), uncached(other.eval(), x))
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone() * -1.0)
    check_plan()
    layer.weight.data.mul_(2.0)  # invisible to version counters: clear_weight_caches
    assert clear_weight_caches(layer) >= 1
    assert not same(check_plan(), y0)
