"""An automatic attribute checker for shapes-world images: what objects are there, and are they
what the caption said?

`detect_objects` segments saturated pixels by hue into the world's six colours, splits each
colour into connected components, and reads off each component's shape (how much of its box
it fills, and whether it narrows towards the top), size and position. `check_scene` matches
the detections to a `Scene`'s objects and scores colour, shape, size, count and layout
(position / relation / left-to-right order). It knows nothing about any model, so it scores
the generator's own images (where it should be right) and a model's images alike.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from explain.embedded import world

_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360 for name, rgb in world.COLORS.items()}
MIN_SATURATION = 0.38
MIN_VALUE = 0.22
MAX_HUE_DISTANCE = 32.0
MIN_AREA_FRACTION = 0.006  # components smaller than this share of the image are specks


@dataclass
class Detection:
    color: str
    shape: str
    size: str
    cx: float  # centroid, fractions of width / height
    cy: float
    area: int
    fill: float  # area / bounding-box area
    mask: np.ndarray = field(repr=False)


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    return hue, sat, mx


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index into ``world.COLORS`` of its colour, or -1 for background."""
    hue, sat, val = _hsv(image)
    centres = np.array(list(_HUES.values()))
    dist = np.abs(hue[..., None] - centres)
    dist = np.minimum(dist, 360 - dist)
    label = dist.argmin(-1)
    ok = (sat >= MIN_SATURATION) & (val >= MIN_VALUE) & (dist.min(-1) <= MAX_HUE_DISTANCE)
    return np.where(ok, label, -1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(mask.sum()) / float(h * w)
    rows = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].sum(1)
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].mean(), rows[-third:].mean()
    if fill < 0.66 or top < 0.55 * bottom:
        return "triangle", fill
    return ("square" if fill >= 0.87 else "circle"), fill


def detect_objects(image: np.ndarray) -> list[Detection]:
    """The coloured objects in an RGB ``uint8`` image ``[H, W, 3]``, largest first."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    height, width = image.shape[:2]
    labels = color_labels(image)
    names = list(world.COLORS)
    min_area = MIN_AREA_FRACTION * height * width
    found = []
    split = (world.SIZES["small"] + world.SIZES["large"]) / 2
    for ci, name in enumerate(names):
        components, n = ndimage.label(labels == ci)
        for k in range(1, n + 1):
            mask = components == k
            area = int(mask.sum())
            if area < min_area:
                continue
            shape, fill = classify_shape(mask)
            ys, xs = np.nonzero(mask)
            extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(height, width)
            if shape == "square":
                extent /= 0.92  # squares are drawn a little inside their nominal extent
            found.append(
                Detection(
                    color=name,
                    shape=shape,
                    size="large" if extent >= split else "small",
                    cx=float(xs.mean() + 0.5) / width,
                    cy=float(ys.mean() + 0.5) / height,
                    area=area,
                    fill=fill,
                    mask=mask,
                )
            )
    return sorted(found, key=lambda d: -d.area)


@dataclass
class SceneCheck:
    count_ok: bool
    color_ok: list[bool]
    shape_ok: list[bool]
    size_ok: list[bool]
    layout_ok: bool
    matches: list[Detection | None]


def _match(objects, detections) -> list[Detection | None]:
    """One detection per expected object: same colour first, then same shape, then nearest."""
    costs = []
    for i, o in enumerate(objects):
        for j, d in enumerate(detections):
            cost = (0 if d.color == o.color else 100) + (0 if d.shape == o.shape else 10) + abs(d.cx - o.cx) + abs(d.cy - o.cy)
            costs.append((cost, i, j))
    matched: list[Detection | None] = [None] * len(objects)
    used: set[int] = set()
    for cost, i, j in sorted(costs):
        if matched[i] is None and j not in used and cost < 100:
            matched[i] = detections[j]
            used.add(j)
    return matched


def relation_of(a: Detection, b: Detection) -> str:
    """How ``a`` stands to ``b``: the larger of the vertical and horizontal offsets decides."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def position_of(d: Detection) -> str:
    return min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] - d.cx) ** 2 + (world.POSITIONS[p][1] - d.cy) ** 2)


def check_scene(image: np.ndarray, scene: world.Scene) -> SceneCheck:
    detections = detect_objects(image)
    matches = _match(scene.objects, detections)
    color_ok = [m is not None for m in matches]
    shape_ok = [m is not None and m.shape == o.shape for m, o in zip(matches, scene.objects)]
    size_ok = [m is not None and m.size == o.size for m, o in zip(matches, scene.objects)]
    layout_ok = False
    if all(m is not None for m in matches):
        kind, _, name = scene.layout.partition(":")
        if kind == "position":
            layout_ok = position_of(matches[0]) == name
        elif kind == "relation":
            layout_ok = relation_of(matches[0], matches[1]) == name
        elif kind == "row":
            layout_ok = [m.cx for m in matches] == sorted(m.cx for m in matches)
    return SceneCheck(len(detections) == len(scene.objects), color_ok, shape_ok, size_ok, layout_ok, matches)


@dataclass
class Scores:
    """Per-attribute accuracy over many scenes (colour, shape and size per object; count and
    layout per image)."""

    n_images: int = 0
    n_objects: int = 0
    color: int = 0
    shape: int = 0
    size: int = 0
    count: int = 0
    layout: int = 0

    def add(self, check: SceneCheck) -> None:
        self.n_images += 1
        self.n_objects += len(check.color_ok)
        self.color += sum(check.color_ok)
        self.shape += sum(check.shape_ok)
        self.size += sum(check.size_ok)
        self.count += int(check.count_ok)
        self.layout += int(check.layout_ok)

    def as_dict(self) -> dict[str, float]:
        o, i = max(self.n_objects, 1), max(self.n_images, 1)
        return {
            "color": self.color / o,
            "shape": self.shape / o,
            "size": self.size / o,
            "count": self.count / i,
            "position_relation": self.layout / i,
            "images": self.n_images,
            "objects": self.n_objects,
        }
