"""The shapes world: a seeded, deterministic generator of captioned images with ground truth.

Each `Scene` holds 1-3 flat-coloured objects (circle, square, triangle; six colours; two
sizes) placed on a gently textured background, and a caption that says where they are
("a small red circle on the left", "a large blue square above a small green triangle",
"a red circle, a blue square and a green triangle from left to right"). `render` draws a
scene and returns the image together with one mask per object, so that an explanation's
heatmap can be scored against where the object really is.

The world serves twice: it is the training data of the embedded model
(`explain.embedded`), and it is the project's ground-truth benchmark for explanations.
Attribute combinations are split into a training part and a held-out part by a fixed hash
(`is_held_out`), so that a benchmark can ask for captions the model never saw.

Geometry is given as fractions of the image side, so a scene renders at any size.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

GENERATOR_VERSION = "shapes-1"

# RGB in 0..1. Hues are spread around the colour wheel so that a hue test separates them.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.12),
    "yellow": (0.92, 0.80, 0.10),
    "green": (0.16, 0.70, 0.22),
    "cyan": (0.10, 0.78, 0.82),
    "blue": (0.14, 0.26, 0.88),
    "purple": (0.60, 0.20, 0.80),
}
SHAPES = ("circle", "square", "triangle")
# Object extent (diameter / side) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.22, "large": 0.36}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}

# Single-object positions: caption phrase -> (centre x, centre y) as fractions.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
# Two-object relations: A <relation> B.
RELATIONS = ("above", "below", "left of", "right of")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
}
ROW_PHRASES = ("from left to right", "in a row")
PREFIXES = ("", "a picture of ", "an image of ")

HELD_OUT_MODULUS = 10  # one attribute combination in ten is held out of training


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, fractions of the image width / height
    cy: float

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    def phrase(self, with_size: bool = True, size_word: str | None = None, article: str = "a") -> str:
        words = [article]
        if with_size:
            words.append(size_word or self.size)
        words += [self.color, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Background:
    base: tuple[float, float, float]
    gradient_angle: float
    gradient_strength: float
    texture: tuple[tuple[float, float, float, float], ...]  # (fx, fy, phase, amplitude) per wave


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    layout: str  # "position:<name>", "relation:<name>" or "row"
    background: Background = field(compare=False)

    @property
    def key(self) -> tuple:
        """The attribute combination the caption states (what `is_held_out` splits on)."""
        if len(self.objects) == 1:
            o = self.objects[0]
            return ("one", o.color, o.shape, o.size, self.layout)
        if len(self.objects) == 2:
            a, b = self.objects
            return ("two", a.color, a.shape, a.size, self.layout, b.color, b.shape, b.size)
        return ("row",) + tuple((o.color, o.shape) for o in self.objects)


def is_held_out(key: tuple) -> bool:
    """Whether an attribute combination belongs to the held-out split (fixed, seed-free)."""
    return zlib.crc32(repr(key).encode()) % HELD_OUT_MODULUS == 0


# ---------------------------------------------------------------------------- sampling
def _sample_background(rng: random.Random) -> Background:
    level = rng.uniform(0.50, 0.80)
    tint = [rng.uniform(-0.04, 0.04) for _ in range(3)]
    base = tuple(min(1.0, max(0.0, level + t)) for t in tint)
    waves = tuple(
        (rng.uniform(1.0, 6.0) * rng.choice((-1, 1)), rng.uniform(1.0, 6.0), rng.uniform(0, 2 * math.pi), rng.uniform(0.015, 0.04))
        for _ in range(2)
    )
    return Background(base=base, gradient_angle=rng.uniform(0, 2 * math.pi), gradient_strength=rng.uniform(0.05, 0.15), texture=waves)


def _jitter(rng: random.Random, amount: float) -> float:
    return rng.uniform(-amount, amount)


def _pick_object(rng: random.Random, size: str | None = None) -> tuple[str, str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLORS)), size or rng.choice(list(SIZES))


def _one_object(rng: random.Random) -> tuple[tuple[ShapeObject, ...], str, list[str]]:
    shape, color, size = _pick_object(rng)
    where = rng.choice(list(POSITIONS))
    x, y = POSITIONS[where]
    j = 0.08 if size == "small" else 0.04
    obj = ShapeObject(shape, color, size, x + _jitter(rng, j), y + _jitter(rng, j))
    return (obj,), f"position:{where}", [rng.choice(POSITION_PHRASES[where])]


def _two_objects(rng: random.Random) -> tuple[tuple[ShapeObject, ...], str, list[str]]:
    relation = rng.choice(RELATIONS)
    (sa, ca, za), (sb, cb, zb) = _pick_object(rng), _pick_object(rng)
    while (sa, ca) == (sb, cb):
        sb, cb, zb = _pick_object(rng)
    near, far = 0.27, 0.73
    along = [near + _jitter(rng, 0.04), far + _jitter(rng, 0.04)]
    across = [0.5 + _jitter(rng, 0.12), 0.5 + _jitter(rng, 0.12)]
    first, second = (0, 1) if relation in ("above", "left of") else (1, 0)
    if relation in ("above", "below"):
        pa, pb = (across[0], along[first]), (across[1], along[second])
    else:
        pa, pb = (along[first], across[0]), (along[second], across[1])
    objs = (ShapeObject(sa, ca, za, *pa), ShapeObject(sb, cb, zb, *pb))
    return objs, f"relation:{relation}", [rng.choice(RELATION_PHRASES[relation])]


def _three_objects(rng: random.Random) -> tuple[tuple[ShapeObject, ...], str, list[str]]:
    picks: list[tuple[str, str, str]] = []
    while len(picks) < 3:
        p = _pick_object(rng, size="small")
        if all((p[0], p[1]) != (q[0], q[1]) for q in picks):
            picks.append(p)
    xs = (0.2, 0.5, 0.8)
    objs = tuple(ShapeObject(s, c, z, x + _jitter(rng, 0.03), 0.5 + _jitter(rng, 0.2)) for (s, c, z), x in zip(picks, xs))
    return objs, "row", [rng.choice(ROW_PHRASES)]


def _caption(rng: random.Random, objs: tuple[ShapeObject, ...], layout_words: list[str]) -> str:
    def phrase(o: ShapeObject, with_size: bool) -> str:
        return o.phrase(with_size=with_size, size_word=rng.choice(SIZE_WORDS[o.size]))

    prefix = rng.choice(PREFIXES)
    if len(objs) == 1:
        body = f"{phrase(objs[0], True)} {layout_words[0]}"
    elif len(objs) == 2:
        body = f"{phrase(objs[0], True)} {layout_words[0]} {phrase(objs[1], True)}"
    else:
        a, b, c = (phrase(o, False) for o in objs)
        body = f"{a}, {b} and {c} {layout_words[0]}"
    return prefix + body


def sample_scene(rng: random.Random, split: str = "train", num_objects: int | None = None) -> Scene:
    """Draw one scene. ``split`` is "train" (never a held-out combination), "held_out"
    (only held-out combinations) or "any"."""
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', got {split!r}")
    if num_objects not in (None, 1, 2, 3):
        raise ValueError(f"num_objects must be 1, 2, 3 or None, got {num_objects!r}")
    makers = {1: _one_object, 2: _two_objects, 3: _three_objects}
    for _ in range(10_000):
        n = num_objects or rng.choices((1, 2, 3), weights=(0.3, 0.5, 0.2))[0]
        objs, layout, words = makers[n](rng)
        background = _sample_background(rng)
        scene = Scene(objs, _caption(rng, objs, words), layout, background)
        held = is_held_out(scene.key)
        if split == "any" or held == (split == "held_out"):
            return scene
    raise RuntimeError("could not draw a scene for this split")  # pragma: no cover


def scene_from_seed(seed: int, split: str = "train", num_objects: int | None = None) -> Scene:
    """The scene for an integer seed: the same seed always gives the same scene."""
    return sample_scene(random.Random(f"{GENERATOR_VERSION}:{seed}"), split, num_objects)


def scenes(n: int, seed: int = 0, split: str = "train", num_objects: int | None = None) -> list[Scene]:
    rng = random.Random(f"{GENERATOR_VERSION}:list:{seed}")
    return [sample_scene(rng, split, num_objects) for _ in range(n)]


# ---------------------------------------------------------------------------- rendering
def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx, yy


def _signed_distance(shape: str, xx: torch.Tensor, yy: torch.Tensor, cx, cy, extent) -> torch.Tensor:
    """Signed distance (fractions of the side; negative inside) to an upright shape."""
    dx, dy = xx - cx, yy - cy
    half = extent / 2
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - half
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - half * 0.92  # equal area-ish to the circle's box
    if shape == "triangle":
        # Isosceles triangle, apex up, base at the bottom of its box.
        k = 2 * half / math.hypot(half, 2 * half)  # normalises the slanted edges' distance
        base = dy - half
        slant = (2 * dx.abs() - (dy + half)) * (k / 2)
        return torch.maximum(base, slant)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(bg: Background, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    g = (math.cos(bg.gradient_angle) * (xx - 0.5) + math.sin(bg.gradient_angle) * (yy - 0.5)) * 2 * bg.gradient_strength
    tex = sum(a * torch.sin(2 * math.pi * (fx * xx + fy * yy) + ph) for fx, fy, ph, a in bg.texture)
    base = torch.tensor(bg.base, device=xx.device).view(3, 1, 1)
    return (base + (g + tex).unsqueeze(0)).clamp(0, 1)


def render_tensor(scene: Scene, size: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``scene``: an image ``[3, size, size]`` in 0..1 and per-object coverage ``[K, size, size]`` in 0..1."""
    xx, yy = _grid(size, device)
    image = _background(scene.background, xx, yy)
    pixel = 1.0 / size
    covers = []
    for obj in scene.objects:
        d = _signed_distance(obj.shape, xx, yy, obj.cx, obj.cy, obj.extent)
        cover = (0.5 - d / pixel).clamp(0, 1)  # one-pixel anti-aliased edge
        shade = 1.0 - 0.12 * (yy - obj.cy) / obj.extent  # lit from above: a little detail
        color = torch.tensor(COLORS[obj.color], device=device).view(3, 1, 1) * shade.unsqueeze(0)
        image = image * (1 - cover) + color.clamp(0, 1) * cover
        covers.append(cover)
    return image, (torch.stack(covers) if covers else torch.zeros(0, size, size, device=device))


def render(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``: an RGB ``uint8`` image ``[size, size, 3]`` and boolean masks ``[K, size, size]``,
    one per object in caption order (a pixel belongs to an object when it covers half of it)."""
    image, covers = render_tensor(scene, size)
    img = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return img, (covers >= 0.5).numpy()


def scene_parameters(batch: list[Scene]) -> dict[str, torch.Tensor]:
    """The numbers `render_parameters` needs, stacked over a batch of scenes (up to 3 objects)."""
    k = 3
    shape, color, extent, cx, cy, present = ([] for _ in range(6))
    base, angle, strength, waves = [], [], [], []
    for scene in batch:
        objs = list(scene.objects) + [None] * (k - len(scene.objects))
        shape.append([SHAPES.index(o.shape) if o else 0 for o in objs])
        color.append([COLORS[o.color] if o else (0.0, 0.0, 0.0) for o in objs])
        extent.append([o.extent if o else 0.0 for o in objs])
        cx.append([o.cx if o else 0.0 for o in objs])
        cy.append([o.cy if o else 0.0 for o in objs])
        present.append([1.0 if o else 0.0 for o in objs])
        bg = scene.background
        base.append(bg.base)
        angle.append(bg.gradient_angle)
        strength.append(bg.gradient_strength)
        waves.append(bg.texture)
    f = torch.float32
    return {
        "shape": torch.tensor(shape, dtype=torch.long),
        "color": torch.tensor(color, dtype=f),
        "extent": torch.tensor(extent, dtype=f),
        "cx": torch.tensor(cx, dtype=f),
        "cy": torch.tensor(cy, dtype=f),
        "present": torch.tensor(present, dtype=f),
        "base": torch.tensor(base, dtype=f),
        "angle": torch.tensor(angle, dtype=f),
        "strength": torch.tensor(strength, dtype=f),
        "waves": torch.tensor(waves, dtype=f),
    }


def coverage_parameters(params: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Vectorised per-object coverage of `render_tensor`: ``[B, 3, size, size]`` in 0..1 (absent
    objects cover nothing), in caption order."""
    p = params
    xx, yy = _grid(size, p["base"].device)
    xx, yy = xx[None, None], yy[None, None]  # [1, 1, H, W]
    cx, cy, ext = (p[n].view(*p[n].shape, 1, 1) for n in ("cx", "cy", "extent"))
    dx, dy, half = xx - cx, yy - cy, ext / 2
    circle = torch.sqrt(dx * dx + dy * dy) - half
    square = torch.maximum(dx.abs(), dy.abs()) - half * 0.92
    k = 2 * half / torch.sqrt(half * half + 4 * half * half)
    triangle = torch.maximum(dy - half, (2 * dx.abs() - (dy + half)) * (k / 2))
    shape = p["shape"].view(*p["shape"].shape, 1, 1)
    d = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    return (0.5 - d * size).clamp(0, 1) * p["present"].view(*p["present"].shape, 1, 1)


def render_parameters(params: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Vectorised `render_tensor` over a batch (for training on a GPU): images ``[B, 3, size, size]`` in 0..1."""
    p = params
    xx, yy = _grid(size, p["base"].device)
    xx, yy = xx[None, None], yy[None, None]  # [1, 1, H, W]
    angle, strength = p["angle"].view(-1, 1, 1), p["strength"].view(-1, 1, 1)
    g = (torch.cos(angle) * (xx[0] - 0.5) + torch.sin(angle) * (yy[0] - 0.5)) * 2 * strength
    w = p["waves"].view(-1, 2, 4, 1, 1)
    tex = (w[:, :, 3] * torch.sin(2 * math.pi * (w[:, :, 0] * xx + w[:, :, 1] * yy) + w[:, :, 2])).sum(1)
    image = (p["base"].view(-1, 3, 1, 1) + (g + tex).unsqueeze(1)).clamp(0, 1)
    cy, ext = (p[n].view(*p[n].shape, 1, 1) for n in ("cy", "extent"))
    cover = coverage_parameters(params, size)  # [B, K, H, W]
    shade = 1.0 - 0.12 * (yy - cy) / ext.clamp_min(1e-6)
    for j in range(cover.shape[1]):
        color = (p["color"][:, j].view(-1, 3, 1, 1) * shade[:, j : j + 1]).clamp(0, 1)
        c = cover[:, j : j + 1]
        image = image * (1 - c) + color * c
    return image


def render_batch(batch: list[Scene], size: int = 64, device="cpu") -> torch.Tensor:
    """Images ``[B, 3, size, size]`` in -1..1, as diffusion training wants them."""
    params = {k: v.to(device) for k, v in scene_parameters(batch).items()}
    return render_parameters(params, size) * 2 - 1


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, in a fixed order."""
    words: list[str] = []
    parts = [*PREFIXES, *SIZE_WORDS.values(), *COLORS, *SHAPES, *POSITION_PHRASES.values(), *RELATION_PHRASES.values(), *ROW_PHRASES, "a", "and", ","]
    for part in parts:
        for phrase in (part if isinstance(part, tuple) else (part,)):
            for w in phrase.replace(",", " , ").split():
                if w not in words:
                    words.append(w)
    return words


def caption_words(caption: str) -> list[str]:
    """The caption's words as the tokenizer splits them (commas are words of their own)."""
    return caption.replace(",", " ,").split()


def object_word_indices(scene: Scene) -> list[list[int]]:
    """For each object, the positions in `caption_words` of the words that name it (its size,
    colour and shape words), so a heatmap of those words can be scored against its mask."""
    words = caption_words(scene.caption)
    spans: list[list[int]] = []
    start = 0
    for obj in scene.objects:
        shape_at = words.index(obj.shape, start)
        color_at = words.index(obj.color, start)
        span = [color_at, shape_at]
        if color_at > 0 and words[color_at - 1] in {w for ws in SIZE_WORDS.values() for w in ws}:
            span.insert(0, color_at - 1)
        spans.append(span)
        start = shape_at + 1
    return spans
