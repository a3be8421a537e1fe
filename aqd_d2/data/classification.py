"""Image-classification datasets for backbone pretraining (issue 17): ImageNet-layout folders
read with torchvision's ``ImageFolder``, registered by name in detectron2's catalogs, and the
embedded classification set generated like the detection one.

Registered names (``import aqd_d2`` registers them; nothing is generated until used):

=============================  ==================================  ===========  =====
names                          made from                           crops tr/va  size
=============================  ==================================  ===========  =====
aqd_shapes_cls_{train,val}     400 / 100 generated shapes scenes    ~1000/~250   64 px
aqd_shapes_cls_tiny_{train,val} 24 / 12 scenes (the tests)          ~60/~30      32 px
=============================  ==================================  ===========  =====

The embedded set crops every annotated, at most 30% occluded object of at least 6 pixels out
of scenes of :mod:`aqd_d2.data.synthetic` (kind "shapes", seed 1, split names
``cls_train`` / ``cls_val``: other images than the detection datasets), as a square centred
on its box (shifted into the image): by default (``scale="native"``) a window of the family's
size at the scene's own scale, the object as large as the detectors see it (a square of
1.25 x its longer side where that is larger, resized to the family's size). ``scale="fit"``
(the crops of CROP_VERSION 1) resizes the 1.25 x square to the family's size, so that a
10-pixel object fills a 64-pixel crop, 4-8x larger than the detectors see it (README,
"Pretraining a backbone": the C4 ablations with both rules). Saved as
``<root>/<family>/<split>/<class>/<scene>_<k>.JPEG``: an ImageNet-layout folder,
deterministic (same bytes for the same Pillow) and generated under the same lock / marker as
the detection families (:func:`aqd_d2.data.register.ensure_generated`).

Dataset dicts: ``{"file_name", "label", "image_id"}``; metadata ``thing_classes`` (the class
folder names, sorted as ImageFolder sorts them: the label order), ``image_root`` and
``evaluator_type "classification"``. :class:`ClassificationMapper` reads and augments one
image into detectron2's ``{"image": (C, H, W) uint8 tensor in INPUT.FORMAT, "label"}``.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

__all__ = [
    "CLASSIFICATION_EVALUATOR_TYPE", "ClassificationFamily", "CLASSIFICATION_FAMILIES",
    "load_image_folder", "register_image_folder", "register_classification_families",
    "register_image_folders_from_config", "check_classification_datasets",
    "ClassificationMapper",
]

logger = logging.getLogger(__name__)

#: ``evaluator_type`` of every classification dataset (the pretraining trainer's evaluator)
CLASSIFICATION_EVALUATOR_TYPE = "classification"
#: Bump when the crops for the same family parameters change (invalidates generated folders).
#: 2: the ``scale`` field ("native" crops).
CROP_VERSION = 2
#: the crop rules of :attr:`ClassificationFamily.scale`
CROP_SCALES = ("native", "fit")


@dataclass(frozen=True)
class ClassificationFamily:
    """An embedded classification set: crops of generated shapes scenes (module docstring).

    Attributes:
        name: directory under the datasets root; dataset names are ``<name>_<split>``.
        num_train, num_val: scenes cropped per split.
        size: side of the square crops in pixels.
        scene_size: side of the generated scenes.
        seed: generator seed of the scenes.
        min_box: objects whose box is smaller on either side are not cropped.
        max_occlusion: objects hidden more than this fraction are not cropped.
        scale: ``"native"``: a ``size``-pixel window centred on the object at the scene's
            own scale, i.e. the scale the detectors of the embedded detection sets see
            (an object whose 1.25 x box does not fit is shrunk to fit); ``"fit"``: the
            1.25 x box resized to ``size`` (small objects upsampled, up to 8x).
    """

    name: str
    num_train: int
    num_val: int
    size: int = 64
    scene_size: int = 128
    seed: int = 1
    min_box: int = 6
    max_occlusion: float = 0.3
    scale: str = "native"

    def __post_init__(self):
        if self.scale not in CROP_SCALES:
            raise ValueError(f"ClassificationFamily {self.name!r}: scale = {self.scale!r}, "
                             f"expected one of {CROP_SCALES}")

    @property
    def splits(self) -> Dict[str, int]:
        """split -> number of scenes."""
        return {"train": self.num_train, "val": self.num_val}

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The class folder names in label order (sorted, as ImageFolder orders them)."""
        from .scenes import SHAPE_CLASSES

        return tuple(sorted(SHAPE_CLASSES))

    def directory(self) -> str:
        """The family's directory under the datasets root, resolved at this call."""
        from .register import datasets_root

        return os.path.join(datasets_root(), self.name)

    def fingerprint(self) -> dict:
        """What the marker file of a complete folder holds."""
        from .synthetic import GENERATOR_VERSION

        return {"classification": True, "crop_version": CROP_VERSION,
                "generator_version": GENERATOR_VERSION, "num_train": self.num_train,
                "num_val": self.num_val, "size": self.size, "scene_size": self.scene_size,
                "seed": self.seed, "min_box": self.min_box, "max_occlusion": self.max_occlusion,
                "scale": self.scale}

    def write(self, directory: str) -> None:
        """Generate the crops into ``directory`` (marker file last).

        Raises:
            RuntimeError: a split holds no crop of some class (too few scenes).
        """
        from PIL import Image

        from .formats import MARKER_FILE
        from .synthetic import generate_split

        from .scenes import SHAPE_CLASSES

        classes = list(self.class_names)
        for split, num in self.splits.items():
            counts = dict.fromkeys(classes, 0)
            for c in classes:
                os.makedirs(os.path.join(directory, split, c), exist_ok=True)
            for scene in generate_split(num, self.seed, f"cls_{split}", self.scene_size,
                                        self.scene_size, "shapes"):
                pixels = Image.open(io.BytesIO(scene.jpeg)).convert("RGB")
                for k, ann in enumerate(scene.annotations):
                    box = self._crop_box(ann.bbox)
                    if box is None or ann.occluded > self.max_occlusion:
                        continue
                    name = SHAPE_CLASSES[ann.category_id]
                    crop = pixels.crop(box).resize((self.size, self.size), Image.Resampling.BILINEAR)
                    crop.save(os.path.join(directory, split, name, f"{scene.file_stem}_{k}.JPEG"),
                              format="JPEG", quality=95)
                    counts[name] += 1
            empty = [c for c, n in counts.items() if n == 0]
            if empty:
                raise RuntimeError(f"{self.name}: split {split!r} has no crop of {empty} from "
                                   f"{num} scenes; use more scenes")
        with open(os.path.join(directory, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(self.fingerprint(), f, indent=1, sort_keys=True)

    def _crop_box(self, bbox: Sequence[int]) -> Optional[Tuple[int, int, int, int]]:
        """The square crop around ``bbox`` (x0, y0, x1, y1), inside the scene, or None."""
        x0, y0, x1, y1 = bbox
        if min(x1 - x0, y1 - y0) < self.min_box:
            return None
        side = int(round(1.25 * max(x1 - x0, y1 - y0)))
        if self.scale == "native":
            side = max(side, self.size)
        side = min(self.scene_size, side)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        left = int(round(min(max(cx - side / 2.0, 0), self.scene_size - side)))
        top = int(round(min(max(cy - side / 2.0, 0), self.scene_size - side)))
        return left, top, left + side, top + side


#: the embedded classification sets (see the module docstring)
CLASSIFICATION_FAMILIES: Tuple[ClassificationFamily, ...] = (
    ClassificationFamily("aqd_shapes_cls", 400, 100, size=64),
    ClassificationFamily("aqd_shapes_cls_tiny", 24, 12, size=32),
)


def load_image_folder(directory: str, name: str) -> List[dict]:
    """The dataset dicts of an ImageNet-layout folder, listed by torchvision's ImageFolder.

    Args:
        directory: the folder (``<class>/<image>`` below it).
        name: the dataset name (for error messages).
    Returns:
        ``[{"file_name", "label", "image_id"}, ...]`` in ImageFolder's order.
    Raises:
        FileNotFoundError: the folder, or any class folder / image in it, is missing.
    """
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"dataset {name!r}: image folder not found: "
                                f"{os.path.abspath(directory)}")
    try:
        folder = ImageFolder(directory)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset {name!r} ({os.path.abspath(directory)}): {e}. "
                                "Expected the ImageNet layout <class>/<image>.JPEG") from None
    return [{"file_name": path, "label": int(label), "image_id": i}
            for i, (path, label) in enumerate(folder.samples)]


class _FamilyMetadata(Metadata):
    """Metadata whose ``image_root`` generates the embedded set when read."""

    def __getattr__(self, key: str):
        family, split = self.__dict__.get("_family"), self.__dict__.get("_split")
        if key == "image_root" and family is not None:
            from .register import ensure_generated

            return os.path.join(ensure_generated(family), split)
        return super().__getattr__(key)


def _load_family(family: ClassificationFamily, split: str, name: str) -> List[dict]:
    from .register import ensure_generated

    return load_image_folder(os.path.join(ensure_generated(family), split), name)


def register_classification_families(
        families: Sequence[ClassificationFamily] = CLASSIFICATION_FAMILIES) -> List[str]:
    """Register every split of the embedded classification sets (idempotent, lazy)."""
    names = []
    for family in families:
        for split in family.splits:
            name = f"{family.name}_{split}"
            names.append(name)
            if name in DatasetCatalog:
                if isinstance(MetadataCatalog.get(name), _FamilyMetadata):
                    continue
                raise KeyError(f"dataset name {name!r} is already registered by someone else")
            DatasetCatalog.register(name, lambda f=family, s=split, n=name: _load_family(f, s, n))
            meta = _FamilyMetadata(name=name)
            object.__setattr__(meta, "_family", family)
            object.__setattr__(meta, "_split", split)
            meta.set(thing_classes=list(family.class_names),
                     evaluator_type=CLASSIFICATION_EVALUATOR_TYPE)
            MetadataCatalog[name] = meta
    return names


def register_image_folder(name: str, directory: str) -> str:
    """Register an ImageNet-layout folder under ``name`` (classes: its sub-folders, sorted).

    Raises:
        FileNotFoundError: the folder does not exist or has no class folder.
        ConfigError: ``name`` is registered already with another folder.
    """
    from torchvision.datasets.folder import find_classes

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"dataset {name!r}: image folder not found: "
                                f"{os.path.abspath(directory)}")
    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset {name!r}: {e} (expected <class>/<image>.JPEG "
                                "below it)") from None
    if name in DatasetCatalog:
        from aqd_d2.config import ConfigError

        old = getattr(MetadataCatalog.get(name), "image_root", None)
        if old is not None and os.path.abspath(old) == os.path.abspath(directory):
            return name
        raise ConfigError(f"dataset {name!r} is already registered (with {old!r}); pick "
                          "another name")
    DatasetCatalog.register(name, lambda: load_image_folder(directory, name))
    MetadataCatalog.get(name).set(thing_classes=list(classes), image_root=directory,
                                  evaluator_type=CLASSIFICATION_EVALUATOR_TYPE)
    return name


def register_image_folders_from_config(cfg) -> List[str]:
    """Register ``cfg.AQD.PRETRAIN.IMAGE_FOLDERS`` (``[[NAME, DIRECTORY], ...]``)."""
    return [register_image_folder(str(n), str(d)) for n, d in cfg.AQD.PRETRAIN.IMAGE_FOLDERS]


def check_classification_datasets(cfg) -> List[str]:
    """Check that DATASETS.TRAIN / TEST are registered classification datasets with the same
    classes, as many as ``MODEL.CLS.NUM_CLASSES``.

    Returns:
        the class names (label order).
    Raises:
        ConfigError: naming the dataset and the problem.
    """
    from aqd_d2.config import ConfigError

    known = set(DatasetCatalog.list())
    classes, first = None, None
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in known:
                raise ConfigError(
                    f"DATASETS.{key}: {name!r} is not registered. Register an ImageNet-layout "
                    "folder with --image-folder NAME DIRECTORY (or AQD.PRETRAIN.IMAGE_FOLDERS); "
                    "embedded: aqd_shapes_cls_train / _val, aqd_shapes_cls_tiny_train / _val")
            meta = MetadataCatalog.get(name)
            if getattr(meta, "evaluator_type", None) != CLASSIFICATION_EVALUATOR_TYPE:
                raise ConfigError(f"DATASETS.{key}: {name!r} is a detection dataset "
                                  f"(evaluator_type {getattr(meta, 'evaluator_type', None)!r}), "
                                  "not an image-classification folder")
            these = list(meta.thing_classes)
            if classes is None:
                classes, first = these, name
            elif these != classes:
                diff = sorted(set(these) ^ set(classes))
                raise ConfigError(
                    f"dataset {name!r} has other classes than {first!r} ({len(these)} vs "
                    f"{len(classes)} class folders; differing: {diff[:10] or 'the order'}): "
                    "train and test folders must hold the same class folders")
    if classes is not None and len(classes) != cfg.MODEL.CLS.NUM_CLASSES:
        raise ConfigError(f"MODEL.CLS.NUM_CLASSES = {cfg.MODEL.CLS.NUM_CLASSES} but dataset "
                          f"{first!r} has {len(classes)} classes (class folders); set "
                          f"MODEL.CLS.NUM_CLASSES {len(classes)}")
    return classes or []


class ClassificationMapper:
    """Read one image and apply the standard ImageNet augmentation (torchvision transforms).

    Training: ``RandomResizedCrop(TRAIN_SIZE, scale=(MIN_SCALE, 1))`` (or, under
    ``TRAIN_AUGMENTATION "ResizeRandomCrop"``, shorter side to ``TEST_RESIZE`` + a random
    ``TRAIN_SIZE`` crop) + horizontal flip; test: shorter side to ``TEST_RESIZE`` + ``TEST_SIZE`` center crop. The output image is a
    (3, H, W) uint8 tensor in ``INPUT.FORMAT`` ("BGR" / "RGB"), 0-255, like detectron2's
    DatasetMapper gives the detectors (the model normalises it). Randomness comes from torch's
    global RNG (seeded per sample by the exact-resume loader).
    """

    @configurable
    def __init__(self, is_train: bool, *, train_size: int = 224, min_scale: float = 0.08,
                 test_resize: int = 256, test_size: int = 224, image_format: str = "BGR",
                 bad_input: str = "raise", augmentation: str = "RandomResizedCrop"):
        from torchvision import transforms as T

        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT = {image_format!r}: classification pretraining "
                             "reads 'BGR' or 'RGB'")
        if is_train and augmentation == "ResizeRandomCrop":
            self.transform = T.Compose([T.Resize(test_resize), T.RandomCrop(train_size),
                                        T.RandomHorizontalFlip()])
        elif is_train:
            self.transform = T.Compose([T.RandomResizedCrop(train_size, scale=(min_scale, 1.0)),
                                        T.RandomHorizontalFlip()])
        else:
            self.transform = T.Compose([T.Resize(test_resize), T.CenterCrop(test_size)])
        self.is_train, self.image_format, self.bad_input = is_train, image_format, bad_input

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        p = cfg.AQD.PRETRAIN
        return {"is_train": is_train, "train_size": p.TRAIN_SIZE, "min_scale": p.MIN_SCALE,
                "test_resize": p.TEST_RESIZE, "test_size": p.TEST_SIZE,
                "image_format": cfg.INPUT.FORMAT, "bad_input": cfg.AQD.BAD_INPUT.POLICY,
                "augmentation": p.TRAIN_AUGMENTATION}

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        from torchvision.datasets.folder import default_loader

        path = dataset_dict["file_name"]
        try:
            image = default_loader(path)
        except (OSError, ValueError) as e:
            if self.bad_input == "skip":
                logger.warning("Skipping unreadable image %s: %s", path, e)
                return None
            raise ValueError(f"cannot read image {path!r}: {e} (AQD.BAD_INPUT.POLICY skip "
                             "skips such images)") from None
        pixels = np.asarray(self.transform(image), dtype=np.uint8)
        if self.image_format == "BGR":
            pixels = pixels[:, :, ::-1]
        out = dict(dataset_dict)
        out["image"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        out["height"], out["width"] = out["image"].shape[1:]
        return out
