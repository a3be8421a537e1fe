"""Bad input data through the real loaders, a training step and inference (AQD.BAD_INPUT).

Small COCO-json datasets are written with odd but valid images (no annotations, zero-area
and out-of-image boxes, grayscale, RGBA, 8x8, 6000x4000) and with unusable entries (corrupt,
truncated and missing files, a size differing from the json, an inverted box). The valid
ones must train and infer correctly; each unusable one must be rejected with an error naming
its file ("raise") or skipped and counted ("skip").
"""
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu.yaml")


def _jpeg(size, mode="RGB", seed=0) -> bytes:
    w, h = size
    rng = np.random.default_rng(seed)
    chans = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (h, w, chans), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode == "RGBA" else "JPEG", quality=90)
    return buf.getvalue()


def _write_dataset(root: Path, entries) -> str:
    """Write images + a COCO json; ``entries``: (file name, bytes or None, w, h, [xywh boxes]).
    Returns the registered dataset name."""
    from aqd_d2.data import register_coco_dataset

    images, anns = [], []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, (fname, data, w, h, boxes) in enumerate(entries, start=1):
        if data is not None:
            (root / "img" / fname).write_bytes(data)
        images.append({"id": i, "file_name": fname, "width": w, "height": h})
        for box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + len(anns) % 2,
                         "bbox": list(box), "area": float(abs(box[2] * box[3])), "iscrowd": 0})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": cats}))
    name = f"aqd_bad_input_{uuid.uuid4().hex[:8]}"
    return register_coco_dataset(name, str(root / "ann.json"), str(root / "img"))


GOOD = [  # odd but usable
    ("plain.jpg", _jpeg((64, 64)), 64, 64, [(8, 8, 30, 20)]),
    ("no_annotations.jpg", _jpeg((64, 64), seed=1), 64, 64, []),
    ("zero_area_and_outside.jpg", _jpeg((64, 64), seed=2), 64, 64,
     [(10, 10, 0, 12), (10, 10, 12, 0), (50, 40, 30, 40), (70, 70, 10, 10), (20, 20, 10, 10)]),
    ("gray.jpg", _jpeg((64, 48), "L"), 64, 48, [(4, 4, 20, 20)]),
    ("rgba.png", _jpeg((48, 64), "RGBA"), 48, 64, [(4, 4, 20, 20)]),
    ("tiny_8x8.jpg", _jpeg((8, 8)), 8, 8, [(1, 1, 5, 5)]),
    ("huge_6000x4000.jpg", _jpeg((6000, 4000)), 6000, 4000, [(1000, 1000, 2000, 1500)]),
]


def _bad_entries():
    good = _jpeg((64, 64), seed=5)
    return {
        "corrupt.jpg": ("corrupt.jpg", b"this is not an image" * 10, 64, 64, [(8, 8, 20, 20)]),
        "truncated.jpg": ("truncated.jpg", good[: len(good) // 3], 64, 64, [(8, 8, 20, 20)]),
        "missing.jpg": ("missing.jpg", None, 64, 64, [(8, 8, 20, 20)]),
        "wrong_size.jpg": ("wrong_size.jpg", _jpeg((32, 32)), 64, 64, [(8, 8, 20, 20)]),
        "inverted_box.jpg": ("inverted_box.jpg", good, 64, 64, [(40, 40, -20, 10)]),
    }


def _cfg(train_name, test_name, out, policy="raise", batch=len(GOOD)):
    from detectron2.config import get_cfg

    import aqd_d2

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{train_name}',)", "DATASETS.TEST", f"('{test_name}',)",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", str(batch),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST",
        "64", "INPUT.MAX_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.RETINANET.NUM_CLASSES", "2", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "AQD.BAD_INPUT.POLICY", policy,
        "OUTPUT_DIR", str(out), "SEED", "0",
    ])
    return cfg


@pytest.fixture(scope="module")
def model_and_good(tmp_path_factory):
    from detectron2.modeling import build_model

    root = tmp_path_factory.mktemp("good")
    name = _write_dataset(root, GOOD)
    cfg = _cfg(name, name, root / "out")
    torch.manual_seed(0)
    return build_model(cfg), name, root


def test_odd_images_map_train_and_infer(model_and_good):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils.events import EventStorage

    from aqd_d2.data.mappers import build_aqd_train_loader
    from aqd_d2.engine import Trainer
    from aqd_d2.engine.train_loop import AQDTrainLoop

    model, name, root = model_and_good
    cfg = _cfg(name, name, root / "out")
    loader = build_aqd_train_loader(cfg)
    batch = next(iter(loader))  # one epoch of the shuffled stream: every image once
    by_file = {Path(d["file_name"]).name: d for d in batch}
    assert sorted(by_file) == sorted(e[0] for e in GOOD)
    for d in batch:
        assert d["image"].shape[0] == 3 and d["image"].dtype == torch.uint8
        assert min(d["image"].shape[1:]) == 64  # 8x8 up, 6000x4000 down to 64 x 96
    assert tuple(by_file["huge_6000x4000.jpg"]["image"].shape) == (3, 64, 96)
    assert len(by_file["no_annotations.jpg"]["instances"]) == 0
    # zero-area boxes dropped, the partly outside box clipped to the 64x64 image (no flip
    # in either case of the random flip changes which survive), the fully outside one dropped
    kept = by_file["zero_area_and_outside.jpg"]["instances"].gt_boxes
    assert len(kept) == 2 and bool(((kept.tensor >= 0) & (kept.tensor <= 64)).all())
    assert sorted(kept.area().tolist()) == [100.0, 14.0 * 24.0]
    # a real training step (AQDTrainLoop) on that batch: finite losses, weights move
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    step = AQDTrainLoop(cfg, model, iter([batch]), opt)
    with EventStorage(0) as storage:
        step.run_step()
        assert np.isfinite(storage.latest()["total_loss"][0])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # the test loader + inference + COCO evaluation over all of them
    model.eval()
    test_loader = Trainer.build_test_loader(cfg, name)
    evaluator = Trainer.build_evaluator(cfg, name, str(root / "eval"))
    res = inference_on_dataset(model, test_loader, evaluator)
    assert "bbox" in res and len(DatasetCatalog.get(name)) == len(GOOD)


@pytest.mark.parametrize("bad", sorted(_bad_entries()))
def test_unusable_entry_is_named_or_skipped(bad, model_and_good, tmp_path, caplog):
    from detectron2.evaluation import inference_on_dataset

    from aqd_d2.data.checked_mapper import BadInputError
    from aqd_d2.data.mappers import build_aqd_train_loader
    from aqd_d2.engine import Trainer

    model = model_and_good[0]
    entries = [GOOD[0], _bad_entries()[bad]]
    name = _write_dataset(tmp_path, entries)
    # "raise": the train loader and the test loader both fail naming the file
    cfg = _cfg(name, name, tmp_path / "out", policy="raise", batch=2)
    with pytest.raises(BadInputError, match=bad):
        next(iter(build_aqd_train_loader(cfg)))  # batch 2 = one epoch: holds the bad entry
    with pytest.raises(BadInputError, match=bad):
        list(Trainer.build_test_loader(cfg, name))
    # "skip": training batches are full (the bad entry replaced by a good one), inference
    # runs on the good image only, and the skip is logged with the file name
    cfg = _cfg(name, name, tmp_path / "out", policy="skip", batch=2)
    it = iter(build_aqd_train_loader(cfg))
    for _ in range(3):
        batch = next(it)
        assert len(batch) == 2 and all(Path(d["file_name"]).name == GOOD[0][0] for d in batch)
    test_batches = list(Trainer.build_test_loader(cfg, name))
    assert [Path(b[0]["file_name"]).name for b in test_batches] == [GOOD[0][0]]
    assert any(bad in r.getMessage() for r in caplog.records)
    model.eval()
    res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name),
                               Trainer.build_evaluator(cfg, name, str(tmp_path / "eval")))
    assert "bbox" in res


def test_skip_limit(tmp_path):
    from aqd_d2.data.checked_mapper import BadInputError, CheckedMapper

    def failing(d):
        raise OSError("image file is truncated")

    m = CheckedMapper(failing, is_train=True, policy="skip", max_skips=2)
    assert m({"file_name": "a.jpg"}) is None and m({"file_name": "b.jpg"}) is None
    with pytest.raises(BadInputError, match=r"c.jpg.*3 images skipped.*MAX_SKIPS = 2"):
        m({"file_name": "c.jpg"})
    # not a data error: re-raised as is, with the file name added
    def buggy(d):
        raise KeyError("instances")

    with pytest.raises(KeyError, match="while mapping d.jpg"):
        CheckedMapper(buggy, is_train=True, policy="skip")({"file_name": "d.jpg"})
