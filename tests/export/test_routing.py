"""int8='auto': the measured per-layer choice between the int8 GEMM path and float
(aqd_d2.export.routing). Timing decides only *which* of two equal computations runs, so the
tests force each outcome through int8_min_speedup and check what each choice computes."""
import math

import pytest
import torch
from torch import nn

from aqd_d2.export.deploy import Int8ConvInference, convert_for_inference, int8_gemm_available
from aqd_d2.export.routing import measure_speedup, record_layer_inputs
from aqd_d2.layers import QConv2d
from aqd_d2.quantization import build_quantizer

from .exact_reference import assert_within, fake_quant_exact, float_terms

pytestmark = pytest.mark.skipif(not int8_gemm_available(), reason="torch._int_mm unavailable")


def _net():
    torch.manual_seed(0)

    def q(c, o, k, s):
        return QConv2d(c, o, k, stride=s, padding=k // 2, norm=nn.BatchNorm2d(o), activation=nn.ReLU(),
                       weight_quantizer=build_quantizer("lsq", 4, "weight"),
                       input_quantizer=build_quantizer("lsq", 4, "activation"))

    m = nn.Sequential(q(8, 16, 3, 2), q(16, 16, 1, 1))
    x = torch.randn(2, 8, 12, 10)
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval(), x


def test_record_layer_inputs_keeps_each_layers_first_input():
    m, x = _net()
    seen = record_layer_inputs(m, x, ["0", "1", "missing"])
    assert set(seen) == {"0", "1"}
    assert torch.equal(seen["0"], x)
    assert seen["1"].shape == (2, 16, 6, 5)
    assert not m[0]._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("min_speedup, kind", [(0.0, Int8ConvInference), (math.inf, QConv2d)])
def test_auto_routing_outcomes_compute_the_same(min_speedup, kind):
    m, x = _net()
    with torch.no_grad():
        dep, report = convert_for_inference(m, int8="auto", example_inputs=x, int8_min_speedup=min_speedup)
        hidden = dep[0](x)
        out = dep[1](hidden)
    assert all(isinstance(dep[i], kind) for i in range(2)), report.table()
    details = [r[2] for r in report.rows]
    assert all("measured" in d for d in details), details
    if kind is QConv2d:
        assert all(r[1] == "fake-quant weight frozen" and "< infx" in r[2] for r in report.rows)
        # frozen: the codes kept for the layer's integer form (which folds the BN itself)
        assert not dep[0].weight_quantizer.is_enabled and dep[0].integer_encoding is not None
    # either outcome is the trained layer's eval-mode arithmetic, bit for bit
    with torch.no_grad():
        assert torch.equal(hidden, m[0](x)) and torch.equal(out, m[1](hidden))
    # each layer against the fake-quantized layer computed exactly, on the input it receives
    # (tests/export/exact_reference.py: the int8 path rounds only in its epilogue, the frozen
    # float conv within the float32 bound of its dot products, on any CPU)
    for i, (inp, o) in enumerate(((x, hidden), (hidden, out))):
        ref, mag = fake_quant_exact(m[i], inp)
        assert_within(o, ref, mag, float_terms(dep[i]), f"layer {i}: {report.table()}")


def test_auto_needs_example_inputs_and_valid_mode():
    m, _ = _net()
    with pytest.raises(ValueError, match="example_inputs"):
        convert_for_inference(m, int8="auto")
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        convert_for_inference(m, int8="fast")


def test_measure_speedup_counts_interleaved_calls():
    calls = []
    r = measure_speedup(lambda: calls.append("i"), lambda: calls.append("f"), repeats=3, warmup=1)
    assert r > 0 and math.isfinite(r)
    # warm-up i, f; then rounds alternate the order: (i, f), (f, i), (i, f)
    assert calls == ["i", "f", "i", "f", "f", "i", "i", "f"]
    with pytest.raises(ValueError, match="repeats"):
        measure_speedup(lambda: None, lambda: None, repeats=0)
