"""Float nn.Linear through oneDNN (aqd_d2.export.float_linear): same values as F.linear to
float32 rounding, routing modes True / False / "auto", QLinear untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aqd_d2.export import float_linear as fl
from aqd_d2.export.deploy import convert_for_inference
from aqd_d2.export.float_linear import (
    REL_TOLERANCE,
    OneDNNLinear,
    convert_float_linears,
    onednn_linear_available,
    relative_difference,
)
from aqd_d2.export.routing import record_layer_inputs
from aqd_d2.layers import QLinear
from aqd_d2.quantization import build_quantizer

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch without oneDNN")


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _head() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(392, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 7, bias=False)).eval()


@needs_onednn
def test_onednn_linear_equals_f_linear():
    lin = _head()[0]
    m = OneDNNLinear.from_linear(lin)
    x = torch.randn(37, 392).relu()
    with torch.no_grad():
        ref, out = F.linear(x, lin.weight, lin.bias), m(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert relative_difference(out, ref) <= REL_TOLERANCE
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 3-D input, no bias, empty batch
    m3 = OneDNNLinear.from_linear(_head()[4])
    x3 = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(m3(x3), F.linear(x3, m3.weight), rtol=1e-5, atol=1e-5)
        assert m3(torch.zeros(0, 64)).shape == (0, 7)
    # same parameter names: the float state dict loads
    assert set(m.state_dict()) == {"weight", "bias"}
    m.load_state_dict(lin.state_dict())


def test_relative_difference_by_hand():
    a, b = torch.tensor([1.0, 2.0, 4.5]), torch.tensor([1.0, 2.5, 4.0])
    assert relative_difference(a, b) == 0.5 / 4.0
    assert relative_difference(torch.tensor([0.1]), torch.tensor([0.3])) == pytest.approx(0.2)  # / max(.., 1)
    assert relative_difference(torch.zeros(0), torch.zeros(0)) == 0.0


@needs_onednn
def test_gradient_falls_back_to_f_linear():
    lin = nn.Linear(8, 3)
    m = OneDNNLinear.from_linear(lin)
    x = torch.randn(4, 8, requires_grad=True)
    m(x).sum().backward()  # oneDNN's op has no autograd: F.linear computed this
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(4, 8))


@needs_onednn
@pytest.mark.parametrize("mode", [True, False, "auto"])
def test_modes(mode):
    head = _head()
    x = torch.randn(50, 392)
    inputs = record_layer_inputs(head, x, ["0", "2", "4"]) if mode == "auto" else None
    with torch.no_grad():
        ref = head(x)
        rows = convert_float_linears(head, mode, inputs, repeats=3)
        out = head(x)
    if mode is False:
        assert rows == [] and all(type(m) is nn.Linear for m in head if isinstance(m, nn.Linear))
    else:
        kinds = {r[0]: r[1] for r in rows}
        assert set(kinds) == {"0", "2", "4"}
        assert set(kinds.values()) <= {"float (oneDNN)", "float (F.linear)"}
        for name, kind in kinds.items():  # the report says what the module is
            assert (type(head[int(name)]) is OneDNNLinear) == (kind == "float (oneDNN)")
        if mode is True:
            assert set(kinds.values()) == {"float (oneDNN)"}
        else:
            assert all("measured" in r[2] and "max rel. diff" in r[2] for r in rows)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_auto_keeps_faster_form(monkeypatch):
    """The choice follows the measured speed-up (monkeypatched: no timing in the test)."""
    head = _head()
    x = torch.randn(20, 392)
    inputs = record_layer_inputs(head, x, ["0", "2", "4"])
    speed = {"0": 2.0, "2": 0.5, "4": 1.0}
    order = iter(["0", "2", "4"])
    monkeypatch.setattr(fl, "measure_speedup", lambda a, b, repeats: speed[next(order)])
    rows = {r[0]: r for r in convert_float_linears(head, "auto", inputs)}
    assert type(head[0]) is OneDNNLinear and type(head[2]) is nn.Linear and type(head[4]) is OneDNNLinear
    assert "2.00x" in rows["0"][2] and rows["2"][1] == "float (F.linear)"


@needs_onednn
def test_auto_rejects_a_differing_result_and_unreached_layers(monkeypatch):
    head = _head()
    inputs = record_layer_inputs(head, torch.randn(9, 392), ["0"])  # "2", "4" not recorded
    monkeypatch.setattr(fl, "relative_difference", lambda a, b: 1e-3)
    rows = {r[0]: r for r in convert_float_linears(head, "auto", inputs)}
    assert rows["0"][1] == "float (F.linear)" and "differs" in rows["0"][2]
    assert rows["2"][2] == "not reached by example_inputs" and type(head[2]) is nn.Linear


def test_qlinear_untouched_and_bad_mode():
    q = nn.Sequential(QLinear(16, 4, weight_quantizer=build_quantizer("liq", 2, "weight"),
                              input_quantizer=build_quantizer("liq", 2, "activation")))
    assert convert_float_linears(q, True) == [] and type(q[0]) is QLinear
    with pytest.raises(ValueError, match="float_linear must be True, False or 'auto'"):
        convert_float_linears(q, "fast")
    with pytest.raises(ValueError, match="float_linear='auto'.*example_inputs"):
        convert_for_inference(_head(), float_linear="auto")
    with pytest.raises(ValueError, match="float_linear must be"):
        convert_for_inference(_head(), float_linear="yes")


@needs_onednn
def test_convert_for_inference_auto_on_a_module():
    head = _head()
    x = torch.randn(30, 392)
    with torch.no_grad():
        dep, report = convert_for_inference(head, float_linear="auto", example_inputs=x)
        torch.testing.assert_close(dep(x), head(x), rtol=1e-5, atol=1e-5)
    assert sum(r[1].startswith("float (") for r in report.rows) == 3
    assert all(type(m) is nn.Linear for m in head if isinstance(m, nn.Linear))  # a copy was converted


@needs_onednn
def test_traced_graph_uses_aten_linear():
    m = OneDNNLinear.from_linear(nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        graph = str(torch.jit.trace(m, x).graph)
        torch.testing.assert_close(torch.jit.trace(m, x)(x), m(x), rtol=1e-5, atol=1e-6)
    assert "aten::linear" in graph and "mkldnn" not in graph
