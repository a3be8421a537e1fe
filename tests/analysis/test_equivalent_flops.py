"""Paper 003 eq. 1 accounting against a hand count on a small model."""
import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

import aqd_d2
from aqd_d2.analysis.equivalent_flops import (count_macs, equivalent_flops, model_equivalent_flops,
                                              model_size_bytes)
from aqd_d2.convert import QuantPolicy, quantize_model, set_quantization_enabled


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),                # float: 8*8*4 * 3*9 = 6912
        nn.Conv2d(4, 4, 3, padding=1, bias=False),    # binary: 8*8*4 * 4*9 = 9216
        nn.Conv2d(4, 4, 3, padding=1, groups=4),      # depthwise float: 8*8*4 * 1*9 = 2304
        nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1),  # in 8*8*4 * 2*16 = 8192
        nn.Flatten(), nn.Linear(2 * 16 * 16, 5),      # 5 * 512 = 2560
    )


def binarize(model, methods=("bnn", "bnn"), a_bits=1):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    q = cfg.MODEL.QUANT
    q.ENABLED, q.W_METHOD, q.W_BITS, q.A_METHOD, q.A_BITS = True, methods[0], 1, methods[1], a_bits
    q.COMPONENT_PREFIXES, q.SCOPE = ["binary:1"], ["binary"]
    q.KEEP_FIRST_FP, q.KEEP_LAST_FP = False, False
    quantize_model(model, QuantPolicy.from_config(cfg))
    return model


HAND_M = 6912 + 9216 + 2304 + 8192 + 2560


def test_hand_count_float_and_fvcore():
    from fvcore.nn import FlopCountAnalysis

    model, x = small_model(), torch.rand(1, 3, 8, 8)
    r = count_macs(model, x)
    assert r.macs == HAND_M and r.binary_macs == 0 and r.equivalent_flops == HAND_M
    fv = FlopCountAnalysis(model.eval(), x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert fv.total() == HAND_M


def test_eq1_on_binary_model():
    model, x = binarize(small_model()), torch.rand(1, 3, 8, 8)
    s = model_equivalent_flops(model, x)
    assert s["MACs"] == HAND_M and s["binary_MACs"] == 9216
    assert s["r_b"] == pytest.approx(9216 / HAND_M)
    assert s["equivalent_FLOP"] == pytest.approx(9216 / 64 + (HAND_M - 9216))
    # a disabled stage is float again
    set_quantization_enabled(model, False)
    assert model_equivalent_flops(model, x)["binary_MACs"] == 0


def test_binary_weight_only_is_not_binary_mac_and_model_size():
    model = binarize(small_model(), ("bwn", "fp"), a_bits=32)
    assert count_macs(model, torch.rand(1, 3, 8, 8)).binary_macs == 0
    n_float = sum(p.numel() for n, p in model.named_parameters() if n != "1.weight")
    assert model_size_bytes(model) == (n_float * 32 + 4 * 4 * 9 + 4 * 32) / 8


def test_eq1_formula():
    assert equivalent_flops(6400, 0.5) == pytest.approx(50 + 3200)
    assert equivalent_flops(100, 0.0) == 100 and equivalent_flops(64, 1.0) == 1


def test_tool_reports_centernet_and_yolo(capsys):
    import importlib.util
    import json

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("eqflops_tool", REPO / "tools" / "equivalent_flops.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config-file", str(REPO / "configs/CenterNet/q-shapes-cpu-binary.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input"] == [128, 128] and 0 < out["r_b"] < 1
    assert out["equivalent_FLOP"] == pytest.approx(equivalent_flops(out["MACs"], out["r_b"]))
    assert tool.main(["--config-file", str(REPO / "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml"),
                      "--input-size", "64", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["r_b"] == 0 and out["MACs"] > 0
