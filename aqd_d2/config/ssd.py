"""SSD300 (paper 000): MODEL.SSD.*, MODEL.VGG.*, MODEL.MOBILENET_SSD.*, the SSD data mapper
(INPUT.SSD.*).
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range  # noqa: F401

SSD_FEATURES = ["conv4_3", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"]


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""
    _C = cfg
    _C.MODEL.SSD = CN()
    # Object classes (without background); the head predicts NUM_CLASSES + 1 scores.
    _C.MODEL.SSD.NUM_CLASSES = 20
    # Side of the square network input: every image is resized to INPUT_SIZE x INPUT_SIZE
    # inside the model (SSD300: 300); detections are mapped back to the input image size.
    _C.MODEL.SSD.INPUT_SIZE = 300
    # Backbone features fed to the head, from fine to coarse (one default-box level each).
    _C.MODEL.SSD.IN_FEATURES = list(SSD_FEATURES)
    # Default-box side s_k per level in input pixels (SSD paper sec. 2.2 / 3: conv4_3 scale
    # 0.1, then s_min = 0.2 .. s_max = 0.9 of 300; the SSD300 release values).
    _C.MODEL.SSD.MIN_SIZES = [30.0, 60.0, 111.0, 162.0, 213.0, 264.0]
    # s_{k+1} per level: the extra square box has side sqrt(s_k * s_{k+1}).
    _C.MODEL.SSD.MAX_SIZES = [60.0, 111.0, 162.0, 213.0, 264.0, 315.0]
    # Aspect ratios per level besides 1 (each ar > 1 adds boxes ar and 1/ar): 4,6,6,6,4,4
    # boxes per location, 8732 boxes at 300 px.
    _C.MODEL.SSD.ASPECT_RATIOS = [[2.0], [2.0, 3.0], [2.0, 3.0], [2.0, 3.0], [2.0], [2.0]]
    # Distance between default-box centres per level in input pixels; [] = INPUT_SIZE / map size.
    _C.MODEL.SSD.STEPS = [8.0, 16.0, 32.0, 64.0, 100.0, 300.0]
    # Centre of cell (i, j) = ((j + OFFSET) * step, (i + OFFSET) * step).
    _C.MODEL.SSD.OFFSET = 0.5
    # Clip default boxes to the input image.
    _C.MODEL.SSD.CLIP_DEFAULT_BOXES = True
    # Default boxes with IoU >= IOU_THRESHOLD with a gt box are positives (plus the best
    # default box of every gt box); the others negatives.
    _C.MODEL.SSD.IOU_THRESHOLD = 0.5
    # Box2BoxTransform weights = 1 / SSD variances (0.1, 0.1, 0.2, 0.2).
    _C.MODEL.SSD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # Hard negative mining: at most NEG_POS_RATIO negatives per positive, per image.
    _C.MODEL.SSD.NEG_POS_RATIO = 3.0
    # Smooth L1 beta of the localisation loss (SSD: 1.0).
    _C.MODEL.SSD.SMOOTH_L1_BETA = 1.0
    # alpha of SSD eq. 1: weight of the localisation loss.
    _C.MODEL.SSD.LOC_WEIGHT = 1.0
    # Inference: minimum class score of a candidate (SSD: 0.01).
    _C.MODEL.SSD.SCORE_THRESH_TEST = 0.01
    # Inference: candidates (box, class) kept by score before NMS, per image.
    _C.MODEL.SSD.TOPK_CANDIDATES_TEST = 1000
    # Inference: per-class NMS IoU threshold (SSD: 0.45).
    _C.MODEL.SSD.NMS_THRESH_TEST = 0.45
    # Inference: detections kept per image (SSD: 200).
    _C.MODEL.SSD.DETECTIONS_PER_IMAGE = 200

    _C.MODEL.VGG = CN()
    # Channel multiplier of VGG16 and the extras (1.0 = SSD300; smaller for CPU tests).
    _C.MODEL.VGG.WIDTH_MULT = 1.0
    # Norm after every conv: "" (SSD: none, convs with bias) or "BN" / "SyncBN" (binary VGG).
    _C.MODEL.VGG.NORM = ""
    # Non-linearity after every conv: "relu" (SSD) or "none" (binary nets: the next layer's
    # sign is the non-linearity; sign(relu(x)) would be +1 everywhere).
    _C.MODEL.VGG.ACTIVATION = "relu"
    # Bi-Real-Net extra identity shortcut around every conv whose in/out shapes are equal
    # (and a pooled 1x1-conv shortcut around strided convs): BiDet's "(SC)" variant.
    _C.MODEL.VGG.SHORTCUT = False
    # "maxpool" (VGG) or "strided_conv": pool1..pool4 replaced by stride 2 in the next conv
    # (binary VGG (SC) of BiDet).
    _C.MODEL.VGG.DOWNSAMPLE = "maxpool"
    # Initial per-channel scale of the L2Norm on conv4_3 (SSD: 20).
    _C.MODEL.VGG.L2NORM_SCALE = 20.0

    _C.MODEL.MOBILENET_SSD = CN()
    # Channel multiplier of MobileNetV1 and its SSD extras (every conv has BN, as MobileNet).
    _C.MODEL.MOBILENET_SSD.WIDTH_MULT = 1.0
    # "relu" (MobileNet) or "none" (binary nets).
    _C.MODEL.MOBILENET_SSD.ACTIVATION = "relu"

    _C.INPUT.SSD = CN()
    # Probability of each photometric distortion (brightness, contrast, saturation, hue).
    _C.INPUT.SSD.PHOTOMETRIC_PROB = 0.5
    # Brightness: add a uniform delta in [-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA] (0-255 scale).
    _C.INPUT.SSD.BRIGHTNESS_DELTA = 32.0
    # Contrast: multiply by a uniform factor in this range.
    _C.INPUT.SSD.CONTRAST_RANGE = (0.5, 1.5)
    # Saturation (HSV S channel): multiply by a uniform factor in this range.
    _C.INPUT.SSD.SATURATION_RANGE = (0.5, 1.5)
    # Hue: add a uniform delta in [-HUE_DELTA, HUE_DELTA] degrees.
    _C.INPUT.SSD.HUE_DELTA = 18.0
    # Probability of a random permutation of the colour channels.
    _C.INPUT.SSD.CHANNEL_SWAP_PROB = 0.5
    # Probability of "zoom out": placing the image on a mean-filled canvas.
    _C.INPUT.SSD.EXPAND_PROB = 0.5
    # Largest canvas side / image side of the zoom out (SSD: 4).
    _C.INPUT.SSD.EXPAND_MAX_RATIO = 4.0
    # Random IoU crop: one option is drawn uniformly from "keep the whole image" (if
    # CROP_KEEP_ORIGINAL) and these minimum IoUs (0.0 = any patch). SSD sec. 3.
    _C.INPUT.SSD.CROP_MIN_IOUS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    # Include "use the entire original input image" among the crop options.
    _C.INPUT.SSD.CROP_KEEP_ORIGINAL = True
    # Range of the patch side scale s: the patch has area s^2 of the image (SSD: [0.1, 1] of
    # the image size; the SSD release samples s in [0.3, 1]).
    _C.INPUT.SSD.CROP_SCALE = (0.3, 1.0)
    # Range of the patch aspect ratio (w / h in normalised image coordinates; SSD: 1/2 .. 2).
    _C.INPUT.SSD.CROP_ASPECT_RANGE = (0.5, 2.0)
    # Patches tried per option before drawing another option.
    _C.INPUT.SSD.CROP_MAX_TRIALS = 50
    # Probability of a horizontal flip.
    _C.INPUT.SSD.FLIP_PROB = 0.5
    # Output side of the fixed resize (SSD300: 300).
    _C.INPUT.SSD.SIZE = 300
    # Boxes narrower or shorter than this (pixels, after the resize) are dropped.
    _C.INPUT.SSD.MIN_BOX_SIZE = 1.0


def _check_pair(cfg: CN, key: str, lo=None, hi=None) -> None:
    v = cfg.INPUT.SSD[key]
    if len(v) != 2 or v[0] > v[1] or (lo is not None and v[0] < lo) or (hi is not None and v[1] > hi):
        raise ConfigError(f"INPUT.SSD.{key} = {v!r}: must be (min, max) with min <= max"
                          f" within [{lo}, {hi}]")


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
    s = cfg.MODEL.SSD
    check_range(cfg, "MODEL.SSD.NUM_CLASSES", 1)
    check_range(cfg, "MODEL.SSD.INPUT_SIZE", 32)
    n = len(s.IN_FEATURES)
    if n == 0:
        raise ConfigError("MODEL.SSD.IN_FEATURES is empty; give the backbone features, e.g. "
                          f"{SSD_FEATURES}")
    for key in ("MIN_SIZES", "MAX_SIZES", "ASPECT_RATIOS"):
        if len(s[key]) != n:
            raise ConfigError(f"MODEL.SSD.{key} has {len(s[key])} entries; it needs one per "
                              f"MODEL.SSD.IN_FEATURES level ({n})")
    if len(s.STEPS) not in (0, n):
        raise ConfigError(f"MODEL.SSD.STEPS has {len(s.STEPS)} entries; give {n} or [] (automatic)")
    for lo, hi in zip(s.MIN_SIZES, s.MAX_SIZES):
        if not 0 < lo <= hi:
            raise ConfigError(f"MODEL.SSD.MIN_SIZES / MAX_SIZES = {s.MIN_SIZES} / {s.MAX_SIZES}: "
                              "need 0 < min <= max per level")
    for ars in s.ASPECT_RATIOS:
        if any(a < 1 for a in ars):
            raise ConfigError(f"MODEL.SSD.ASPECT_RATIOS = {s.ASPECT_RATIOS}: ratios must be >= 1 "
                              "(each ar adds ar and 1/ar)")
    if any(st <= 0 for st in s.STEPS):
        raise ConfigError(f"MODEL.SSD.STEPS = {s.STEPS}: must be > 0")
    check_range(cfg, "MODEL.SSD.OFFSET", 0, 1)
    check_range(cfg, "MODEL.SSD.IOU_THRESHOLD", 0, 1, lo_open=True)
    if len(s.BBOX_REG_WEIGHTS) != 4 or any(w <= 0 for w in s.BBOX_REG_WEIGHTS):
        raise ConfigError(f"MODEL.SSD.BBOX_REG_WEIGHTS = {s.BBOX_REG_WEIGHTS}: four values > 0")
    check_range(cfg, "MODEL.SSD.NEG_POS_RATIO", 0)
    check_range(cfg, "MODEL.SSD.SMOOTH_L1_BETA", 0)
    check_range(cfg, "MODEL.SSD.LOC_WEIGHT", 0)
    check_range(cfg, "MODEL.SSD.SCORE_THRESH_TEST", 0, 1)
    check_range(cfg, "MODEL.SSD.TOPK_CANDIDATES_TEST", 1)
    check_range(cfg, "MODEL.SSD.NMS_THRESH_TEST", 0, 1)
    check_range(cfg, "MODEL.SSD.DETECTIONS_PER_IMAGE", 1)

    check_range(cfg, "MODEL.VGG.WIDTH_MULT", 0, lo_open=True)
    check_choice(cfg, "MODEL.VGG.NORM", ["", "BN", "SyncBN", "naiveSyncBN", "GN"])
    check_choice(cfg, "MODEL.VGG.ACTIVATION", ["relu", "none"])
    check_choice(cfg, "MODEL.VGG.SHORTCUT", [True, False])
    check_choice(cfg, "MODEL.VGG.DOWNSAMPLE", ["maxpool", "strided_conv"])
    check_range(cfg, "MODEL.VGG.L2NORM_SCALE", 0, lo_open=True)
    check_range(cfg, "MODEL.MOBILENET_SSD.WIDTH_MULT", 0, lo_open=True)
    check_choice(cfg, "MODEL.MOBILENET_SSD.ACTIVATION", ["relu", "none"])

    for key in ("PHOTOMETRIC_PROB", "CHANNEL_SWAP_PROB", "EXPAND_PROB", "FLIP_PROB"):
        check_range(cfg, f"INPUT.SSD.{key}", 0, 1)
    check_range(cfg, "INPUT.SSD.BRIGHTNESS_DELTA", 0, 255)
    check_range(cfg, "INPUT.SSD.HUE_DELTA", 0, 180)
    _check_pair(cfg, "CONTRAST_RANGE", 0)
    _check_pair(cfg, "SATURATION_RANGE", 0)
    _check_pair(cfg, "CROP_SCALE", 0, 1)
    _check_pair(cfg, "CROP_ASPECT_RANGE", 0)
    check_range(cfg, "INPUT.SSD.EXPAND_MAX_RATIO", 1)
    if any(not 0 <= v < 1 for v in cfg.INPUT.SSD.CROP_MIN_IOUS):
        raise ConfigError(f"INPUT.SSD.CROP_MIN_IOUS = {cfg.INPUT.SSD.CROP_MIN_IOUS}: values in [0, 1)")
    if not cfg.INPUT.SSD.CROP_MIN_IOUS and not cfg.INPUT.SSD.CROP_KEEP_ORIGINAL:
        raise ConfigError("INPUT.SSD.CROP_MIN_IOUS is empty and INPUT.SSD.CROP_KEEP_ORIGINAL is "
                          "False: no crop option left")
    check_range(cfg, "INPUT.SSD.CROP_MAX_TRIALS", 1)
    check_range(cfg, "INPUT.SSD.SIZE", 32)
    check_range(cfg, "INPUT.SSD.MIN_BOX_SIZE", 0)
