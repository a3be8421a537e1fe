"""Writers: generated images as a real COCO json dataset or a real Pascal VOC directory.

Both load through detectron2's own loaders (``load_coco_json``, ``load_voc_instances``) and
give the same boxes. Our boxes are integer pixel edges ``(x0, y0, x1, y1)`` (pixels
``x0..x1-1`` covered), so

* COCO: ``bbox = [x0, y0, x1 - x0, y1 - y0]``, ``area = w * h`` (box area: the datasets have
  no masks, so COCO's small/medium/large ranges are box sizes), ``iscrowd = 0``, category ids
  start at 1; extra per-annotation keys ``occluded`` (fraction) and ``truncated`` (0/1).
* VOC: 1-based inclusive pixel indices, ``xmin = x0 + 1``, ``xmax = x1`` (detectron2
  subtracts 1 from xmin/ymin when loading, giving back ``x0``); ``truncated`` and
  ``occluded`` are 0/1 as in VOC, ``difficult`` is always 0 (so VOC and COCO evaluation count
  the same objects).

Layouts, written by :func:`write_dataset` into one dataset directory:

* COCO: ``annotations/instances_{split}.json`` and ``{split}/{%06d}.jpg``
* VOC:  ``JPEGImages/{%06d}.jpg``, ``Annotations/{%06d}.xml``,
  ``ImageSets/Main/{train,val,test,trainval}.txt`` (the directory is a VOC2007-like ``dirname``)

plus ``aqd_synthetic.json``, the generation parameters (written last: it marks a complete
dataset; registration compares it to decide whether to regenerate).
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .synthetic import CLASS_NAMES, GENERATOR_VERSION, SyntheticImage, generate_split

__all__ = [
    "MARKER_FILE", "SPLIT_ORDER", "coco_dict", "write_coco_json", "voc_xml", "write_voc",
    "dataset_fingerprint", "write_dataset",
]

#: Written last into a dataset directory; holds :func:`dataset_fingerprint`.
MARKER_FILE = "aqd_synthetic.json"
#: Image ids are consecutive over the splits in this order (unique file names in VOC).
SPLIT_ORDER: Tuple[str, ...] = ("train", "val", "test")


def coco_dict(images: Sequence[SyntheticImage], class_names: Sequence[str],
              category_ids: Optional[Sequence[int]] = None) -> dict:
    """The COCO instances json of generated images.

    Args:
        images: generated images (any split).
        class_names: names of the categories; ``ObjectAnnotation.category_id`` indexes it.
        category_ids: COCO id of each class (default ``1..len(class_names)``).

    Returns:
        a dict with ``info``, ``licenses``, ``images``, ``annotations``, ``categories``.
    """
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(ids) != len(class_names) or len(set(ids)) != len(ids):
        raise ValueError(f"need one distinct category id per class, got {ids} for {list(class_names)}")
    annotations: List[dict] = []
    for im in images:
        for a in im.annotations:
            x0, y0, x1, y1 = a.bbox
            annotations.append({
                "id": len(annotations) + 1, "image_id": im.image_id, "category_id": ids[a.category_id],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                "occluded": a.occluded, "truncated": int(a.truncated),
            })
    return {
        "info": {"description": "aqd_d2 synthetic detection dataset", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": [{"id": im.image_id, "file_name": im.file_stem + ".jpg", "height": im.height,
                    "width": im.width} for im in images],
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "object"} for i, n in zip(ids, class_names)],
    }


def _write_images(images: Sequence[SyntheticImage], image_dir: str) -> None:
    os.makedirs(image_dir, exist_ok=True)
    for im in images:
        with open(os.path.join(image_dir, im.file_stem + ".jpg"), "wb") as f:
            f.write(im.jpeg)


def write_coco_json(images: Sequence[SyntheticImage], class_names: Sequence[str], json_path: str,
                    image_dir: Optional[str] = None,
                    category_ids: Optional[Sequence[int]] = None) -> str:
    """Write a COCO instances json (and the JPEGs, if ``image_dir`` is given).

    Args:
        images: generated images.
        class_names: category names, indexed by ``ObjectAnnotation.category_id``.
        json_path: the json file to write (its directory is created).
        image_dir: if not None, the JPEGs are written there as ``<file_stem>.jpg``.
        category_ids: COCO id of each class (default ``1..len(class_names)``).

    Returns:
        ``json_path``.
    """
    if image_dir is not None:
        _write_images(images, image_dir)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(coco_dict(images, class_names, category_ids), f)
    return json_path


def _sub(parent: ET.Element, tag: str, text: Optional[object] = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def voc_xml(image: SyntheticImage, class_names: Sequence[str], folder: str = "VOC2007") -> bytes:
    """The Pascal VOC annotation xml of one image.

    Args:
        image: a generated image.
        class_names: names indexed by ``ObjectAnnotation.category_id``.
        folder: the ``<folder>`` entry.

    Returns:
        the xml document (utf-8 bytes).
    """
    root = ET.Element("annotation")
    _sub(root, "folder", folder)
    _sub(root, "filename", image.file_stem + ".jpg")
    _sub(_sub(root, "source"), "database", "aqd_d2 synthetic")
    size = _sub(root, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        _sub(size, tag, value)
    _sub(root, "segmented", 0)
    for a in image.annotations:
        obj = _sub(root, "object")
        _sub(obj, "name", class_names[a.category_id])
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", int(a.truncated))
        _sub(obj, "occluded", int(a.occluded > 0))
        _sub(obj, "difficult", 0)
        box = _sub(obj, "bndbox")
        x0, y0, x1, y1 = a.bbox
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            _sub(box, tag, value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def write_voc(splits: Mapping[str, Sequence[SyntheticImage]], class_names: Sequence[str],
              voc_dir: str) -> str:
    """Write a Pascal VOC directory: JPEGImages, Annotations, ImageSets/Main/<split>.txt.

    ``trainval.txt`` is added when both ``train`` and ``val`` are given. File stems must be
    unique over all splits.

    Args:
        splits: split name -> its images. A split must not hold exactly one image:
            detectron2's ``load_voc_instances`` reads the id list with ``np.loadtxt``, which
            returns a 0-d array that cannot be iterated for a one-line file.
        class_names: names indexed by ``ObjectAnnotation.category_id``.
        voc_dir: the directory (created); it is the ``dirname`` of detectron2's VOC metadata.

    Returns:
        ``voc_dir``.
    """
    stems = [im.file_stem for images in splits.values() for im in images]
    if len(set(stems)) != len(stems):
        raise ValueError("image file stems repeat across VOC splits; give each split its own ids")
    lists = {name: [im.file_stem for im in images] for name, images in splits.items()}
    for name, ids in lists.items():
        if len(ids) == 1:
            raise ValueError(f"VOC split {name!r} has one image; detectron2's loader needs 0 or >= 2")
    if "train" in lists and "val" in lists and "trainval" not in lists:
        lists["trainval"] = lists["train"] + lists["val"]
    ann_dir, set_dir = os.path.join(voc_dir, "Annotations"), os.path.join(voc_dir, "ImageSets", "Main")
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(set_dir, exist_ok=True)
    for images in splits.values():
        _write_images(images, os.path.join(voc_dir, "JPEGImages"))
        for im in images:
            with open(os.path.join(ann_dir, im.file_stem + ".xml"), "wb") as f:
                f.write(voc_xml(im, class_names))
    for name, ids in lists.items():
        with open(os.path.join(set_dir, name + ".txt"), "w", encoding="utf-8") as f:
            f.write("".join(i + "\n" for i in ids))
    return voc_dir


def dataset_fingerprint(kind: str, fmt: str, num_train: int, num_val: int, num_test: int,
                        height: int, width: int, seed: int) -> dict:
    """Everything that determines a generated dataset's files (stored in :data:`MARKER_FILE`).

    Args:
        kind, fmt, num_train, num_val, num_test, height, width, seed: as for
            :func:`write_dataset`.

    Returns:
        a json-serialisable dict (includes :data:`GENERATOR_VERSION`).
    """
    return {"generator_version": GENERATOR_VERSION, "kind": kind, "format": fmt,
            "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
            "height": int(height), "width": int(width), "seed": int(seed)}


def write_dataset(out_dir: str, kind: str = "shapes", fmt: str = "coco", num_train: int = 600,
                  num_val: int = 100, num_test: int = 0, height: int = 128, width: int = 128,
                  seed: int = 0) -> Dict[str, str]:
    """Generate and write a whole dataset (all splits) into ``out_dir``.

    Image ids run over train, val, test in that order, so the same arguments give the same
    images in the COCO and the VOC layout (VOC id ``000601`` is COCO image 601).

    Args:
        out_dir: the dataset directory (created).
        kind: ``"shapes"`` or ``"kitti"``.
        fmt: ``"coco"`` or ``"voc"``.
        num_train, num_val, num_test: split sizes (a split of size 0 is left out, except that
            VOC always writes ``train``, ``val`` and ``test`` lists).
        height, width: image size in pixels.
        seed: base seed.

    Returns:
        split -> its json file (COCO) or the VOC directory (VOC).
    """
    if fmt not in ("coco", "voc"):
        raise ValueError(f"fmt must be 'coco' or 'voc', got {fmt!r}")
    if kind not in CLASS_NAMES:
        raise ValueError(f"kind must be one of {sorted(CLASS_NAMES)}, got {kind!r}")
    sizes = dict(zip(SPLIT_ORDER, (num_train, num_val, num_test)))
    class_names = CLASS_NAMES[kind]
    splits: Dict[str, List[SyntheticImage]] = {}
    next_id = 1
    for split, n in sizes.items():
        if n > 0 or fmt == "voc":
            splits[split] = generate_split(n, seed, split, height, width, kind, first_image_id=next_id)
        next_id += n
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    if fmt == "coco":
        for split, images in splits.items():
            paths[split] = write_coco_json(
                images, class_names, os.path.join(out_dir, "annotations", f"instances_{split}.json"),
                os.path.join(out_dir, split))
    else:
        write_voc(splits, class_names, out_dir)
        paths = {split: out_dir for split in splits}
    fingerprint = dataset_fingerprint(kind, fmt, num_train, num_val, num_test, height, width, seed)
    with open(os.path.join(out_dir, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
    return paths
