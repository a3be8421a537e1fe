"""tools/pretrain_evidence.py end to end with tiny settings (issue 17 item 5): both pretraining
stages, then per seed one detector from the binary backbone and one from scratch, the table
with mean [min, max] over the seeds; finished runs are reused."""
import os
import subprocess
import sys

import torch

from tests.conftest import REPO

TOOL = REPO / "tools" / "pretrain_evidence.py"


def _pretrain_opts():
    opts = [("DATASETS.TRAIN", "('aqd_shapes_cls_tiny_train',)"), ("DATASETS.TEST", "('aqd_shapes_cls_tiny_val',)"),
            ("SOLVER.IMS_PER_BATCH", "4"), ("SOLVER.WARMUP_ITERS", "0"), ("SOLVER.STEPS", "()"),
            ("AQD.PRETRAIN.TRAIN_SIZE", "32"), ("AQD.PRETRAIN.TEST_RESIZE", "32"),
            ("AQD.PRETRAIN.TEST_SIZE", "32"), ("AQD.PRETRAIN.TEST_IMS_PER_BATCH", "8"),
            ("DATALOADER.NUM_WORKERS", "0")]
    return [x for k, v in opts for x in ("--pretrain-opt", k, v)]


def test_evidence_pipeline_tiny(tmp_path):
    out = tmp_path / "ev"
    det = ["DATASETS.TRAIN", "('aqd_shapes_voc_tiny_train',)", "DATASETS.TEST", "('aqd_shapes_voc_tiny_val',)",
           "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
           "INPUT.MIN_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"]
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--only", "faster_rcnn_c4", "--pretrain-iters", "6",
           "--det-iters", "8", "--seeds", "0", "1", "--jobs", "2", *_pretrain_opts(), "--", *det]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    c4 = out / "faster_rcnn_c4"
    runs = ["pretrain_fp", "pretrain_binary"] + [f"det_{k}_seed{s}" for s in (0, 1) for k in ("pretrained", "scratch")]
    for run in runs:
        assert (c4 / run / "model_final.pth").is_file(), run
    # the binary stage starts from the float stage; the pretrained detectors from the binary stage
    assert "pretrain_fp/model_final.pth" in (c4 / "pretrain_binary" / "log.txt").read_text()
    for s in (0, 1):
        pre_log = (c4 / f"det_pretrained_seed{s}" / "log.txt").read_text()
        assert "pretrain_binary/model_final.pth" in pre_log and f"'SEED', '{s}'" in pre_log
        assert "pretrain_binary" not in (c4 / f"det_scratch_seed{s}" / "log.txt").read_text()
    # the pretrained detector really starts from the pretrained backbone
    pre = torch.load(c4 / "pretrain_binary" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    key = next(k for k in pre if k.startswith("backbone.res2.") and k.endswith("conv1.weight"))
    assert key in torch.load(c4 / "det_pretrained_seed0" / "model_final.pth", map_location="cpu",
                             weights_only=False)["model"]
    table = [line for line in res.stdout.splitlines() if line.startswith("| `configs/FasterRCNN/R18-C4")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[1] == "8" and cells[6] in ("0 of 2", "1 of 2", "2 of 2")
    for c in cells[4:6]:  # mean [min, max] of two seeds
        mean, lo_hi = c.split(" [")
        lo, hi = (float(x) for x in lo_hi.rstrip("]").split(", "))
        assert lo <= float(mean) <= hi
    assert "seeds [0, 1]" in res.stdout

    # a second call reuses every finished run
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.count("done already") == len(runs)
    assert [line for line in res.stdout.splitlines() if line.startswith("| `configs/")] == table
