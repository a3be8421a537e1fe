"""tools/bench_binary_conv.py --emulate-isa: option handling, the check that each ISA cap took
effect, and a real capped probe subprocess (oneDNN must report AVX2 and AVX2 convolutions,
ATen the AVX2 capability, aqd_d2 the AVX2 binary kernel)."""
import importlib.util
from pathlib import Path

import pytest

from aqd_d2.export import binary_conv as bc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("bench_binary_conv", REPO / "tools" / "bench_binary_conv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GOOD = {"onednn_isa": "Intel AVX2", "onednn_conv_impls": ["brg_conv_fwd:avx2", "jit:avx2"],
        "aten_capability": "AVX2", "binary_kernel": "cpp-avx2"}


def test_strip_option(tool):
    argv = ["--threads", "1,2", "--emulate-isa", "avx2", "--all-isas"]
    assert tool.strip_option(argv, "--emulate-isa") == ["--threads", "1,2", "--all-isas"]
    assert tool.strip_option(["--emulate-isa=avx2", "--repeats", "9"], "--emulate-isa") == [
        "--repeats", "9"]


def test_emulation_env_caps_every_side(tool):
    env = tool.EMULATION_ENV["avx2"]
    assert env == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2", "AQD_BINARY_ISA": "avx2"}


@pytest.mark.parametrize("field, value, key", [
    ("onednn_isa", "Intel AVX-512 with Intel DL Boost and bfloat16 support", "ONEDNN_MAX_CPU_ISA"),
    ("onednn_isa", None, "ONEDNN_MAX_CPU_ISA"),
    ("onednn_conv_impls", ["brg_conv_fwd:avx512_core"], "ONEDNN_MAX_CPU_ISA"),
    ("onednn_conv_impls", [], "ONEDNN_MAX_CPU_ISA"),
    ("aten_capability", "AVX512", "ATEN_CPU_CAPABILITY"),
    ("binary_kernel", "cpp-avx512", "AQD_BINARY_ISA"),
])
def test_check_caps_names_the_cap_that_failed(tool, field, value, key):
    assert tool._check_caps("avx2", GOOD) == []
    problems = tool._check_caps("avx2", dict(GOOD, **{field: value}))
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_unknown_isa_is_rejected(tool):
    with pytest.raises(SystemExit, match="must be one of"):
        tool.emulate("sse2", [])


@pytest.mark.skipif(not bc.kernel_available() or "avx2" not in bc.available_isas(),
                    reason="needs the C++ extension and an AVX2 CPU")
def test_capped_probe_reports_avx2(tool):
    rep = tool._run_probe(tool.EMULATION_ENV["avx2"], verbose=True)
    assert tool._check_caps("avx2", rep) == [], rep
    assert "AVX2" in rep["onednn_isa"]
    assert rep["onednn_conv_impls"] and all("avx2" in i for i in rep["onednn_conv_impls"])
    assert rep["float_ms"] == {}  # verbose probe: dispatch only, no timing
