#!/usr/bin/env bash
# The export and data tests on the AVX2 code path, also on a CPU with AVX-512: aqd_d2's own
# kernels and torch's float kernels are capped at AVX2, so a developer machine or CI runner
# with AVX-512 runs what most x86 CPUs run (issue 14: tests that hold on every x86 CPU).
#
#   bash tools/test_avx2_path.sh [PYTHON] [PYTEST ARGS...]
#
# PYTHON defaults to .venv/bin/python; PYTEST ARGS are appended to
# `PYTHON -m pytest tests/export tests/data` (e.g. -x, -q, -k EXPR, or more test paths).
# Before the tests, every cap is checked in the capped environment and the run fails if one
# did not take effect:
#   ATEN_CPU_CAPABILITY=avx2    ATen's vectorized kernels: torch reports capability "AVX2"
#   ONEDNN_MAX_CPU_ISA=AVX2     oneDNN (torch's float convolution): its ONEDNN_VERBOSE isa line
#                               says AVX2, and the convolutions it executes are no AVX-512 /
#                               AMX implementations
#   MKL_ENABLE_INSTRUCTIONS=AVX2  MKL's BLAS (float linear layers); MKL does not report its
#                               code path, so this one is set, not checked
#   AQD_BINARY_ISA=avx2         aqd_d2's binary kernel: kernel_backend() == "cpp-avx2"
#   AQD_INT8_ISA=avx2           aqd_d2's int8 kernel: int8_kernel_backend() == ("cpp", avx2)
#   AQD_ROI_ISA=avx2            aqd_d2's fused ROIAlign: roi_align_kernel() == "cpp-avx2"
# A CPU without AVX2 cannot run the AVX2 path, and a build without the C++ extension has no
# AVX2 kernels to run: both are errors too.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${1:-.venv/bin/python}
if [ $# -gt 0 ]; then shift; fi
if ! [ -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "test_avx2_path.sh: no python interpreter at '$PYTHON'" >&2
  exit 2
fi

export ATEN_CPU_CAPABILITY=avx2
export ONEDNN_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export AQD_BINARY_ISA=avx2
export AQD_INT8_ISA=avx2
export AQD_ROI_ISA=avx2
unset AQD_BINARY_KERNEL AQD_INT8_KERNEL ONEDNN_VERBOSE DNNL_VERBOSE

start=$SECONDS
echo "== AVX2 path: ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA" \
     "MKL_ENABLE_INSTRUCTIONS=$MKL_ENABLE_INSTRUCTIONS AQD_BINARY_ISA=$AQD_BINARY_ISA AQD_INT8_ISA=$AQD_INT8_ISA" \
     "AQD_ROI_ISA=$AQD_ROI_ISA"

"$PYTHON" - <<'EOF'
import os
import re
import subprocess
import sys

problems = []
flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
if flags and not re.search(r"\bavx2\b", flags):
    sys.exit("FAIL: this CPU has no AVX2: the AVX2 path cannot run here")

import torch  # noqa: E402

cap = torch.backends.cpu.get_cpu_capability()
print(f"  ATen CPU capability: {cap}")
if cap != "AVX2":
    problems.append(f"ATEN_CPU_CAPABILITY=avx2: torch reports capability {cap!r}, not 'AVX2'")

# oneDNN reports its ISA and each executed primitive with ONEDNN_VERBOSE=1 (a subprocess:
# verbose mode is read when oneDNN starts). NCHW and channels_last convs of a size that
# torch sends to oneDNN.
probe = """
import torch, torch.nn.functional as F
torch.set_num_threads(1)
x, w = torch.randn(1, 64, 56, 56), torch.randn(64, 64, 3, 3)
F.conv2d(x, w, None, 1, 1)
cl = torch.channels_last
F.conv2d(x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), None, 1, 1)
"""
out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, ONEDNN_VERBOSE="1"),
                     capture_output=True, text=True, check=False)
if out.returncode != 0:
    problems.append(f"oneDNN probe failed ({out.returncode}): {out.stderr[-500:]}")
isa = [ln.split("isa:", 1)[1].strip() for ln in out.stdout.splitlines() if ",info,cpu,isa:" in ln]
impls = sorted({ln.split(",")[6] for ln in out.stdout.splitlines() if ",primitive,exec,cpu,convolution," in ln})
print(f"  oneDNN isa: {isa[0] if isa else None}; float convolutions ran as: {', '.join(impls) or 'nothing reported'}")
if not isa or "AVX2" not in isa[0] or re.search(r"AVX-?512|AMX", isa[0], re.I):
    problems.append(f"ONEDNN_MAX_CPU_ISA=AVX2: oneDNN reports isa {isa[0] if isa else None!r}")
if not impls or any(re.search(r"avx512|amx", i, re.I) for i in impls):
    problems.append(f"ONEDNN_MAX_CPU_ISA=AVX2: float convolutions ran as {impls}")

from aqd_d2.export import binary_conv as bc  # noqa: E402
from aqd_d2.export._ext_build import extension_error  # noqa: E402
from aqd_d2.export.int8_gemm import INT8_ISA_NAMES, int8_kernel_backend  # noqa: E402
from aqd_d2.export.roi_pooler import roi_align_kernel  # noqa: E402

try:
    binary = bc.kernel_backend()
except Exception as e:  # noqa: BLE001 - reported below
    binary = f"error: {e}"
print(f"  binary kernel: {binary} (variants here: {bc.available_isas()})")
if binary != "cpp-avx2":
    problems.append(f"AQD_BINARY_ISA=avx2: the binary kernel is {binary!r} "
                    f"(extension: {extension_error() or 'built'})")
try:
    backend, isa_id = int8_kernel_backend()
    int8 = f"{backend}-{INT8_ISA_NAMES[isa_id]}" if backend == "cpp" else backend
except Exception as e:  # noqa: BLE001 - reported below
    int8 = f"error: {e}"
print(f"  int8 kernel: {int8}")
if int8 != "cpp-avx2":
    problems.append(f"AQD_INT8_ISA=avx2: the int8 kernel is {int8!r}")
try:
    roi = roi_align_kernel()
except Exception as e:  # noqa: BLE001 - reported below
    roi = f"error: {e}"
print(f"  fused ROIAlign: {roi}")
if roi != "cpp-avx2":
    problems.append(f"AQD_ROI_ISA=avx2: the fused ROIAlign is {roi!r}")
print("  MKL_ENABLE_INSTRUCTIONS=AVX2: set (MKL does not report its code path)")

if problems:
    print("FAIL: the AVX2 caps did not take effect:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print("  caps verified")
EOF

status=0
"$PYTHON" -m pytest tests/export tests/data "$@" || status=$?
echo "== AVX2 path: pytest exit status $status, $((SECONDS - start)) s"
exit $status
