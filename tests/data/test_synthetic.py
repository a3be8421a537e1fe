"""Tests of the synthetic datasets: generator, COCO / VOC writers, registration, evaluation."""
import io
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import aqd_d2  # noqa: F401  (compat shims + registrations)
from aqd_d2.data import register
from aqd_d2.data.formats import write_coco_json, write_dataset, write_voc
from aqd_d2.data.synthetic import KITTI_CLASSES, SHAPE_CLASSES, generate_split, main, parse_size
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_voc_instances
from detectron2.structures import BoxMode, Boxes, Instances


def _tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _xyxy(ann):
    return BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)


# ------------------------------------------------------------------------- generator
def test_same_seed_same_images_and_annotations():
    a = generate_split(6, seed=3, split="train", height=64, width=96)
    b = generate_split(6, seed=3, split="train", height=64, width=96)
    assert a == b  # jpeg bytes and annotations
    c = generate_split(6, seed=4, split="train", height=64, width=96)
    d = generate_split(6, seed=3, split="val", height=64, width=96)
    assert all(x.jpeg != y.jpeg for x, y in zip(a, c))
    assert all(x.jpeg != y.jpeg for x, y in zip(a, d))


def test_written_files_are_byte_identical(tmp_path):
    for fmt in ("coco", "voc"):
        write_dataset(str(tmp_path / f"a_{fmt}"), fmt=fmt, num_train=4, num_val=3, num_test=2,
                      height=64, width=64, seed=1)
        write_dataset(str(tmp_path / f"b_{fmt}"), fmt=fmt, num_train=4, num_val=3, num_test=2,
                      height=64, width=64, seed=1)
        a, b = _tree_bytes(tmp_path / f"a_{fmt}"), _tree_bytes(tmp_path / f"b_{fmt}")
        assert a == b and len(a) > 9


def test_annotations_are_sane_and_varied():
    h, w = 128, 128
    images = generate_split(80, seed=0, split="stats", height=h, width=w)
    sizes, classes = [], set()
    for im in images:
        pixels = np.asarray(Image.open(io.BytesIO(im.jpeg)))
        assert pixels.shape == (h, w, 3) and (im.height, im.width) == (h, w)
        for a in im.annotations:
            x0, y0, x1, y1 = a.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert x1 - x0 >= 2 and y1 - y0 >= 2
            assert 0 <= a.category_id < len(SHAPE_CLASSES)
            assert 0.0 <= a.occluded <= 0.7
            sizes.append(max(x1 - x0, y1 - y0))
            classes.add(a.category_id)
    assert sum(not im.annotations for im in images) >= 3  # images without objects
    assert min(sizes) < 10 and sum(s < 16 for s in sizes) >= 20  # small objects
    assert max(sizes) >= 56  # up to about half the image
    assert any(a.occluded > 0.1 for im in images for a in im.annotations)
    assert any(a.truncated for im in images for a in im.annotations)
    assert classes == set(range(len(SHAPE_CLASSES)))


def test_non_square_images():
    for im in generate_split(4, seed=0, split="train", height=48, width=160):
        assert Image.open(io.BytesIO(im.jpeg)).size == (160, 48)
        assert all(a.bbox[2] <= 160 and a.bbox[3] <= 48 for a in im.annotations)


def test_kitti_variant(tmp_path):
    images = generate_split(40, seed=0, split="train", height=128, width=384, kind="kitti")
    aspect = {c: [] for c in range(3)}
    for im in images:
        for a in im.annotations:
            aspect[a.category_id].append((a.bbox[3] - a.bbox[1]) / (a.bbox[2] - a.bbox[0]))
    assert all(aspect.values())
    assert np.median(aspect[1]) > 1.8  # pedestrians: tall and thin
    assert np.median(aspect[0]) < 0.8  # cars: wide
    paths = write_dataset(str(tmp_path / "kitti"), kind="kitti", num_train=6, num_val=2,
                          height=64, width=192)
    dicts = load_coco_json(paths["train"], str(tmp_path / "kitti" / "train"))
    assert len(dicts) == 6
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {1, 2, 3}


# ----------------------------------------------------------------------- file formats
def test_coco_and_voc_load_through_detectron2_with_same_boxes(tmp_path):
    kw = dict(num_train=10, num_val=4, num_test=0, height=96, width=128, seed=5)
    coco = write_dataset(str(tmp_path / "coco"), fmt="coco", **kw)
    voc = write_dataset(str(tmp_path / "voc"), fmt="voc", **kw)
    for split, n in (("train", 10), ("val", 4)):
        from_coco = load_coco_json(coco[split], str(tmp_path / "coco" / split))
        from_voc = load_voc_instances(voc[split], split, SHAPE_CLASSES)
        assert len(from_coco) == len(from_voc) == n
        by_name = {os.path.basename(d["file_name"]): d for d in from_voc}
        for c in from_coco:
            v = by_name[os.path.basename(c["file_name"])]
            assert (c["height"], c["width"]) == (v["height"], v["width"]) == (96, 128)
            assert os.path.exists(c["file_name"]) and os.path.exists(v["file_name"])
            assert [a["category_id"] - 1 for a in c["annotations"]] == \
                [a["category_id"] for a in v["annotations"]]
            assert [_xyxy(a) for a in c["annotations"]] == [_xyxy(a) for a in v["annotations"]]
    assert load_voc_instances(voc["test"], "test", SHAPE_CLASSES) == []


def test_voc_writer_rejects_one_image_split(tmp_path):
    with pytest.raises(ValueError, match="one image"):
        write_voc({"train": generate_split(1, height=32, width=32)}, SHAPE_CLASSES, str(tmp_path))


# ----------------------------------------------------------------------- registration
def test_registration_resolves_root_at_load_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    train = DatasetCatalog.get("aqd_shapes_tiny_train")
    val = DatasetCatalog.get("aqd_shapes_tiny_val")
    assert (len(train), len(val)) == (16, 8)
    assert all(d["file_name"].startswith(str(tmp_path)) for d in train + val)
    assert any(not d["annotations"] for d in train + val)
    meta = MetadataCatalog.get("aqd_shapes_tiny_train")
    assert meta.evaluator_type == "coco" and meta.thing_classes == list(SHAPE_CLASSES)
    assert meta.json_file == str(tmp_path / "aqd_shapes_tiny" / "annotations" / "instances_train.json")
    assert meta.image_root.startswith(str(tmp_path))
    marker = tmp_path / "aqd_shapes_tiny" / "aqd_synthetic.json"
    stamp = marker.stat().st_mtime_ns
    assert len(DatasetCatalog.get("aqd_shapes_tiny_train")) == 16  # loads, does not regenerate
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no leftover temp dirs
    voc = MetadataCatalog.get("aqd_shapes_voc_tiny_val")
    assert (voc.evaluator_type, voc.split, voc.year) == ("pascal_voc", "val", 2007)
    assert MetadataCatalog.get("aqd_kitti_tiny_train").thing_classes == list(KITTI_CLASSES)


def test_foreign_directory_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    (tmp_path / "aqd_kitti_tiny").mkdir()
    (tmp_path / "aqd_kitti_tiny" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(tmp_path / "aqd_kitti_tiny")):
        DatasetCatalog.get("aqd_kitti_tiny_val")
    assert (tmp_path / "aqd_kitti_tiny" / "mine.txt").read_text() == "user data"


def test_stale_dataset_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    fresh = DatasetCatalog.get("aqd_shapes_voc_tiny_train")
    marker = tmp_path / "aqd_shapes_voc_tiny" / "aqd_synthetic.json"
    marker.write_text(marker.read_text().replace('"seed": 0', '"seed": 99'))
    (tmp_path / "aqd_shapes_voc_tiny" / "stale.txt").write_text("old")
    assert DatasetCatalog.get("aqd_shapes_voc_tiny_train") == fresh
    assert not (tmp_path / "aqd_shapes_voc_tiny" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".aqd_shapes_voc_tiny.lock", "aqd_shapes_voc_tiny"]


def _perfect_outputs(d):
    boxes = torch.tensor([_xyxy(a) for a in d["annotations"]], dtype=torch.float32).reshape(-1, 4)
    inst = Instances((d["height"], d["width"]))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.ones(len(boxes))
    inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
    return [{"image_id": d["image_id"]}], [{"instances": inst}]


def test_voc_dataset_evaluates_to_100_on_perfect_predictions(tmp_path, monkeypatch):
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = "aqd_shapes_voc_tiny_val"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 8
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for d in dicts:
        evaluator.process(*_perfect_outputs(d))
    assert evaluator.evaluate()["bbox"]["AP50"] == pytest.approx(100.0)


def test_coco_dataset_evaluates_to_100_on_perfect_predictions(tmp_path, monkeypatch):
    from detectron2.evaluation import COCOEvaluator

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = "aqd_shapes_tiny_val"
    dicts = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        evaluator.process(*_perfect_outputs(d))
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_missing_path_error_names_the_path(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    missing_json = str(tmp_path / "nope" / "instances.json")
    with pytest.raises(FileNotFoundError, match="nope/instances.json"):
        register.register_coco_dataset("aqd_test_missing_json", missing_json, str(images))
    json_file = write_coco_json(generate_split(2, height=32, width=32), SHAPE_CLASSES,
                                str(tmp_path / "ok.json"), str(images))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        register.register_coco_dataset("aqd_test_missing_dir", json_file, str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="voc_missing"):
        register.register_voc_dataset("aqd_test_missing_voc", str(tmp_path / "voc_missing"), "train",
                                      SHAPE_CLASSES)
    assert "aqd_test_missing_json" not in DatasetCatalog.list()
    name = register.register_coco_dataset("aqd_test_user_coco", json_file, str(images))
    try:
        assert len(DatasetCatalog.get(name)) == 2
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_detectron2_builtin_datasets_stay_registered_and_load():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

    for name in ("coco_2017_train", "coco_2017_val", "voc_2007_train", "voc_2007_test", "voc_2012_trainval"):
        assert name in DatasetCatalog.list()
        assert not isinstance(MetadataCatalog.get(name), register.GeneratedDatasetMetadata)
    voc_meta, coco_meta = MetadataCatalog.get("voc_2007_test"), MetadataCatalog.get("coco_2017_val")
    assert voc_meta.evaluator_type == "pascal_voc" and coco_meta.evaluator_type == "coco"
    # detectron2 read DETECTRON2_DATASETS at import; write small real-format files there (only
    # if that root is a temporary directory, as tests/conftest.py arranges) and load them.
    root = os.path.dirname(voc_meta.dirname)
    if not os.path.realpath(root).startswith(os.path.realpath(tempfile.gettempdir())):
        pytest.skip(f"detectron2's dataset root {root} is not a temporary directory")
    if os.path.exists(voc_meta.dirname) or os.path.exists(coco_meta.json_file):
        pytest.skip("builtin dataset files already exist; not overwriting them")
    images = generate_split(3, seed=0, split="builtin", height=48, width=48)
    write_voc({"test": images}, VOC_CLASSES, voc_meta.dirname)
    voc = DatasetCatalog.get("voc_2007_test")
    assert len(voc) == 3 and voc[0]["file_name"].startswith(voc_meta.dirname)
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    write_coco_json(images, [c["name"] for c in things], coco_meta.json_file, coco_meta.image_root,
                    category_ids=[c["id"] for c in things])
    coco = DatasetCatalog.get("coco_2017_val")
    assert [_xyxy(a) for d in coco for a in d["annotations"]] == \
        [_xyxy(a) for d in voc for a in d["annotations"]]


# -------------------------------------------------------------------------------- CLI
def test_cli_writes_all_formats(tmp_path, capsys):
    assert parse_size("96x320") == (96, 320) and parse_size("64") == (64, 64)
    out = main(["--out", str(tmp_path), "--num-train", "4", "--num-val", "2", "--size", "64",
                "--seed", "0", "--format", "all"])
    assert [os.path.basename(p) for p in out] == ["aqd_shapes", "aqd_shapes_voc", "aqd_kitti"]
    assert len(load_coco_json(str(tmp_path / "aqd_shapes" / "annotations" / "instances_val.json"),
                              str(tmp_path / "aqd_shapes" / "val"))) == 2
    sets = tmp_path / "aqd_shapes_voc" / "ImageSets" / "Main"
    assert [len((sets / f"{s}.txt").read_text().split()) for s in ("train", "val", "test", "trainval")] \
        == [4, 2, 2, 6]
    assert len(os.listdir(tmp_path / "aqd_kitti" / "train")) == 4
    assert "wrote" in capsys.readouterr().out
