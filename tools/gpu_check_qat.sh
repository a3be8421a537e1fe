#!/usr/bin/env bash
# Issue 15 GPU check, one run on a GPU machine without network (see ../shared/device-kit/README.md).
# Needs .whl/ (bash ../shared/device-kit/prep-wheels.sh, plus pytest's wheels) in the project root.
# If .whl/snapshot.tar exists (e.g. `git archive HEAD aqd_d2 configs tools tests setup.py >
# .whl/snapshot.tar`), the check runs on that snapshot instead of the working tree (a tree
# with other people's half-done edits still measures the committed code).
# Writes everything under $OUT (default ./gpu_out) as it goes, each part under its own limit:
#   b  bench_qat.json / bench_qat.log   tools/bench_qat.py --device cuda (float vs quantized;
#                                        EAGER=1 adds the eager-kernel row; BUDGET seconds)
#   h  bench_host.log                   tools/bench_quant_host.py --device cuda (per-layer cost)
#   t  tests_gpu.log                    weight cache on CUDA, no host sync, deterministic sums
#   e  equal_subset.json                fused == eager on a subset of the equality cases
#   a  bench_amp.log                    bf16 autocast + channels_last, one model
#   r  equal_rest.json                  the remaining equality cases
# Usage (from the project root):  OUT=/some/dir [PARTS=bhtear] bash tools/gpu_check_qat.sh
set -u
PARTS=${PARTS:-bhtear}
BUDGET=${BUDGET:-200}
ROOT=$PWD
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$ROOT"/.whl/*.whl || exit 1
if [[ -f "$ROOT/.whl/snapshot.tar" ]]; then
  mkdir -p /tmp/snap && tar -xf "$ROOT/.whl/snapshot.tar" -C /tmp/snap && cd /tmp/snap || exit 1
  echo "running on .whl/snapshot.tar" | tee "$OUT/snapshot.txt"
fi
export PYTHONPATH=/tmp/site:$PWD DETECTRON2_DATASETS=/tmp/d2ds PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton_cache
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"; \
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $PARTS == *b* ]]; then
echo "== bench_qat (quantized vs float${EAGER:+, eager too})"
timeout $((BUDGET + 70)) python3 tools/bench_qat.py --device cuda ${EAGER:+--eager-too} --budget-s "$BUDGET" \
  --out "$OUT/bench_qat.json" 2>&1 | grep -v Warning | tee "$OUT/bench_qat.log" | tail -12
fi

if [[ $PARTS == *h* ]]; then
echo "== per-layer host cost on CUDA (tiny tensors)"
timeout 60 python3 tools/bench_quant_host.py --device cuda --calls 200 --repeats 5 2>&1 \
  | grep -v Warning | tee "$OUT/bench_host.log"
fi

if [[ $PARTS == *t* ]]; then
echo "== GPU tests"
timeout 120 python3 -m pytest -q -rf -p no:cacheprovider -k "cuda" tests/layers/test_weight_cache.py \
  tests/layers/test_no_host_sync.py \
  "tests/quantization/test_triton_equal.py::test_fused_reductions_are_deterministic_cuda" 2>&1 \
  | tail -15 | tee "$OUT/tests_gpu.log"
fi

SUBSET="liq4-w-wn liq2-w-wn-norescale liq3-w-nowd liq4-a liq2-a lsq4-w lsq4-a dorefa3-w dorefa4-a twn2-w \
bnn1-w bnn1-a xnor1-w bireal1-w bireal1-a bwn1-w conv-liq conv-bireal conv-liq-bf16 conv-liq-channels_last xnor-w-long-rows"

if [[ $PARTS == *e* ]]; then
echo "== fused == eager (subset)"
timeout 120 python3 -c "
import json, sys
from tests.quantization.triton_equal_cases import run_cases
r = run_cases('cuda', 'auto', sys.argv[1:])
json.dump(r, open('$OUT/equal_subset.json', 'w'), indent=1)
bad = {k: v for k, v in r.items() if v}
print(len(r), 'cases,', len(bad), 'failed'); [print(k, v[:800]) for k, v in bad.items()]
" $SUBSET 2>&1 | tail -30 | tee -a "$OUT/tests_gpu.log"
fi

if [[ $PARTS == *a* ]]; then
echo "== bf16 autocast, channels_last (one model)"
timeout 60 python3 tools/bench_qat.py --device cuda --amp bf16 --channels-last --models retinanet_r18_4bit \
  --warmup 2 --steps 5 --infer-iters 5 --out "$OUT/bench_amp.json" 2>&1 | grep -v Warning | tail -8 | tee "$OUT/bench_amp.log"
fi

if [[ $PARTS == *r* ]]; then
echo "== remaining fused == eager cases"
timeout 100 python3 -c "
import json, sys
from tests.quantization.triton_equal_cases import run_cases, case_names
rest = [c for c in case_names() if c not in sys.argv[1:]]
out = {}
import time; t0 = time.time()
for c in rest:
    if time.time() - t0 > 85: break
    out.update(run_cases('cuda', 'auto', [c]))
    json.dump(out, open('$OUT/equal_rest.json', 'w'), indent=1)
bad = {k: v for k, v in out.items() if v}
print(len(out), 'of', len(rest), 'cases run,', len(bad), 'failed'); [print(k, v[:800]) for k, v in bad.items()]
" $SUBSET 2>&1 | tail -30 | tee "$OUT/equal_rest.log"
fi
echo "== done"
