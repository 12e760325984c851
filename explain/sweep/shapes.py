"""Ground-truth mode on the shapes world: the world's scenes as the prompt file, and the masks
and attributes that score the explanations of each generated image.

`scene_rows(n, split, seed)` gives one row per scene (id ``scene-<split>-<seed>-<i>``, the caption
as prompt, the scene itself as the ``scene`` ground-truth field), the same rows a JSON-lines file
written by `write_rows` gives back. Scoring works on the *generated* image: the attribute
checker (`explain.embedded.checker`) segments it and matches its objects to the caption's,
so each object found has a mask of where the model drew it, and each attribute a verdict.
Objects the checker cannot find are counted as missing, never scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from explain.embedded import world
from explain.sweep.prompts import PromptRow

SPLITS = ("train", "held_out", "any")


def scene_to_json(scene: world.Scene) -> dict:
    bg = scene.background
    return {
        "caption": scene.caption,
        "layout": scene.layout,
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cx": o.cx, "cy": o.cy} for o in scene.objects],
        "background": {"base": list(bg.base), "gradient_angle": bg.gradient_angle, "gradient_strength": bg.gradient_strength, "texture": [list(t) for t in bg.texture]},
        "held_out": world.is_held_out(scene.key),
    }


def scene_from_json(data: dict) -> world.Scene:
    """The `Scene` of a row's ``scene`` field; raises ``ValueError`` saying which part is wrong."""
    try:
        objects = tuple(world.ShapeObject(str(o["shape"]), str(o["color"]), str(o["size"]), float(o["cx"]), float(o["cy"])) for o in data["objects"])
        bg = data.get("background") or {"base": (0.65, 0.65, 0.65), "gradient_angle": 0.0, "gradient_strength": 0.0, "texture": ()}
        background = world.Background(
            base=tuple(float(v) for v in bg["base"]),
            gradient_angle=float(bg["gradient_angle"]),
            gradient_strength=float(bg["gradient_strength"]),
            texture=tuple(tuple(float(v) for v in t) for t in bg["texture"]),
        )
        scene = world.Scene(objects, str(data["caption"]), str(data["layout"]), background)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the row's 'scene' field is not a shapes-world scene ({type(exc).__name__}: {exc})") from None
    for o in objects:
        if o.shape not in world.SHAPES or o.color not in world.COLORS or o.size not in world.SIZES:
            raise ValueError(f"the row's scene has an object the world does not know: {o.size} {o.color} {o.shape}")
    if not 1 <= len(objects) <= 3:
        raise ValueError(f"a shapes-world scene has 1 to 3 objects, this one has {len(objects)}")
    return scene


def scene_rows(n: int, split: str = "held_out", seed: int = 0) -> list[PromptRow]:
    """``n`` scenes of ``split`` as sweep rows; the first k rows are the same for any n >= k."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"--shapes-world needs at least 1 scene, got {n}")
    scenes = world.scenes(n, seed=seed, split=split)
    return [
        PromptRow(id=f"scene-{split.replace('_', '')}-{seed}-{i:05d}", index=i, prompt=s.caption, line=i + 1, truth={"scene": scene_to_json(s)})
        for i, s in enumerate(scenes)
    ]


def write_rows(rows: list[PromptRow], path: Path) -> Path:
    """The rows as a JSON-lines prompt file (which `read_prompts` reads back to the same rows)."""
    from explain.sweep.manifest import atomic_write_text

    lines = [json.dumps({"id": r.id, "prompt": r.prompt, **({"seed": r.seed} if r.seed is not None else {}), **r.truth}) for r in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def row_scene(row: PromptRow) -> world.Scene | None:
    data = row.truth.get("scene") if row.truth else None
    if data is None:
        return None
    if isinstance(data, str):  # a CSV column holding the scene as JSON text
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the row's 'scene' field is not JSON ({exc.msg})") from None
    return scene_from_json(data)


def object_words(trace, scene: world.Scene, item: int = 0) -> list[list[int]] | None:
    """Indices into the trace's word list of each object's words (size, colour, shape), or None
    when the trace split the caption differently from the world's grammar."""
    words = [w.text.lower() for w in trace.words[item]]
    caption = [w.lower() for w in world.caption_words(scene.caption)]
    if words != caption:
        return None
    return world.object_word_indices(scene)


def object_word_positions(trace, scene: world.Scene, item: int = 0) -> list[dict[str, int]] | None:
    """For each object, the index into the trace's word list of its colour, shape and size words."""
    words = [w.text.lower() for w in trace.words[item]]
    caption = [w.lower() for w in world.caption_words(scene.caption)]
    if words != caption:
        return None
    out = []
    size_words = {w for ws in world.SIZE_WORDS.values() for w in ws}
    for span in world.object_word_indices(scene):
        entry = {}
        for k in span:
            w = caption[k]
            entry["color" if w in world.COLORS else "shape" if w in world.SHAPES else "size" if w in size_words else "other"] = k
        out.append(entry)
    return out


def final_image(trace) -> np.ndarray:
    if trace.images is None:
        raise ValueError("the trace holds no final image, so the checker has nothing to segment")
    return trace.images[0].numpy()
