"""Every detector family trains in 2 CPU processes (gloo, DDP) with identical weights on both
ranks afterwards, and its evaluation is gathered from both ranks: each rank runs inference
on half of the test set and rank 0's result equals a one-process evaluation of the whole
set with the same weights. One spawn runs all families in sequence (narrow widths, 64 px,
two images per rank, 2 iterations)."""
import math
import os
from pathlib import Path

import torch

from tests.conftest import REPO

# (family, config, extra overrides); SSD / BiDet are added when their configs have landed
FAMILIES = [
    # AQD's synchronized BN (NaiveSyncBatchNorm over gloo; per-level BN in the head)
    ("retinanet_aqd_liq_mlbn", "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml",
     ["MODEL.RESNETS.NORM", "naiveSyncBN", "MODEL.FPN.NORM", "naiveSyncBN",
      "MODEL.RETINANET.HEAD_NORM", "SyncMultiLevelBN"]),
    ("fcos_liq", "configs/FCOS/R18-FPN-shapes-cpu-2bit.yaml", []),
    ("faster_rcnn_binary", "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml", []),
    ("centernet_binary", "configs/CenterNet/q-shapes-cpu-binary.yaml", []),
    ("yolov2_bwn", "configs/YOLOv2/DarkNet19-kitti-cpu-FP.yaml",
     ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.SCOPE", "['m0', 'm1', 'm2']"]),
]
OPTIONAL = [
    ("ssd_xnor", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml", []),
    ("bidet_ssd", "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml", []),
]
FAMILIES += [f for f in OPTIONAL if (REPO / f[1]).is_file()]


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _tiny(name: str) -> str:
    """``aqd_shapes_train`` -> ``aqd_shapes_tiny_train`` (8-16 image splits)."""
    prefix, _, split = name.rpartition("_")
    return name if prefix.endswith("_tiny") else f"{prefix}_tiny_{split}"


def _family_cfg(rel: str, extra, out_dir: str):
    from tests.test_configs import load_test_config

    cfg = load_test_config(rel, narrow=True)
    opts = [
        "DATASETS.TRAIN", f"('{_tiny(cfg.DATASETS.TRAIN[0])}',)",
        "DATASETS.TEST", f"('{_tiny(cfg.DATASETS.TEST[0])}',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", out_dir,
    ]
    # every detector's score threshold 0: an untrained model must still output boxes
    for node in cfg.MODEL.values():
        if hasattr(node, "keys") and "SCORE_THRESH_TEST" in node:
            node.SCORE_THRESH_TEST = 0.0
    cfg.merge_from_list(opts + list(extra))
    return cfg


def _train_all(families, out_dir):
    """Runs in each rank: per family, train 2 iterations, then evaluate."""
    from detectron2.utils import comm

    from aqd_d2.engine import Trainer

    rank = comm.get_rank()
    for fam, rel, extra in families:
        cfg = _family_cfg(rel, extra, os.path.join(out_dir, fam))
        train_cfg = cfg.clone()
        train_cfg.DATASETS.TEST = ()  # evaluated below, once
        trainer = Trainer(train_cfg)
        trainer.resume_or_load(resume=False)
        module = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        trainer.train()
        results = Trainer.test(cfg, module)  # each rank infers on its shard; rank 0 gathers
        after = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save({
            "ddp": hasattr(trainer.model, "module"),
            "changed": sum(not torch.equal(before[k], after[k]) for k in after),
            "state": after, "results": results,
            "images_evaluated": len(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])),
        }, os.path.join(out_dir, f"{fam}_rank{rank}.pth"))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = float(v)
    return out


def test_families_train_and_evaluate_in_two_processes(tmp_path):
    from detectron2.data import DatasetCatalog

    from aqd_d2.engine import Trainer, launch_cpu

    for _, rel, extra in FAMILIES:  # generate the datasets before the ranks race for them
        cfg = _family_cfg(rel, extra, str(tmp_path))
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
        DatasetCatalog.get(cfg.DATASETS.TEST[0])
    launch_cpu(_train_all, num_processes=2, args=(FAMILIES, str(tmp_path)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank: same reduction order in inference
    try:
        for fam, rel, extra in FAMILIES:
            r0, r1 = (torch.load(tmp_path / f"{fam}_rank{r}.pth", weights_only=False)
                      for r in (0, 1))
            assert r0["ddp"] and r1["ddp"], fam
            assert r0["state"].keys() == r1["state"].keys()
            # parameters and quantizer state identical; BN running statistics are rank-local
            # (detectron2's DDP does not broadcast buffers) unless BN is synchronized
            for k in r0["state"]:
                local = k.rpartition(".")[2] in BN_STATS and not fam.startswith("retinanet")
                assert local or torch.equal(r0["state"][k], r1["state"][k]), (fam, k)
            assert r0["changed"] > len(r0["state"]) // 4, (fam, r0["changed"])
            # inference was split over the ranks; rank 0 holds the gathered evaluation
            cfg = _family_cfg(rel, extra, str(tmp_path / f"{fam}_single"))
            n = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
            assert r0["images_evaluated"] + r1["images_evaluated"] == n, fam
            assert r0["images_evaluated"] < n
            assert r0["results"] and not r1["results"], fam
            model = Trainer.build_model(cfg)
            model.load_state_dict(r0["state"])
            single = _flat(Trainer.test(cfg, model))
            gathered = _flat(r0["results"])
            assert single.keys() == gathered.keys(), fam
            for k in single:
                a, b = single[k], gathered[k]
                assert (math.isnan(a) and math.isnan(b)) or a == b, (fam, k, a, b)
            assert any(not math.isnan(v) for v in single.values()), (fam, "no detections")
    finally:
        torch.set_num_threads(threads)


def test_tiny_names():
    assert _tiny("aqd_shapes_train") == "aqd_shapes_tiny_train"
    assert _tiny("aqd_shapes_voc_test") == "aqd_shapes_voc_tiny_test"
    assert _tiny("aqd_kitti_tiny_val") == "aqd_kitti_tiny_val"
    assert Path(REPO / FAMILIES[0][1]).is_file()
