"""Deterministic synthetic detection images (the data this project trains and tests on).

Two kinds of scene:

* ``"shapes"``: six classes (:data:`SHAPE_CLASSES`), each a shape *and* a colour family
  (a red circle, a green square, ...), from a few pixels to half the image, on cluttered
  backgrounds (gradients, low-frequency noise, stripes/checkers, pixel noise), with
  distractors meant to provoke false positives: shapes of no class in any colour (ellipses,
  rings, bars, rectangles, pie slices, hexagons) and class shapes in no class's colour.
* ``"kitti"``: a road scene whose labels are KITTI's :data:`KITTI_CLASSES`: wide car shapes
  with wheels, tall thin pedestrians, cyclists with two wheels; size follows the distance to
  the horizon; poles, signs, trees and boxes are the distractors.

Items are drawn in order, so later items occlude earlier ones. Every object keeps its full
(amodal, clipped to the image) box and records the fraction of its pixels hidden by later
items; objects hidden more than ``max_occlusion`` (70%) are drawn but not annotated. Some
images (``empty_fraction``) hold no object at all, only background and distractors.

Everything is a function of ``(seed, split, image index)`` through NumPy's ``default_rng``;
the same arguments give byte-identical JPEGs (Pillow, quality 95) and annotations. This
module needs only NumPy and Pillow. Writers: :mod:`aqd_d2.data.formats`.
CLI: ``python -m aqd_d2.data.synthetic --out DIR --num-train N --num-val M --size 128``.
"""
from __future__ import annotations

import argparse
import io
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .scenes import (CLASS_NAMES, KITTI_CLASSES, SHAPE_CLASSES, background, kitti_scene, paint,
                     primitive_extent, shapes_scene)

__all__ = [
    "SHAPE_CLASSES", "KITTI_CLASSES", "CLASS_NAMES", "GENERATOR_VERSION", "ObjectAnnotation",
    "SyntheticImage", "render_image", "generate_split", "encode_jpeg", "parse_size", "main",
]

#: Bump when the images or annotations for the same arguments change (invalidates caches).
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class ObjectAnnotation:
    """One annotated object.

    Attributes:
        category_id: 0-based index into the kind's class names.
        bbox: (x0, y0, x1, y1) absolute pixel edges (integers; pixels x0..x1-1 are covered),
            the full box of the object's pixels inside the image, occluded parts included.
        occluded: fraction of the object's in-image pixels hidden by later drawn items.
        truncated: whether the image border cuts the object.
    """

    category_id: int
    bbox: Tuple[int, int, int, int]
    occluded: float
    truncated: bool


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image: JPEG bytes plus its annotations.

    Attributes:
        image_id: integer id, unique within a generated dataset (all splits).
        file_stem: file name without extension (``"%06d" % image_id``).
        height, width: image size in pixels.
        jpeg: the encoded image.
        annotations: the annotated objects, in drawing order.
    """

    image_id: int
    file_stem: str
    height: int
    width: int
    jpeg: bytes
    annotations: Tuple[ObjectAnnotation, ...]


def render_image(
    rng: np.random.Generator, height: int = 128, width: int = 128, kind: str = "shapes",
    empty: bool = False, force_class: Optional[int] = None, max_objects: int = 6,
    max_distractors: int = 4, max_occlusion: float = 0.7,
) -> Tuple[np.ndarray, List[ObjectAnnotation]]:
    """Draw one scene.

    Args:
        rng: the random generator; the output is a function of its state and the arguments.
        height, width: image size in pixels (>= 16 each).
        kind: ``"shapes"`` or ``"kitti"``.
        empty: draw no object (background and distractors only).
        force_class: if given (and not empty), one object of this class is drawn last,
            unoccluded (used to make every class appear in every split).
        max_objects: at most this many objects (at least 1 unless empty).
        max_distractors: at most this many distractor items.
        max_occlusion: objects with a larger hidden fraction are not annotated.

    Returns:
        (image, annotations): a uint8 array of shape (height, width, 3) (RGB) and the list of
        :class:`ObjectAnnotation`, in drawing order.
    """
    if kind not in CLASS_NAMES:
        raise ValueError(f"kind must be one of {sorted(CLASS_NAMES)}, got {kind!r}")
    if height < 16 or width < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")
    if empty:
        n_objects, force_class = 0, None
    else:
        n_objects = int(rng.integers(0 if force_class is not None else 1, max_objects + (force_class is None)))
    horizon = height * rng.uniform(0.35, 0.5) if kind == "kitti" else None
    if kind == "shapes":
        items = shapes_scene(rng, height, width, n_objects, force_class, max_distractors)
    else:
        items = kitti_scene(rng, height, width, n_objects, force_class, max_distractors, horizon)
    canvas = Image.fromarray(np.clip(background(rng, height, width, horizon), 0, 255).astype(np.uint8))
    draw, masks = ImageDraw.Draw(canvas), []
    for _, prims in items:
        paint(draw, prims)
        mask = Image.new("L", (width, height), 0)
        paint(ImageDraw.Draw(mask), prims, 255)
        masks.append(np.asarray(mask) > 0)
    covered = np.zeros((height, width), bool)
    annotations: List[ObjectAnnotation] = []
    for (cls, prims), mask in zip(reversed(items), reversed(masks)):
        area = int(mask.sum())
        hidden = int((mask & covered).sum())
        covered |= mask
        if cls < 0 or area == 0 or hidden > max_occlusion * area:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        x0, y0, x1, y1 = primitive_extent(prims)
        truncated = x0 < -0.5 or y0 < -0.5 or x1 > width + 0.5 or y1 > height + 0.5
        annotations.append(ObjectAnnotation(cls, box, round(hidden / area, 4), bool(truncated)))
    annotations.reverse()
    image = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), (height, width, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), annotations


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode an RGB uint8 array of shape (H, W, 3) as JPEG bytes (deterministic).

    Args:
        image: the pixels.
        quality: JPEG quality (1-95).

    Returns:
        the JPEG file content.
    """
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate_split(
    num_images: int, seed: int = 0, split: str = "train", height: int = 128, width: int = 128,
    kind: str = "shapes", first_image_id: int = 1, empty_fraction: float = 0.08,
    jpeg_quality: int = 95,
) -> List[SyntheticImage]:
    """Generate one split deterministically.

    Image ``i`` is drawn from ``default_rng([seed, crc32(split), 1, i])``; a split-level
    generator picks the empty images (``round(empty_fraction * num_images)``, at least one
    when ``num_images >= 2``) and makes every class appear as soon as the split has as many
    non-empty images as classes.

    Args:
        num_images: number of images.
        seed: non-negative base seed.
        split: split name; part of the seed, so splits differ.
        height, width: image size in pixels.
        kind: ``"shapes"`` or ``"kitti"``.
        first_image_id: id of the first image (ids are consecutive; file stems are ``%06d``).
        empty_fraction: fraction of images without objects.
        jpeg_quality: JPEG quality.

    Returns:
        the list of :class:`SyntheticImage`.
    """
    if num_images < 0 or seed < 0:
        raise ValueError(f"num_images and seed must be >= 0, got {num_images}, {seed}")
    key = zlib.crc32(split.encode("utf-8"))
    plan = np.random.default_rng([seed, key, 2])
    n_empty = min(num_images, max(1, round(empty_fraction * num_images))) if num_images >= 2 and \
        empty_fraction > 0 else 0
    empty = set(plan.choice(num_images, n_empty, replace=False).tolist()) if n_empty else set()
    classes = plan.permutation(len(CLASS_NAMES[kind])).tolist()
    out, shown = [], 0
    for i in range(num_images):
        force = None if i in empty else classes[shown % len(classes)]
        shown += i not in empty
        pixels, annos = render_image(np.random.default_rng([seed, key, 1, i]), height, width, kind,
                                     empty=i in empty, force_class=force)
        image_id = first_image_id + i
        out.append(SyntheticImage(image_id, f"{image_id:06d}", height, width,
                                  encode_jpeg(pixels, jpeg_quality), tuple(annos)))
    return out


def parse_size(text: str) -> Tuple[int, int]:
    """Parse ``"128"`` (square) or ``"96x320"`` (height x width).

    Args:
        text: the size string.

    Returns:
        (height, width).
    """
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    return (int(parts[0]), int(parts[-1]))


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Command line: write the synthetic datasets under ``--out``.

    Layout (the one registration uses under ``$DETECTRON2_DATASETS``): ``OUT/aqd_shapes``
    (COCO json), ``OUT/aqd_shapes_voc`` (Pascal VOC), ``OUT/aqd_kitti`` (COCO json).

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the dataset directories written.
    """
    import os

    from .formats import write_dataset

    p = argparse.ArgumentParser(prog="python -m aqd_d2.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output root (e.g. $DETECTRON2_DATASETS)")
    p.add_argument("--num-train", type=int, default=600)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=None, help="default: --num-val for VOC, 0 for COCO")
    p.add_argument("--size", type=parse_size, default=None, help="N or HxW (default 128, kitti 128x384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("coco", "voc", "kitti", "all"), default="coco")
    args = p.parse_args(argv)
    jobs = {"coco": [("aqd_shapes", "shapes", "coco")], "voc": [("aqd_shapes_voc", "shapes", "voc")],
            "kitti": [("aqd_kitti", "kitti", "coco")]}
    jobs["all"] = jobs["coco"] + jobs["voc"] + jobs["kitti"]
    written = []
    for dirname, kind, fmt in jobs[args.format]:
        height, width = args.size or ((128, 384) if kind == "kitti" else (128, 128))
        num_test = args.num_test if args.num_test is not None else (args.num_val if fmt == "voc" else 0)
        out = os.path.join(args.out, dirname)
        write_dataset(out, kind=kind, fmt=fmt, num_train=args.num_train, num_val=args.num_val,
                      num_test=num_test, height=height, width=width, seed=args.seed)
        print(f"wrote {out}")
        written.append(out)
    return written


if __name__ == "__main__":
    main()
