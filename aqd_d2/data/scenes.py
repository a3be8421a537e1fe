"""Scene content of the synthetic datasets: colours, shapes, backgrounds, drawing.

Used by :mod:`aqd_d2.data.synthetic` (which owns seeding, occlusion bookkeeping and files).
A scene is a list of items ``(category id or -1 for a distractor, primitives)`` drawn in
order; a primitive is ``(op, coordinates, colour, line width)`` with op one of ``"polygon"``
(xy = [(x, y), ...]), ``"ellipse"`` / ``"ring"`` (xy = [x0, y0, x1, y1]) or ``"line"``.

Shapes classes are a shape *and* a colour family (red circle, green square, blue triangle,
yellow star, magenta cross, cyan diamond); distractors are shapes of no class in any colour and class
shapes in no class's colour (greys, orange, violet), so neither cue alone is enough.
KITTI-like classes are told apart by shape (wide car with wheels, tall thin pedestrian,
cyclist on two rings) and size follows the distance to the horizon.
"""
from __future__ import annotations

import colorsys
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import ImageDraw

__all__ = [
    "SHAPE_CLASSES", "KITTI_CLASSES", "CLASS_NAMES", "Primitive", "SceneItem", "shapes_scene", "kitti_scene",
    "background", "paint", "primitive_extent",
]

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
KITTI_CLASSES: Tuple[str, ...] = ("car", "pedestrian", "cyclist")
#: Class names of each scene kind; an annotation's ``category_id`` indexes this tuple.
CLASS_NAMES = {"shapes": SHAPE_CLASSES, "kitti": KITTI_CLASSES}

RGB = Tuple[int, int, int]
Primitive = Tuple[str, list, RGB, int]
#: (category id, or -1 for a distractor; its primitives)
SceneItem = Tuple[int, List[Primitive]]


# ------------------------------------------------------------------------------ colours
def _hsv(hue: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


# red circle, green square, blue triangle, yellow star, magenta cross, cyan diamond (+-12 deg)
_CLASS_HUES = (0.0, 120.0, 240.0, 60.0, 300.0, 180.0)


def _class_colour(rng: np.random.Generator, cls: int) -> RGB:
    return _hsv(_CLASS_HUES[cls] + rng.uniform(-12, 12), rng.uniform(0.65, 1), rng.uniform(0.6, 1))


def _off_colour(rng: np.random.Generator) -> RGB:
    """A colour of no class: greys, orange (30 deg) or violet (270 deg)."""
    if rng.random() < 0.5:
        return _hsv(0.0, rng.uniform(0, 0.12), rng.uniform(0.2, 0.95))
    return _hsv(rng.choice([30.0, 270.0]) + rng.uniform(-6, 6), rng.uniform(0.5, 1), rng.uniform(0.5, 1))


def _any_colour(rng: np.random.Generator) -> RGB:
    return _hsv(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.2, 1))


# ------------------------------------------------------------------------------- shapes
def _rotated(points, cx: float, cy: float, angle: float) -> list:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _star_points(n: int, r: float, inner: Optional[float], rot: float) -> list:
    k = 2 * n if inner else n
    return [((r if not inner or i % 2 == 0 else r * inner) * math.cos(rot + 2 * math.pi * i / k),
             (r if not inner or i % 2 == 0 else r * inner) * math.sin(rot + 2 * math.pi * i / k))
            for i in range(k)]


def _box(cx: float, cy: float, w: float, h: float) -> list:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _circle(rng, cx, cy, s, c) -> List[Primitive]:
    return [("ellipse", _box(cx, cy, s, s), c, 0)]


def _square(rng, cx, cy, s, c) -> List[Primitive]:
    a = 0.45 * s
    corners = [(-a, -a), (a, -a), (a, a), (-a, a)]
    return [("polygon", _rotated(corners, cx, cy, math.radians(rng.uniform(-15, 15))), c, 0)]


def _triangle(rng, cx, cy, s, c) -> List[Primitive]:
    return [("polygon", _rotated(_star_points(3, s / 1.6, None, 0.0), cx, cy,
                                 rng.uniform(0, 2 * math.pi)), c, 0)]


def _star(rng, cx, cy, s, c) -> List[Primitive]:
    return [("polygon", _rotated(_star_points(5, s / 2, 0.45, 0.0), cx, cy,
                                 rng.uniform(0, 2 * math.pi)), c, 0)]


def _cross(rng, cx, cy, s, c) -> List[Primitive]:
    t, a = 0.18 * s, 0.5 * s
    pts = [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a), (-t, t),
           (-a, t), (-a, -t), (-t, -t)]
    return [("polygon", _rotated(pts, cx, cy, math.radians(rng.uniform(-15, 15))), c, 0)]


def _diamond(rng, cx, cy, s, c) -> List[Primitive]:
    a, b = 0.5 * s, 0.5 * s * rng.uniform(0.6, 1.0)  # a rhombus standing on a corner
    return [("polygon", _rotated([(0, -a), (b, 0), (0, a), (-b, 0)], cx, cy,
                                 math.radians(rng.uniform(-10, 10))), c, 0)]


def _ellipse(rng, cx, cy, s, c) -> List[Primitive]:
    if rng.random() < 0.5:
        return [("ellipse", _box(cx, cy, s, s / rng.uniform(1.8, 3)), c, 0)]
    return [("ellipse", _box(cx, cy, s / rng.uniform(1.8, 3), s), c, 0)]


def _ring(rng, cx, cy, s, c) -> List[Primitive]:
    return [("ring", _box(cx, cy, s, s), c, max(1, int(s * rng.uniform(0.08, 0.2))))]


def _bar(rng, cx, cy, s, c) -> List[Primitive]:
    return [("line", _rotated([(-s / 2, 0), (s / 2, 0)], cx, cy, rng.uniform(0, math.pi)), c,
             max(1, int(s * rng.uniform(0.08, 0.2))))]


def _rectangle(rng, cx, cy, s, c) -> List[Primitive]:
    w, h = s / 2, s / (2 * rng.uniform(1.8, 3))
    return [("polygon", _rotated([(-w, -h), (w, -h), (w, h), (-w, h)], cx, cy,
                                 rng.uniform(0, math.pi)), c, 0)]


def _pieslice(rng, cx, cy, s, c) -> List[Primitive]:
    a0, span = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(60, 200))
    arc = [(s / 2 * math.cos(a0 + span * i / 12), s / 2 * math.sin(a0 + span * i / 12)) for i in range(13)]
    return [("polygon", _rotated([(0.0, 0.0)] + arc, cx, cy, 0.0), c, 0)]


def _hexagon(rng, cx, cy, s, c) -> List[Primitive]:
    return [("polygon", _rotated(_star_points(6, s / 2, None, 0.0), cx, cy, rng.uniform(0, 1)), c, 0)]


_ShapeFn = Callable[[np.random.Generator, float, float, float, RGB], List[Primitive]]
_CLASS_SHAPES: Tuple[_ShapeFn, ...] = (_circle, _square, _triangle, _star, _cross, _diamond)
_DISTRACTOR_SHAPES: Tuple[_ShapeFn, ...] = (_ellipse, _ring, _bar, _rectangle, _pieslice, _hexagon)


def _sample_size(rng: np.random.Generator, height: int, width: int, small_prob: float) -> float:
    """Object size: log-uniform in [3 px, 1/8 side] with ``small_prob``, else up to 1/2 side."""
    side = min(height, width)
    lo, small, hi = max(3.0, 0.03 * side), max(4.0, 0.125 * side), 0.5 * side
    a, b = (lo, small) if rng.random() < small_prob else (small, hi)
    return float(math.exp(rng.uniform(math.log(a), math.log(b))))


def shapes_scene(rng: np.random.Generator, height: int, width: int, n_objects: int,
                 force_class: Optional[int], max_distractors: int) -> List[SceneItem]:
    """Items of a shapes scene in drawing order.

    Args:
        rng: random generator.
        height, width: image size in pixels.
        n_objects: number of randomly placed objects (may be partly outside the image).
        force_class: if not None, one more object of this class, fully inside, drawn last.
        max_distractors: up to this many distractor items.

    Returns:
        the list of :data:`SceneItem`.
    """
    items: List[SceneItem] = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        s = _sample_size(rng, height, width, 0.3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        items.append((cls, _CLASS_SHAPES[cls](rng, cx, cy, s, _class_colour(rng, cls))))
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        s = _sample_size(rng, height, width, 0.3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.35:  # a class shape in no class's colour
            fn = _CLASS_SHAPES[int(rng.integers(len(_CLASS_SHAPES)))]
            items.append((-1, fn(rng, cx, cy, s, _off_colour(rng))))
        else:
            fn = _DISTRACTOR_SHAPES[int(rng.integers(len(_DISTRACTOR_SHAPES)))]
            items.append((-1, fn(rng, cx, cy, s, _any_colour(rng))))
    items = [items[i] for i in rng.permutation(len(items))]
    if force_class is not None:  # drawn last and fully inside: always visible
        s = min(_sample_size(rng, height, width, 0.3), 0.9 * min(height, width))
        cx, cy = rng.uniform(s / 2, width - s / 2), rng.uniform(s / 2, height - s / 2)
        items.append((force_class, _CLASS_SHAPES[force_class](rng, cx, cy, s, _class_colour(rng, force_class))))
    return items


# ------------------------------------------------------------------------ kitti scenes
def _car(rng, cx, yb, h, c) -> List[Primitive]:
    w = h * rng.uniform(1.3, 2.6)
    x0, dark, rw = cx - w / 2, _hsv(0, 0, rng.uniform(0.05, 0.2)), 0.16 * h
    cabin = [(x0 + 0.18 * w, yb - 0.7 * h), (x0 + 0.3 * w, yb - h), (x0 + 0.72 * w, yb - h),
             (x0 + 0.86 * w, yb - 0.7 * h)]
    window = [(x + (cx - x) * 0.15, y + 0.12 * h) for x, y in cabin]
    return [("polygon", [(x0, yb - 0.72 * h), (x0 + w, yb - 0.72 * h), (x0 + w, yb - 0.15 * h),
                         (x0, yb - 0.15 * h)], c, 0),
            ("polygon", cabin, c, 0), ("polygon", window, _hsv(210, 0.2, rng.uniform(0.3, 0.8)), 0),
            ("ellipse", _box(x0 + 0.2 * w, yb - rw, 2 * rw, 2 * rw), dark, 0),
            ("ellipse", _box(x0 + 0.8 * w, yb - rw, 2 * rw, 2 * rw), dark, 0)]


def _pedestrian(rng, cx, yb, h, c) -> List[Primitive]:
    w, step = h * rng.uniform(0.28, 0.4), rng.uniform(-0.15, 0.15) * h
    pants, skin = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.1, 0.5)), \
        _hsv(rng.uniform(15, 35), rng.uniform(0.3, 0.6), rng.uniform(0.4, 0.95))
    leg = max(1, int(0.3 * w))
    r = min(0.09 * h, 0.4 * w)
    return [("line", [(cx, yb - 0.5 * h), (cx - step / 2, yb - leg / 2)], pants, leg),
            ("line", [(cx, yb - 0.5 * h), (cx + step / 2, yb - leg / 2)], pants, leg),
            ("polygon", [(cx - w / 2, yb - 0.8 * h), (cx + w / 2, yb - 0.8 * h),
                         (cx + 0.4 * w, yb - 0.45 * h), (cx - 0.4 * w, yb - 0.45 * h)], c, 0),
            ("ellipse", _box(cx, yb - h + r, 2 * r, 2 * r), skin, 0)]


def _cyclist(rng, cx, yb, h, c) -> List[Primitive]:
    w = h * rng.uniform(0.8, 1.0)
    r, lw = min(0.25 * w, 0.24 * h), max(1, int(0.06 * h))
    back, front, seat = (cx - w / 2 + r, yb - r), (cx + w / 2 - r, yb - r), (cx - 0.05 * w, yb - 0.5 * h)
    bike, skin = _any_colour(rng), _hsv(rng.uniform(15, 35), 0.4, rng.uniform(0.4, 0.95))
    shoulder, hr = (cx + 0.12 * w, yb - 0.8 * h), 0.09 * h
    return [("ring", _box(*back, 2 * r, 2 * r), _hsv(0, 0, 0.1), lw),
            ("ring", _box(*front, 2 * r, 2 * r), _hsv(0, 0, 0.1), lw),
            ("line", [back, seat, front, back], bike, lw),
            ("line", [seat, (front[0] - 0.3 * r, yb - r)], _hsv(0, 0, 0.2), lw),
            ("line", [seat, shoulder], c, max(1, int(0.14 * h))),
            ("ellipse", _box(shoulder[0] + 0.02 * w, yb - h + hr, 2 * hr, 2 * hr), skin, 0)]


def _kitti_distractor(rng, cx, yb, k, height) -> List[Primitive]:
    grey, h = _hsv(0, 0, rng.uniform(0.2, 0.7)), 0.6 * height * k
    kind = int(rng.integers(4))
    if kind == 0:  # pole, optionally with a sign on top
        prims = [("line", [(cx, yb), (cx, yb - h)], grey, max(1, int(0.04 * h)))]
        if rng.random() < 0.6:
            prims += _ring(rng, cx, yb - h, 0.2 * h, _any_colour(rng)) if rng.random() < 0.5 else \
                _hexagon(rng, cx, yb - h, 0.2 * h, _any_colour(rng))
        return prims
    if kind == 1:  # tree: trunk and crown
        return [("line", [(cx, yb), (cx, yb - 0.5 * h)], _hsv(30, 0.6, 0.35), max(1, int(0.06 * h))),
                ("ellipse", _box(cx, yb - 0.75 * h, 0.6 * h, 0.6 * h), _hsv(rng.uniform(90, 150), 0.6, 0.4), 0)]
    if kind == 2:  # box / container: a car-sized block without wheels
        w = 0.5 * h * rng.uniform(0.8, 2.5)
        return [("polygon", [(cx - w / 2, yb - 0.5 * h), (cx + w / 2, yb - 0.5 * h), (cx + w / 2, yb),
                             (cx - w / 2, yb)], _any_colour(rng), 0)]
    return _ellipse(rng, cx, yb - 0.2 * h, 0.5 * h, _hsv(rng.uniform(80, 160), 0.5, 0.35))  # bush


def kitti_scene(rng: np.random.Generator, height: int, width: int, n_objects: int,
                force_class: Optional[int], max_distractors: int, horizon: float) -> List[SceneItem]:
    """Items of a KITTI-like road scene, far to near (nearer items occlude farther ones).

    Args:
        rng: random generator.
        height, width: image size in pixels.
        n_objects: number of objects (car / pedestrian / cyclist).
        force_class: if not None, one more object of this class, near, drawn last.
        max_distractors: up to this many distractors (poles, signs, trees, boxes, bushes).
        horizon: y of the horizon; objects stand on the road below it.

    Returns:
        the list of :data:`SceneItem`.
    """
    makers, scale = (_car, _pedestrian, _cyclist), (0.4, 0.55, 0.5)
    floor = max(0.06, 4.0 / (0.4 * height))  # the smallest cars are ~4 px tall
    placed = []  # (bottom y, category, primitives)
    for _ in range(n_objects):
        cls = int(rng.integers(len(KITTI_CLASSES)))
        k = math.exp(rng.uniform(math.log(floor), 0.0))
        yb = horizon + k * (height - horizon) * 1.02
        placed.append((yb, cls, makers[cls](rng, rng.uniform(0, width), yb, scale[cls] * height * k,
                                           _any_colour(rng))))
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        k = math.exp(rng.uniform(math.log(floor), 0.0))
        yb = horizon + k * (height - horizon) * 1.02
        placed.append((yb, -1, _kitti_distractor(rng, rng.uniform(0, width), yb, k, height)))
    placed.sort(key=lambda t: t[0])  # far to near: nearer objects occlude farther ones
    items: List[SceneItem] = [(cls, prims) for _, cls, prims in placed]
    if force_class is not None:  # nearest and drawn last: always visible
        k = rng.uniform(0.35, 0.9)
        h = scale[force_class] * height * k
        cx = rng.uniform(0.5 * h, max(0.5 * h, width - 0.5 * h) + 1e-3)
        items.append((force_class, makers[force_class](rng, cx, horizon + k * (height - horizon), h,
                                                       _any_colour(rng))))
    return items


# ---------------------------------------------------------------------------- rendering
def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw, C) grid to (height, width, C)."""
    gh, gw = grid.shape[:2]
    ys, xs = np.linspace(0, gh - 1, height), np.linspace(0, gw - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def background(rng: np.random.Generator, height: int, width: int,
               horizon: Optional[float]) -> np.ndarray:
    """A cluttered background: gradient (or sky/road), low-frequency noise, maybe a texture.

    Args:
        rng: random generator.
        height, width: image size in pixels.
        horizon: None for a shapes background, else the y of a KITTI-like horizon.

    Returns:
        float array of shape (height, width, 3), roughly in [0, 255] (not clipped).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if horizon is None:  # gradient between two muted colours at a random angle
        c0, c1 = (np.array(_hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.25, 0.85)),
                           np.float32) for _ in range(2))
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    else:  # sky above the horizon, road below
        sky, road = np.array(_hsv(rng.uniform(190, 230), rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.95)),
                             np.float32), np.array(_hsv(0, 0, rng.uniform(0.25, 0.5)), np.float32)
        c0, c1, t = sky, road, (yy > horizon).astype(np.float32)[..., None]
    img = c0 * (1 - t) + c1 * t
    grid = rng.normal(0, rng.uniform(8, 30), (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
    img = img + _upsample(grid, height, width)
    if rng.random() < 0.5:  # texture: stripes or checkers
        period, b = rng.uniform(3, 16), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(b) + yy * math.sin(b)) / period)
        if rng.random() < 0.4:
            wave = np.sign(np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / period))
        img = img + (rng.uniform(6, 25) * wave)[..., None]
    return img


def paint(draw: ImageDraw.ImageDraw, prims: Sequence[Primitive], override=None) -> None:
    """Draw primitives with their colours, or all with ``override`` (e.g. 255 for a mask).

    Args:
        draw: a Pillow drawing context.
        prims: the primitives.
        override: colour replacing every primitive's colour, or None.

    Returns:
        None.
    """
    for op, xy, colour, width in prims:
        fill = colour if override is None else override
        if op == "polygon":
            draw.polygon(xy, fill=fill)
        elif op == "ellipse":
            draw.ellipse(xy, fill=fill)
        elif op == "ring":
            draw.ellipse(xy, outline=fill, width=width)
        elif op == "line":
            draw.line(xy, fill=fill, width=width)
        else:
            raise ValueError(f"unknown primitive {op!r}")


def primitive_extent(prims: Sequence[Primitive]) -> Tuple[float, float, float, float]:
    """Nominal (unclipped) extent of primitives, to tell whether the border cuts an item.

    Args:
        prims: the primitives.

    Returns:
        (x0, y0, x1, y1) in pixels, possibly outside the image.
    """
    xs, ys = [], []
    for op, xy, _, width in prims:
        pts = xy if op in ("polygon", "line") else [(xy[0], xy[1]), (xy[2], xy[3])]
        pad = width / 2 if op == "line" else 0.0
        xs += [p[0] - pad for p in pts] + [p[0] + pad for p in pts]
        ys += [p[1] - pad for p in pts] + [p[1] + pad for p in pts]
    return min(xs), min(ys), max(xs), max(ys)
