#!/usr/bin/env bash
# Issue 16 GPU study, one run on one GPU machine without network (../shared/device-kit/README.md):
# float init, then Xnor-Net / BiDet / AutoBiDet for the Faster R-CNN ResNet-18 C4 and the SSD300
# VGG16 CPU twins (configs *shapes-voc-cpu*, here on the GPU: MODEL.DEVICE cuda) over seeds
# 0 1 2, plus paper 000 Figure 7's beta x gamma sweep (SSD300 BiDet) at half the iterations.
# Needs .whl/ in the project root (bash ../shared/device-kit/prep-wheels.sh after tools/run.py setup).
#   1. calibration: every config for CALIB_ITERS iterations, JOBS at a time (as the study runs),
#      into calibration.json: seconds per iteration, AutoBiDet with and without its GAN rounds;
#   2. the study, sized to the time left (--budget-s: float 2n, binary n, sweep n/2
#      iterations), AutoBiDet's GAN round every k iterations with the smallest k that keeps an
#      AutoBiDet iteration at most 1.5x an Xnor-Net one (--gan-every auto; GAN_EVERY=1 for the
#      paper's alternation).
# Everything is written under $OUT as it goes (a run cut short keeps its finished runs):
# env.txt, calibration.log, study.log, study/{calibration.json, study.json, study.md},
# study/<detector>/<run>/seed<k>/result.json.
# Usage (from the project root):  OUT=/some/dir [BUDGET_S=540] [JOBS=6] bash tools/gpu_bidet_study.sh
set -u
T0=$SECONDS
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}     # seconds for parts 1 + 2 (the machine's 10 minutes less setup)
JOBS=${JOBS:-6}
CALIB_ITERS=${CALIB_ITERS:-30}
GAN_EVERY=${GAN_EVERY:-auto}
SEEDS=${SEEDS:-0 1 2}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD DETECTRON2_DATASETS=/tmp/d2ds PYTHONUNBUFFERED=1 || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; \
  python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== part 1: calibration ($CALIB_ITERS iterations of every config, $JOBS at a time)"
timeout 200 python3 tools/bidet_study.py --out "$OUT/study" --calibrate --calib-iters "$CALIB_ITERS" \
  --jobs "$JOBS" MODEL.DEVICE cuda > "$OUT/calibration.log" 2>&1
tail -20 "$OUT/calibration.log"

LEFT=$((BUDGET_S - (SECONDS - T0)))
echo "== part 2: the study in the $LEFT s left"
# shellcheck disable=SC2086
timeout $((LEFT + 30)) python3 tools/bidet_study.py --out "$OUT/study" --seeds $SEEDS --sweep \
  --budget-s "$((LEFT - 15))" --gan-every "$GAN_EVERY" --jobs "$JOBS" MODEL.DEVICE cuda \
  > "$OUT/study.log" 2>&1
grep -v -i warn "$OUT/study.log" | tail -30
echo "== done in $((SECONDS - T0)) s"
