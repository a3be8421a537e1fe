"""Draw ground truth and detections on images (PNG output for demos and exported models)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["draw_boxes", "save_grid"]

GT_COLOR = (40, 220, 40)
PRED_COLOR = (240, 40, 40)


def draw_boxes(
    image: np.ndarray,
    class_names: Sequence[str],
    gt_boxes: Optional[np.ndarray] = None,
    gt_classes: Optional[np.ndarray] = None,
    pred_boxes: Optional[np.ndarray] = None,
    pred_classes: Optional[np.ndarray] = None,
    pred_scores: Optional[np.ndarray] = None,
    score_thresh: float = 0.3,
    scale: int = 3,
) -> np.ndarray:
    """Return an RGB uint8 image with ground truth (green) and predictions (red, with score).

    Args:
        image: HxWx3 uint8 RGB image.
        class_names: names indexed by class id.
        gt_boxes / pred_boxes: Nx4 XYXY absolute boxes (in ``image`` coordinates).
        gt_classes / pred_classes: N class ids; pred_scores: N scores.
        score_thresh: predictions below it are not drawn.
        scale: integer upscaling so small images stay readable.
    Returns:
        (H*scale)x(W*scale)x3 uint8 array.
    """
    pil = Image.fromarray(image).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(pil)

    def _name(c) -> str:
        c = int(c)
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    if gt_boxes is not None:
        for i, box in enumerate(np.asarray(gt_boxes, dtype=np.float64)):
            draw.rectangle([float(v) * scale for v in box], outline=GT_COLOR, width=2)
            if gt_classes is not None:
                draw.text((box[0] * scale + 2, box[3] * scale - 11), _name(gt_classes[i]), fill=GT_COLOR)
    if pred_boxes is not None:
        for i, box in enumerate(np.asarray(pred_boxes, dtype=np.float64)):
            score = 1.0 if pred_scores is None else float(pred_scores[i])
            if score < score_thresh:
                continue
            draw.rectangle([float(v) * scale for v in box], outline=PRED_COLOR, width=1)
            label = _name(pred_classes[i]) if pred_classes is not None else ""
            draw.text((box[0] * scale + 2, box[1] * scale + 1), f"{label} {score:.2f}", fill=PRED_COLOR)
    return np.asarray(pil)


def save_grid(images: List[np.ndarray], path: str, columns: int = 3, pad: int = 4) -> str:
    """Tile equally-sized-or-not RGB images into one PNG at ``path``; returns ``path``."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + im.shape[0], x:x + im.shape[1]] = im
    Image.fromarray(canvas).save(path)
    return path
