"""The counting core's rules on hand counts (issue 16): a norm inside detectron2's
``Conv2d(norm=...)`` is a float op of its own (not the conv's MACs / BOPs), the one storage rule
(a quantized weight stores its scale when the scale is computed from it: Xnor / BWN / Bi-Real
per channel, TWN per tensor; BNN and DoReFa none), training-only layers are not counted, and
paper 003's eq. 1 report (tools/equivalent_flops.py) is a view of the same rows."""
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from aqd_d2.analysis.equivalent_flops import count_macs, model_size_bytes
from aqd_d2.analysis.model_stats import analyze_model
from aqd_d2.analysis.storage import stored_scale_count
from aqd_d2.layers import QConv2d
from aqd_d2.quantization import build_quantizer

pytestmark = pytest.mark.usefixtures("single_thread")


def qconv(cin, cout, w_method, w_bits, a_method, a_bits, norm=None, **kw):
    a = build_quantizer(a_method, a_bits, "activation") if a_method else None
    return QConv2d(cin, cout, 3, padding=1, bias=False, norm=norm,
                   weight_quantizer=build_quantizer(w_method, w_bits, "weight"), input_quantizer=a, **kw)


def test_norm_inside_a_binary_conv_is_a_float_op_of_its_own():
    """conv 3->4 (float, BN) | binary conv 4->4 (BN) | binary conv 4->4 (FrozenBN), 8x8 input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2d(3, 4, 3, padding=1, bias=False, norm=nn.BatchNorm2d(4)),
        qconv(4, 4, "xnor", 1, "xnor", 1, norm=nn.BatchNorm2d(4)),
        qconv(4, 4, "bnn", 1, "bnn", 1, norm=FrozenBatchNorm2d(4)),
    )
    s = analyze_model(model, (1, 3, 8, 8))
    rows = {r.name: r for r in s.layers}
    out = 8 * 8 * 4  # output elements of every layer
    # MACs: the conv op alone (fvcore's by_module would add the BN into the conv)
    assert rows["0"].macs == out * 3 * 9 == 6912
    assert rows["1"].macs == rows["2"].macs == out * 4 * 9 == 9216
    assert (rows["1"].bops, rows["1"].flops) == (9216, 0)  # binary: BOPs only
    # each norm a float row: one multiply-add per output element (y = x a + b)
    for name in ("0.norm", "1.norm", "2.norm"):
        assert rows[name].is_norm and (rows[name].macs, rows[name].bops, rows[name].flops) == (0, 0, out)
    assert rows["0.norm"].params == rows["1.norm"].params == 8 and rows["2.norm"].params == 0  # frozen
    assert s.norm_flops == 3 * out and s.other_flops == 0
    assert s.macs == 6912 + 2 * 9216 and s.binary_macs == 2 * 9216
    assert s.flops == 6912 + 3 * out and s.bops == 2 * 9216
    assert s.equivalent_flops == pytest.approx(6912 + 3 * 256 + 2 * 9216 / 64)
    # paper 003 eq. 1 counts conv/linear MACs only: M = 25344, r_b = 18432 / 25344
    r = count_macs(model, (1, 3, 8, 8))
    assert (r.macs, r.binary_macs) == (s.macs, s.binary_macs) == (25344, 18432)
    assert r.equivalent_flops == pytest.approx(18432 / 64 + 6912) == s.equivalent_flops_eq1


@pytest.mark.parametrize("w_method,w_bits,scales", [
    ("bnn", 1, 0),        # +-1: nothing to store
    ("xnor", 1, 6),       # mean|W| per output channel
    ("bwn", 1, 6),
    ("bireal", 1, 6),
    ("twn", 2, 1),        # one alpha per tensor
    ("dorefa", 4, 0),     # fixed grid k / (2^b - 1)
    ("lsq", 4, 0),        # learned step: a quantizer parameter, counted as one
])
def test_storage_rule_scales(w_method, w_bits, scales):
    torch.manual_seed(0)
    layer = QConv2d(4, 6, 3, padding=1, bias=True,
                    weight_quantizer=build_quantizer(w_method, w_bits, "weight"))
    assert stored_scale_count(layer) == scales
    row = {r.name: r for r in analyze_model(nn.Sequential(layer), (1, 4, 8, 8)).layers}["0"]
    q_params = sum(p.numel() for p in layer.weight_quantizer.parameters())
    # weight 6*4*9 = 216 at w_bits, 6 float biases, the scales and quantizer parameters float
    assert row.params == 216 + 6 + q_params
    assert row.storage_bytes == 216 * w_bits / 8 + 6 * 4 + scales * 4 + q_params * 4
    # tools/equivalent_flops.py's size is the same rule
    assert model_size_bytes(nn.Sequential(layer)) == row.storage_bytes
    assert model_size_bytes(nn.Sequential(layer), (1, 4, 8, 8)) == row.storage_bytes


def test_float_and_disabled_layers_store_no_scale():
    layer = qconv(4, 6, "xnor", 1, None, 32)
    layer.weight_quantizer.set_enabled(False)
    assert stored_scale_count(layer) == 0 and stored_scale_count(nn.Conv2d(4, 6, 3)) == 0


class _WithTrainingBranch(nn.Module):
    """A conv used at inference and a 'variance' conv only used in training (BiDet's
    log-variance branches are dropped at inference, paper 000 sec. 3.1.3)."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Conv2d(3, 4, 1)
        self.logvar = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.mean(x), self.logvar(x)) if self.training else self.mean(x)


def test_layers_not_called_at_inference_are_not_counted():
    model = _WithTrainingBranch()
    s = analyze_model(model, (1, 3, 4, 4))
    assert s.params == 16 and s.excluded_params == 16 and s.macs == 16 * 12
    assert any("not called at inference" in n and "logvar" in n for n in s.notes)
    assert model.training  # mode restored
    # without a trace every parameter counts (model_size_bytes(model) without inputs)
    assert model_size_bytes(model) == 32 * 4 and model_size_bytes(model, (1, 3, 4, 4)) == 16 * 4
