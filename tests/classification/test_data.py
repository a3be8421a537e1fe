"""The embedded classification set, ImageNet-layout folder registration and the mapper
(issue 17 items 1 and 4)."""
import hashlib
import io
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from aqd_d2.config import ConfigError
from aqd_d2.data.classification import (CLASSIFICATION_FAMILIES, ClassificationFamily,
                                        ClassificationMapper, check_classification_datasets,
                                        load_image_folder, register_image_folder)
from aqd_d2.data.scenes import SHAPE_CLASSES
from tests.classification.common import PRETRAIN_DIR, pretrain_cfg

TINY = next(f for f in CLASSIFICATION_FAMILIES if f.name == "aqd_shapes_cls_tiny")


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(dirpath, name), root).encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_embedded_set_is_deterministic_imagenet_layout(tmp_path):
    family = ClassificationFamily("x", 10, 8, size=24)
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        family.write(str(tmp_path / d))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    for split in ("train", "val"):
        classes = sorted(os.listdir(tmp_path / "a" / split))
        assert classes == sorted(SHAPE_CLASSES)
        for c in classes:
            files = os.listdir(tmp_path / "a" / split / c)
            assert files and all(f.endswith(".JPEG") for f in files)
            with Image.open(tmp_path / "a" / split / c / files[0]) as im:
                assert im.size == (24, 24) and im.mode == "RGB"


def test_crop_box_native_and_fit_scale():
    """Hand-computed crop windows (scene 128 px, crop size 64)."""
    native = ClassificationFamily("n", 1, 1, size=64)
    fit = ClassificationFamily("f", 1, 1, size=64, scale="fit")
    assert native.scale == "native"
    # a 10 x 8 object centred at (45, 44): native = the 64-px window around it (no resize),
    # fit = its 1.25 x 10 = 12.5 -> 12-px square (resized 5.3x to 64 px)
    assert native._crop_box((40, 40, 50, 48)) == (13, 12, 77, 76)
    assert fit._crop_box((40, 40, 50, 48)) == (39, 38, 51, 50)
    # near the border: shifted into the scene
    assert native._crop_box((0, 120, 10, 128)) == (0, 64, 64, 128)
    # an object whose 1.25 x box (80 px) exceeds the window: the same square in both rules
    assert native._crop_box((20, 20, 84, 60)) == fit._crop_box((20, 20, 84, 60)) == (12, 0, 92, 80)
    # smaller than min_box: not cropped
    assert native._crop_box((0, 0, 5, 30)) is None
    assert native.fingerprint()["scale"] == "native" and fit.fingerprint()["scale"] == "fit"
    with pytest.raises(ValueError, match="scale = 'huge'"):
        ClassificationFamily("x", 1, 1, scale="huge")


def test_native_crops_keep_the_scene_scale(tmp_path):
    """A native crop is the scene's pixels, unresized, wherever the object fits the window."""
    from aqd_d2.data.synthetic import generate_split

    family = ClassificationFamily("x", 10, 8, size=32)
    family.write(str(tmp_path))
    scene = next(iter(generate_split(10, family.seed, "cls_train", 128, 128, "shapes")))
    pixels = Image.open(io.BytesIO(scene.jpeg)).convert("RGB")
    checked = 0
    for k, ann in enumerate(scene.annotations):
        box = family._crop_box(ann.bbox)
        if box is None or ann.occluded > family.max_occlusion or box[2] - box[0] != 32:
            continue
        name = SHAPE_CLASSES[ann.category_id]
        with Image.open(tmp_path / "train" / name / f"{scene.file_stem}_{k}.JPEG") as im:
            saved = np.asarray(im, dtype=np.float32)
        # exactly the scene's pixels in the window, JPEG-encoded as write() encodes (no resize)
        buf = io.BytesIO()
        pixels.crop(box).save(buf, format="JPEG", quality=95)
        with Image.open(buf) as ref:
            assert np.array_equal(saved, np.asarray(ref, dtype=np.float32))
        checked += 1
    assert checked


def test_registered_embedded_set_loads_with_imagefolder_labels():
    dicts = DatasetCatalog.get("aqd_shapes_cls_tiny_train")
    meta = MetadataCatalog.get("aqd_shapes_cls_tiny_train")
    assert meta.evaluator_type == "classification"
    assert list(meta.thing_classes) == sorted(SHAPE_CLASSES) == list(TINY.class_names)
    assert len(dicts) >= 30
    labels = {d["label"] for d in dicts}
    assert labels == set(range(6))
    for d in dicts[:20]:  # the label is the index of the image's class folder
        folder = os.path.basename(os.path.dirname(d["file_name"]))
        assert meta.thing_classes[d["label"]] == folder
    assert os.path.isdir(meta.image_root)


def _folder(root, classes, per_class=2, size=20):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size + 4, 3), 40 * i, np.uint8)).save(root / c / f"{i}.JPEG")
    return root


def test_image_folder_registration_and_errors(tmp_path):
    train = _folder(tmp_path / "train", ["cat", "dog", "eel"])
    val = _folder(tmp_path / "val", ["cat", "dog", "fox"])
    register_image_folder("t17_train", str(train))
    register_image_folder("t17_train", str(train))  # same folder again: no-op
    register_image_folder("t17_val_other", str(val))
    assert [d["label"] for d in DatasetCatalog.get("t17_train")] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="already registered"):
        register_image_folder("t17_train", str(val))
    with pytest.raises(FileNotFoundError, match="t17_missing.*not found"):
        register_image_folder("t17_missing", str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="t17_empty"):
        register_image_folder("t17_empty", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="gone.*not found"):
        load_image_folder(str(tmp_path / "gone"), "gone")

    base = PRETRAIN_DIR / "R18-shapes-cpu.yaml"
    cfg = pretrain_cfg(base, ["DATASETS.TRAIN", "('t17_train',)", "DATASETS.TEST",
                              "('t17_val_other',)", "MODEL.CLS.NUM_CLASSES", "3"])
    with pytest.raises(ConfigError, match="t17_val_other.*other classes.*eel.*fox"):
        check_classification_datasets(cfg)
    cfg = pretrain_cfg(base, ["DATASETS.TRAIN", "('t17_train',)", "DATASETS.TEST", "()"])
    with pytest.raises(ConfigError, match="NUM_CLASSES = 6 but dataset 't17_train' has 3"):
        check_classification_datasets(cfg)
    cfg.MODEL.CLS.NUM_CLASSES = 3
    assert check_classification_datasets(cfg) == ["cat", "dog", "eel"]
    cfg.DATASETS.TEST = ("aqd_shapes_voc_tiny_val",)
    with pytest.raises(ConfigError, match="detection dataset"):
        check_classification_datasets(cfg)
    cfg.DATASETS.TEST = ("t17_never_registered",)
    with pytest.raises(ConfigError, match="t17_never_registered.*--image-folder"):
        check_classification_datasets(cfg)


def test_mapper_sizes_channel_order_and_bad_images(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(np.tile(np.array([250, 10, 20], np.uint8), (30, 50, 1))).save(path)
    d = {"file_name": str(path), "label": 1}
    common = dict(train_size=16, min_scale=0.5, test_resize=20, test_size=16)
    bgr = ClassificationMapper(True, image_format="BGR", **common)(d)
    assert bgr["image"].shape == (3, 16, 16) and bgr["label"] == 1
    assert bgr["image"][2].float().mean() > 200 and bgr["image"][0].float().mean() < 40
    rgb = ClassificationMapper(False, image_format="RGB", **common)(d)
    assert rgb["image"].shape == (3, 16, 16) and rgb["image"][0].float().mean() > 200
    crop = ClassificationMapper(True, augmentation="ResizeRandomCrop", **common)(d)
    assert crop["image"].shape == (3, 16, 16)
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image.*bad.JPEG"):
        ClassificationMapper(True, **common)({"file_name": str(bad), "label": 0})
    assert ClassificationMapper(True, bad_input="skip", **common)({"file_name": str(bad)}) is None


@pytest.mark.parametrize("opts, message", [
    (["MODEL.CLS.NUM_CLASSES", "1"], "NUM_CLASSES"),
    (["MODEL.CLS.STATE_DICT_RENAMES", "['backbone.']"], "from_prefix=>to_prefix"),
    (["MODEL.CLS.KD_WEIGHT", "0.5"], "TEACHER_WEIGHTS"),
    (["AQD.PRETRAIN.TEST_SIZE", "300"], "TEST_SIZE = 300 is larger"),
    (["AQD.PRETRAIN.TRAIN_AUGMENTATION", "Crop"], "TRAIN_AUGMENTATION"),
    (["AQD.PRETRAIN.IMAGE_FOLDERS", "[['only_name']]"], "NAME, DIRECTORY"),
    (["AQD.PRETRAIN.TOPK", "[0]"], "TOPK"),
])
def test_bad_config_values_are_named(opts, message):
    with pytest.raises(ConfigError, match=message):
        pretrain_cfg(PRETRAIN_DIR / "R18-shapes-cpu.yaml", opts)
