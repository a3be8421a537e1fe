"""analyze_model against hand counts on a small model, and on a config-built detector."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from aqd_d2.analysis.model_stats import analyze_model
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import build_quantizer
from tests.conftest import REPO


def _small_model() -> nn.Module:
    """float conv 3->8 | 4-bit W / 2-bit A conv 8->8 | binary conv 8->8 (no bias) | BN |
    binary XNOR linear 512->10, on 8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        QConv2d(8, 8, 3, padding=1, bias=False, weight_quantizer=build_quantizer("lsq", 4, "weight"),
                input_quantizer=build_quantizer("lsq", 2, "activation")),
        QConv2d(8, 8, 3, stride=2, padding=1, bias=False,
                weight_quantizer=build_quantizer("bnn", 1, "weight"),
                input_quantizer=build_quantizer("bnn", 1, "activation")),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        QLinear(8 * 4 * 4, 10, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                input_quantizer=build_quantizer("xnor", 1, "activation", scale_activations=True)),
    )


def test_hand_counts_small_model():
    model = _small_model()
    s = analyze_model(model, (1, 3, 8, 8))
    rows = {r.name: r for r in s.layers}
    # MACs = output pixels * C_out * (C_in * k * k)
    assert rows["0"].macs == 8 * 8 * 8 * (3 * 9) == 13824
    assert rows["1"].macs == 8 * 8 * 8 * (8 * 9) == 36864
    assert rows["2"].macs == 4 * 4 * 8 * (8 * 9) == 9216
    assert rows["5"].macs == 10 * 128 == 1280
    # BOPs = MACs * w_bits * a_bits; FLOPs only for the float layer
    assert (rows["1"].bops, rows["2"].bops, rows["5"].bops) == (36864 * 8, 9216, 1280)
    assert rows["0"].flops == 13824 and rows["0"].bops == 0
    assert (rows["1"].w_bits, rows["1"].a_bits, rows["2"].w_bits, rows["5"].a_bits) == (4, 2, 1, 1)
    # params: conv0 weight+bias; lsq step sizes are parameters of the quantized layer (1 each)
    assert rows["0"].params == 8 * 27 + 8
    assert rows["2"].params == 8 * 72 and rows["5"].params == 10 * 128 + 10
    n_lsq = sum(p.numel() for p in model[1].weight_quantizer.parameters()) + sum(
        p.numel() for p in model[1].input_quantizer.parameters())
    assert rows["1"].params == 8 * 72 + n_lsq
    # the BN is a float row of its own: affine params, one multiply-add per output element
    assert rows["3"].params == 16 and rows["3"].is_norm
    assert (rows["3"].macs, rows["3"].bops, rows["3"].flops) == (0, 0, 8 * 4 * 4)
    assert rows["(other)"].params == 0
    # storage: quantized weights at their bits, everything else float32
    assert rows["0"].storage_bytes == (8 * 27 + 8) * 4
    assert rows["1"].storage_bytes == 8 * 72 * 4 / 8 + n_lsq * 4
    assert rows["2"].storage_bytes == 8 * 72 / 8
    # XNOR stores its per-output-channel scale (10 floats); BNN (layer 2) stores none
    assert rows["5"].storage_bytes == 1280 / 8 + 10 * 4 + 10 * 4
    total_params = 224 + 576 + n_lsq + 576 + 1290 + 16
    assert s.params == total_params
    assert s.storage_bytes == pytest.approx(224 * 4 + 288 + n_lsq * 4 + 72 + 200 + 40 + 64)
    assert s.float_storage_bytes == total_params * 4
    # totals and the derived measures
    macs = 13824 + 36864 + 9216 + 1280
    assert s.macs == macs and s.binary_macs == 9216 + 1280
    assert s.bops == 36864 * 8 + 9216 + 1280
    assert s.norm_flops == 128 and s.other_flops == 0
    assert s.flops == 13824 + 128
    assert s.equivalent_flops == pytest.approx(s.flops + s.bops / 64)
    r_b = (9216 + 1280) / macs
    assert s.binarization_ratio == pytest.approx(r_b)
    assert s.equivalent_flops_eq1 == pytest.approx(macs * r_b / 64 + macs * (1 - r_b))
    data = json.loads(s.to_json())
    assert data["totals"]["bops"] == s.bops and len(data["layers"]) == 6
    assert "equivalent FLOPs" in s.table()


def test_disabled_quantizer_counts_as_float():
    model = _small_model()
    model[2].weight_quantizer.set_enabled(False)
    row = {r.name: r for r in analyze_model(model, (1, 3, 8, 8)).layers}["2"]
    assert (row.w_bits, row.a_bits, row.bops, row.flops) == (32, 1, 0, 9216)


def test_cli_on_config(tmp_path):
    """The CLI on a quantized RetinaNet config: every conv of backbone/FPN/head counted."""
    out = tmp_path / "stats.json"
    cmd = [sys.executable, str(REPO / "tools" / "analyze_model.py"), "--config-file",
           str(REPO / "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml"), "--input-size", "64",
           "--json", str(out), "MODEL.FPN.OUT_CHANNELS", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "binarization ratio" in res.stdout
    data = json.loads(out.read_text())
    layers = [r for r in data["layers"] if r["type"] != "(other)" and not r["is_norm"]]
    assert all(r["macs"] > 0 for r in layers), [r["name"] for r in layers if r["macs"] == 0]
    norms = [r for r in data["layers"] if r["is_norm"]]
    assert norms and all(r["flops"] > 0 and r["bops"] == 0 for r in norms)
    quantized = [r for r in layers if r["w_bits"] == 2]
    assert quantized and all(r["bops"] == r["macs"] * 4 for r in quantized)
    assert data["totals"]["bops"] > 0 and data["totals"]["binarization_ratio"] == 0.0


def test_deployed_model_counts_like_fake_quant_model():
    """The real binary / int8 modules of convert_for_inference count the same MACs, BOPs,
    parameters and storage as the fake-quantized layers they replace."""
    from aqd_d2.export.deploy import convert_for_inference, int8_gemm_available

    if not int8_gemm_available():
        pytest.skip("torch._int_mm unavailable")
    model = _small_model().eval()
    deployed, _ = convert_for_inference(model, fold_bn=False)
    a = {r.name: r for r in analyze_model(model, (1, 3, 8, 8)).layers}
    b = {r.name: r for r in analyze_model(deployed, (1, 3, 8, 8)).layers}
    assert a.keys() == b.keys()
    for name in ("0", "1", "2", "5"):
        ra, rb = a[name], b[name]
        assert (rb.macs, rb.bops, rb.w_bits, rb.a_bits) == (ra.macs, ra.bops, ra.w_bits, ra.a_bits), name
    # weights (and biases) are the same tensors in another form; quantizer state differs
    assert (b["2"].params, b["2"].storage_bytes) == (a["2"].params, a["2"].storage_bytes)
    assert (b["5"].params, b["5"].storage_bytes) == (a["5"].params, a["5"].storage_bytes)
