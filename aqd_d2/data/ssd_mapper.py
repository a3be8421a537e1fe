"""SSD training augmentation (Liu et al. 2016, sec. 2.2 "Data augmentation" and sec. 3.6) as a
dataset mapper registered in ``TRAIN_MAPPER_REGISTRY`` as ``"SSDMapper"``
(``INPUT.TRAIN_MAPPER "SSDMapper"``).

Order, each a detectron2 Augmentation / Transform so that boxes move with the image:

1. photometric distortion (:class:`PhotometricTransform`): random brightness, contrast
   (before or after the HSV step), saturation, hue, channel permutation; each with its
   INPUT.SSD.* probability. Colour only: boxes are unchanged.
2. zoom out (:class:`ExpandTransform`): the image placed at a random position on a canvas
   up to ``EXPAND_MAX_RATIO`` times larger, filled with the pixel mean (MODEL.PIXEL_MEAN).
3. random IoU crop (:class:`RandomIoUCrop`): one option drawn from {whole image, min IoU
   0, 0.1, 0.3, 0.5, 0.7, 0.9}; patches of area 0.09-1 of the image (side scale 0.3-1) and
   aspect 1/2-2 (SSD: "[0.1, 1] of the original image size, aspect ratio between 1/2 and 2";
   the scale / aspect sampler of the SSD release) are tried until one overlaps some gt box
   with IoU >= the minimum and contains some box centre; after CROP_MAX_TRIALS the image is kept.
   Boxes whose centre falls outside the patch are dropped, the others clipped to it.
4. horizontal flip, 5. resize to ``SIZE`` x ``SIZE`` (300; aspect ratio not kept).

Boxes narrower or shorter than ``MIN_BOX_SIZE`` pixels after all steps are dropped.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from fvcore.transforms.transform import CropTransform, NoOpTransform, Transform

from .mappers import TRAIN_MAPPER_REGISTRY

__all__ = ["SSDMapper", "PhotometricTransform", "SSDPhotometricDistort", "ExpandTransform",
           "RandomExpand", "RandomIoUCrop", "rgb_to_hsv", "hsv_to_rgb"]


# ---- colour -------------------------------------------------------------------------------
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 255] -> HSV with H in [0, 360) degrees, S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / safe % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(c > 0, h * 60.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv` (H taken modulo 360)."""
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    z = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    choices = [np.stack(t, -1) for t in ((c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x))]
    rgb = np.choose(sector[..., None], choices)
    return rgb + (v - c)[..., None]


class PhotometricTransform(Transform):
    """Colour distortion with fixed (already drawn) parameters; coordinates are unchanged.

    Args:
        brightness: added to every pixel (None = skip).
        contrast: multiplies every pixel (None = skip).
        contrast_first: apply contrast before (True) or after the HSV step.
        saturation: multiplies S (None = skip).
        hue: added to H in degrees (None = skip).
        channel_perm: permutation of the 3 channels (None = skip).
        rgb_order: indices that turn the image's channel order into RGB ([2, 1, 0] for BGR).
    """

    def __init__(self, brightness: Optional[float] = None, contrast: Optional[float] = None,
                 contrast_first: bool = True, saturation: Optional[float] = None,
                 hue: Optional[float] = None, channel_perm: Optional[Sequence[int]] = None,
                 rgb_order: Sequence[int] = (2, 1, 0)):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Args: img (H, W, 3) any dtype, 0-255. Returns: (H, W, 3) float32 in [0, 255]."""
        x = img.astype(np.float32)
        if self.brightness is not None:
            x = np.clip(x + self.brightness, 0, 255)
        if self.contrast is not None and self.contrast_first:
            x = np.clip(x * self.contrast, 0, 255)
        if self.saturation is not None or self.hue is not None:
            order = list(self.rgb_order)
            hsv = rgb_to_hsv(x[..., order])
            if self.saturation is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 1)
            if self.hue is not None:
                hsv[..., 0] = (hsv[..., 0] + self.hue) % 360.0
            rgb = hsv_to_rgb(hsv)
            x = np.empty_like(x)
            x[..., order] = rgb
        if self.contrast is not None and not self.contrast_first:
            x = np.clip(x * self.contrast, 0, 255)
        if self.channel_perm is not None:
            x = x[..., list(self.channel_perm)]
        return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.float32))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        return NoOpTransform()


class SSDPhotometricDistort(T.Augmentation):
    """Draws a :class:`PhotometricTransform` (SSD's photometric distortions, each with
    probability ``prob``; channel swap with ``channel_swap_prob``)."""

    def __init__(self, prob: float = 0.5, brightness_delta: float = 32.0,
                 contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: float = 18.0,
                 channel_swap_prob: float = 0.5, image_format: str = "BGR"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        rnd = np.random
        on = lambda: rnd.rand() < self.prob  # noqa: E731
        brightness = rnd.uniform(-self.brightness_delta, self.brightness_delta) if on() else None
        contrast = rnd.uniform(*self.contrast_range) if on() else None
        contrast_first = bool(rnd.rand() < 0.5)
        saturation = rnd.uniform(*self.saturation_range) if on() else None
        hue = rnd.uniform(-self.hue_delta, self.hue_delta) if on() else None
        perm = list(rnd.permutation(3)) if rnd.rand() < self.channel_swap_prob else None
        rgb_order = (2, 1, 0) if self.image_format == "BGR" else (0, 1, 2)
        return PhotometricTransform(brightness, contrast, contrast_first, saturation, hue, perm,
                                    rgb_order)


# ---- zoom out -----------------------------------------------------------------------------
class ExpandTransform(Transform):
    """Place an (h, w) image at (left, top) on a (new_h, new_w) canvas filled with ``fill``.

    Args:
        h, w: input size; left, top: offset; new_h, new_w: canvas size;
        fill: per-channel fill value (e.g. the pixel mean).
    """

    def __init__(self, h: int, w: int, left: int, top: int, new_h: int, new_w: int,
                 fill: Sequence[float]):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Args: img (h, w, C). Returns: (new_h, new_w, C) float32."""
        canvas = np.empty((self.new_h, self.new_w, img.shape[2]), dtype=np.float32)
        canvas[...] = np.asarray(self.fill, dtype=np.float32)
        canvas[self.top: self.top + self.h, self.left: self.left + self.w] = img
        return canvas

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] += self.left
        coords[:, 1] += self.top
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        out = np.zeros((self.new_h, self.new_w) + segmentation.shape[2:], dtype=segmentation.dtype)
        out[self.top: self.top + self.h, self.left: self.left + self.w] = segmentation
        return out

    def inverse(self) -> Transform:
        return CropTransform(self.left, self.top, self.w, self.h)


class RandomExpand(T.Augmentation):
    """SSD zoom out: with probability ``prob`` a canvas of ratio U(1, max_ratio) (see
    :class:`ExpandTransform`)."""

    def __init__(self, max_ratio: float = 4.0, prob: float = 0.5, fill: Sequence[float] = (0, 0, 0)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if np.random.rand() >= self.prob or self.max_ratio <= 1:
            return NoOpTransform()
        h, w = image.shape[:2]
        ratio = np.random.uniform(1, self.max_ratio)
        new_h, new_w = int(h * ratio), int(w * ratio)
        left = int(np.random.uniform(0, new_w - w))
        top = int(np.random.uniform(0, new_h - h))
        return ExpandTransform(h, w, left, top, new_h, new_w, list(self.fill))


# ---- random IoU crop ----------------------------------------------------------------------
def _iou_with_rect(boxes: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) XYXY boxes with one XYXY rect."""
    lt = np.maximum(boxes[:, :2], rect[:2])
    rb = np.minimum(boxes[:, 2:], rect[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(1) + (rect[2:] - rect[:2]).prod()
    return inter / np.maximum(area - inter, 1e-12)


class RandomIoUCrop(T.Augmentation):
    """SSD random crop (see the module docstring).

    Args:
        min_ious: minimum-IoU options (0 = any patch).
        keep_original: add "the whole image" as an option.
        scale: range of the patch side scale s (area fraction s^2).
        aspect_range: range of the patch aspect a (normalised w / h), clipped to
            [s^2, 1 / s^2] so that the patch fits in the image.
        max_trials: patches tried for the drawn option; if none fits, the whole image.
    """

    def __init__(self, min_ious: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9),
                 keep_original: bool = True, scale: Tuple[float, float] = (0.3, 1.0),
                 aspect_range: Tuple[float, float] = (0.5, 2.0), max_trials: int = 50):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: np.ndarray) -> Transform:
        options: List[Optional[float]] = ([None] if self.keep_original else []) + list(self.min_ious)
        min_iou = options[np.random.randint(len(options))]
        if min_iou is None:
            return NoOpTransform()
        h, w = image.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        for _ in range(self.max_trials):
            # SSD's sampler: side scale s and aspect a (w / h of the normalised patch), kept
            # inside the image: patch (s sqrt(a) W, s / sqrt(a) H), area s^2 in [0.09, 1].
            scale = np.random.uniform(*self.scale)
            lo = max(self.aspect_range[0], scale ** 2)
            hi = min(self.aspect_range[1], 1 / scale ** 2)
            aspect = np.random.uniform(lo, hi)
            cw, ch = scale * np.sqrt(aspect) * w, scale / np.sqrt(aspect) * h
            x0, y0 = np.random.uniform(0, w - cw), np.random.uniform(0, h - ch)
            rect = np.array([x0, y0, x0 + cw, y0 + ch])
            x0i, y0i = int(x0), int(y0)
            x1i, y1i = max(int(rect[2]), x0i + 1), max(int(rect[3]), y0i + 1)
            if len(boxes):
                if _iou_with_rect(boxes, rect).max() < min_iou:
                    continue
                inside = ((centres > [x0i, y0i]) & (centres < [x1i, y1i])).all(1)
                if not inside.any():
                    continue
            return CropTransform(x0i, y0i, x1i - x0i, y1i - y0i)
        return NoOpTransform()


# ---- the mapper ---------------------------------------------------------------------------
@TRAIN_MAPPER_REGISTRY.register()
class SSDMapper:
    """Dataset dict -> model input with SSD augmentation (see the module docstring).

    Args:
        is_train: must be True (use detectron2's DatasetMapper for evaluation).
        augmentations: applied in order; the crop needs ``boxes``.
        image_format: detectron2 image format ("BGR").
        min_box_size: boxes with a side <= this (pixels, final image) are dropped.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List[T.Augmentation],
                 image_format: str = "BGR", min_box_size: float = 1.0):
        if not is_train:
            raise ValueError("SSDMapper is a training mapper (INPUT.TRAIN_MAPPER); evaluation "
                             "uses detectron2's DatasetMapper")
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.min_box_size = float(min_box_size)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        s = cfg.INPUT.SSD
        fill = list(cfg.MODEL.PIXEL_MEAN)  # in the channel order of INPUT.FORMAT, as detectron2's
        augs = [
            SSDPhotometricDistort(s.PHOTOMETRIC_PROB, s.BRIGHTNESS_DELTA, tuple(s.CONTRAST_RANGE),
                                  tuple(s.SATURATION_RANGE), s.HUE_DELTA, s.CHANNEL_SWAP_PROB,
                                  cfg.INPUT.FORMAT),
            RandomExpand(s.EXPAND_MAX_RATIO, s.EXPAND_PROB, fill),
            RandomIoUCrop(tuple(s.CROP_MIN_IOUS), s.CROP_KEEP_ORIGINAL, tuple(s.CROP_SCALE),
                          tuple(s.CROP_ASPECT_RANGE), s.CROP_MAX_TRIALS),
            T.RandomFlip(prob=s.FLIP_PROB, horizontal=True, vertical=False),
            T.Resize((s.SIZE, s.SIZE)),
        ]
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT,
                "min_box_size": s.MIN_BOX_SIZE}

    def __call__(self, dataset_dict: Dict) -> Dict:
        """Args: a detectron2 dataset dict. Returns: it with "image" (3, S, S) float32 with
        values in [0, 255] and "instances" (gt_boxes, gt_classes), without "annotations"."""
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        annos = [a for a in d.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                         dtype=np.float64).reshape(-1, 4)
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        if image.dtype != np.uint8:
            # a float image (after the colour / zoom-out steps) is resized by detectron2's
            # ResizeTransform with F.interpolate: its float32 bilinear weights do not sum to
            # exactly 1, so a blend of pixels at 255 can come out one ulp above (255.00002),
            # depending on how ATen splits the loop (seen with 1 thread, any vector width).
            # Clamped: the image stays in the [0, 255] range the mapper promises.
            image = np.clip(image, 0, 255)
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
        # SSD keeps a box only if its centre lies inside the crop: the centre's image under
        # every transform must lie inside the final image (expand / flip / resize keep the
        # whole image, so this is "inside the crop").
        centres = transforms.apply_coords((boxes[:, :2] + boxes[:, 2:]) / 2) if len(boxes) else boxes[:, :2]
        inside = (centres[:, 0] > 0) & (centres[:, 0] < w) & (centres[:, 1] > 0) & (centres[:, 1] < h)
        kept = [utils.transform_instance_annotations(a, transforms, (h, w))
                for a, ok in zip(annos, inside) if ok]
        instances = utils.annotations_to_instances(kept, (h, w))
        d["instances"] = instances[instances.gt_boxes.nonempty(threshold=self.min_box_size)]
        return d
