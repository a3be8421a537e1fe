"""tools/analyze_model.py and tools/equivalent_flops.py agree exactly on every config (issue 16:
they used to count by different rules, e.g. the binary CenterNet twin's r_b 0.3591 vs 0.3607).

Both are reports of one counting core (:func:`aqd_d2.analysis.model_stats.analyze_model`), feed
it the same input (:func:`aqd_d2.analysis.config_model.input_shape`) and the same storage rule;
this test runs the eq. 1 report (:func:`aqd_d2.analysis.equivalent_flops.count_macs`) on every
config and checks each number against the analysis it is a view of. Fast: narrow widths
(tests/test_configs.py's ``load_test_config``), 64-pixel inputs (SSD: its fixed 300 at 1/8
width), 8 RoIs, and fvcore's trace is cached per architecture: configs that differ only in
precision (MODEL.QUANT) or in BiDet's loss weights count the same ops, so they reuse one trace
(``analyze_model(trace=...)`` checks that the conv / linear layers and the input match, and the
test traces anew when they do not).
"""
import json
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from aqd_d2.analysis.config_model import meta_architecture
from aqd_d2.analysis.equivalent_flops import count_macs, equivalent_flops
from tests.conftest import REPO
from tests.test_configs import CONFIGS, load_test_config

pytestmark = pytest.mark.usefixtures("single_thread")
_TRACES: dict = {}  # architecture key -> fvcore trace


def _shape(cfg):
    if meta_architecture(cfg) in ("SSD", "BiDetSSD"):
        return (3, cfg.MODEL.SSD.INPUT_SIZE, cfg.MODEL.SSD.INPUT_SIZE)
    return (3, 64, 64)


def _architecture(cfg) -> str:
    """The config minus what only changes precision or loss weights (not the counted ops)."""
    c = cfg.clone()
    c.defrost()
    quant, bidet = c.MODEL.pop("QUANT"), c.MODEL.pop("BIDET")
    return c.MODEL.dump() + quant.META_ARCHITECTURE + bidet.AUTO.dump() + bidet.RPN_PRIOR


@pytest.mark.parametrize("rel_path", CONFIGS)
def test_eq1_report_is_the_analysis(rel_path):
    cfg = load_test_config(rel_path, narrow=True)
    key = _architecture(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    try:
        r = count_macs(model, _shape(cfg), num_proposals=8, trace=_TRACES.get(key))
    except ValueError:  # same key, other layers: trace this one
        r = count_macs(model, _shape(cfg), num_proposals=8)
    s = r.stats
    _TRACES.setdefault(key, s.trace)
    assert r.macs == s.macs > 0 and r.binary_macs == s.binary_macs
    assert r.binarization_ratio == s.binarization_ratio
    assert r.equivalent_flops == s.equivalent_flops_eq1 == equivalent_flops(s.macs, s.binarization_ratio)
    assert r.size_bytes == s.storage_bytes
    # every conv/linear layer of the analysis is a layer of the report, norms are not
    layers = [x for x in s.layers if x.type != "(other)" and not x.is_norm]
    assert set(r.layer_macs) == {x.name for x in layers}
    assert r.binary_layers == {x.name for x in layers if x.is_binary}


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rel_path", ["configs/CenterNet/q-shapes-cpu-binary.yaml",
                                      "configs/FasterRCNN/R18-C4-shapes-voc-cpu-XNOR.yaml"])
def test_the_two_tools_print_the_same_numbers(rel_path, tmp_path, capsys):
    """Each CLI on its own (default input = the config's test input): MACs, binary MACs, r_b,
    eq. 1 and size equal."""
    opts = ["MODEL.CENTERNET.INPUT_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "8"]
    assert _tool("equivalent_flops").main(["--config-file", str(REPO / rel_path), *opts]) == 0
    eq = json.loads(capsys.readouterr().out)
    out = tmp_path / "a.json"
    assert _tool("analyze_model").main(["--config-file", str(REPO / rel_path), "--json", str(out), *opts]) == 0
    a = json.loads(Path(out).read_text())["totals"]
    assert eq["input"] == a["input_shape"][2:] == [64, 64]
    assert (eq["MACs"], eq["binary_MACs"]) == (a["macs"], a["binary_macs"])
    assert eq["r_b"] == a["binarization_ratio"] and eq["equivalent_FLOP"] == a["equivalent_flops_eq1"]
    assert eq["size_MB"] == a["storage_mb"]
    assert 0 < eq["r_b"] < 1
