"""Word heatmaps: where in the image the model looked for a word, over any range of steps.

A word heatmap is the trace's per-token cross-attention (probabilities of the conditional
branch, already averaged over heads and layers by the tap), averaged over the selected
steps, merged over the word's sub-word tokens and upsampled to the image size, as in DAAM
(Tang et al. 2023), but with a step filter DAAM lacks. Layer or resolution subsets use
``trace.attention_layers`` (recorded with ``keep_layers=True``); each selected layer is
resized to the latent grid before they are averaged, so every layer counts equally.

Step selections (`select_steps`) accept ``None`` (all steps), an ``int``, a ``slice``, a
``range``, a list of ints, or a string such as ``"5"``, ``"0:10"``, ``"-5:"``, ``"0,3,7"``
(Python slice rules: the stop is excluded, negative numbers count from the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

from explain.trace import Trace, Word

StepSelection = Union[None, int, slice, range, Sequence[int], str]
WordSpec = Union[str, int, Word, Sequence[Union[str, int, Word]]]

MERGES = ("mean", "sum", "max")
NORMALIZATIONS = ("minmax", "sum", "none")


class UnknownWordError(KeyError, ValueError):
    """A word that is not in the prompt. Also a ``ValueError``, so callers may catch either."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------- steps
def parse_words(text: str | None) -> list[str]:
    """``"red, blue square"`` -> ``["red", "blue square"]`` (each entry a word or a phrase);
    empty -> ``[]``."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def parse_steps(text: str) -> StepSelection:
    """Turn ``"7"``, ``"0:10"``, ``"10:"``, ``"::2"`` or ``"0,3,7"`` into a step selection."""
    text = text.strip()
    if text in ("", "all", ":"):
        return None
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*(int(p) if p else None for p in parts))
        if "," in text:
            return [int(p) for p in text.split(",") if p.strip()]
        return int(text)
    except ValueError:
        raise ValueError(
            f"cannot read the step selection {text!r}; write one step ('7'), a range ('0:10', '10:', '-5:') "
            "or a list ('0,3,7')"
        ) from None


def select_steps(trace: Trace, steps: StepSelection = None) -> list[int]:
    """The step indices ``steps`` selects in ``trace``, in order; raises if the selection is empty
    or points outside the trace."""
    n = trace.num_steps
    if isinstance(steps, str):
        steps = parse_steps(steps)
    if steps is None:
        return list(range(n))
    if isinstance(steps, slice):
        chosen = list(range(n))[steps]
        if not chosen:
            raise ValueError(f"the step range {_describe(steps)} selects no steps; the trace has steps 0..{n - 1}")
        return chosen
    if isinstance(steps, (int, torch.Tensor)) and not isinstance(steps, bool):
        return [trace.check_step(int(steps))]
    if isinstance(steps, (range, Sequence)):
        chosen = [trace.check_step(int(s)) for s in steps]
        if not chosen:
            raise ValueError(f"the step selection is empty; choose steps in 0..{n - 1}")
        return chosen
    raise TypeError(f"cannot select steps with a {type(steps).__name__}; use an int, a slice, a list of ints or a string like '0:10'")


def _describe(s: slice) -> str:
    return ":".join("" if v is None else str(v) for v in (s.start, s.stop)) + (f":{s.step}" if s.step is not None else "")


# ---------------------------------------------------------------------------- words
def check_item(trace: Trace, item: int) -> int:
    if not -trace.batch_size <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the batch, which has items 0..{trace.batch_size - 1}")
    return item % trace.batch_size


def prompt_words(trace: Trace, item: int = 0, negative: bool = False) -> list[Word]:
    item = check_item(trace, item)
    words = trace.negative_words if negative else trace.words
    if item >= len(words):
        if negative:
            raise ValueError("this trace has no negative prompt; generate with a negative prompt to record its attention")
        raise ValueError(f"the trace has no prompt words for item {item}")
    return words[item]


def resolve_word(trace: Trace, word: str | int | Word, item: int = 0, negative: bool = False) -> Word:
    """A `Word` of the prompt by text (case-insensitive, first match), by index into the prompt's
    word list, or passed through."""
    words = prompt_words(trace, item, negative)
    if isinstance(word, Word):
        return word
    if isinstance(word, int) and not isinstance(word, bool):
        if not -len(words) <= word < len(words):
            raise IndexError(f"word index {word} is outside the prompt, which has {len(words)} words")
        return words[word]
    if isinstance(word, str):
        wanted = word.strip().lower()
        for w in words:
            if w.text.lower() == wanted:
                return w
        which = "negative prompt" if negative else "prompt"
        available = ", ".join(repr(w.text) for w in words) or "(none)"
        raise UnknownWordError(f"word {word!r} is not in the {which}; its words are: {available}")
    raise TypeError(f"a word must be given as text, an index or a Word, not {type(word).__name__}")


def resolve_words(trace: Trace, spec: WordSpec, item: int = 0, negative: bool = False) -> tuple[str, list[int]]:
    """A label and the token positions for one word, several words merged (a list), or a phrase
    of several prompt words ("red circle")."""
    if isinstance(spec, str) and len(spec.split()) > 1:
        try:
            w = resolve_word(trace, spec, item, negative)
            return w.text, list(w.token_indices)
        except UnknownWordError:
            spec = spec.split()
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("an empty list of words selects no tokens")
        found = [resolve_word(trace, w, item, negative) for w in spec]
        positions = sorted({i for w in found for i in w.token_indices})
        label = " ".join(w.text for w in found)
    else:
        w = resolve_word(trace, spec, item, negative)
        positions, label = list(w.token_indices), w.text
    if not positions:
        raise ValueError(f"word {label!r} has no tokens in the trace (it was cut off by the context length?)")
    return label, positions


# ---------------------------------------------------------------------------- maps
def _layer_names(trace: Trace, layers, resolutions) -> list[str]:
    if not trace.attention_layers:
        raise ValueError(
            "this trace has no per-layer attention; record it with keep_layers=True to choose layers or resolutions"
        )
    names = list(trace.attention_layers)
    chosen = names
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        for want in wanted:
            matched = [n for n in names if n == want or n.startswith(want + ".") or n.startswith(want + "/")]
            if not matched:
                raise ValueError(f"no attention layer named {want!r}; the trace has: {', '.join(names)}")
            chosen += [n for n in matched if n not in chosen]
    if resolutions is not None:
        # a resolution is a map side: on a non-square latent either side (or an (h, w) pair) selects
        wanted = [resolutions] if isinstance(resolutions, (int, tuple)) else list(resolutions)
        shape = {n: tuple(int(v) for v in trace.attention_layers[n].shape[-2:]) for n in names}

        def selected(hw: tuple[int, int]) -> bool:
            return any(hw == tuple(int(v) for v in r) if isinstance(r, tuple) else int(r) in hw for r in wanted)

        chosen = [n for n in chosen if selected(shape[n])]
        if not chosen:
            have = ", ".join(f"{h}x{w}" for h, w in sorted(set(shape.values()), reverse=True))
            raise ValueError(f"no selected attention layer has resolution {wanted}; the trace's layers have {have}")
    return chosen


def attention_maps(
    trace: Trace,
    steps: StepSelection = None,
    *,
    item: int = 0,
    layers: str | Sequence[str] | None = None,
    resolutions: int | tuple[int, int] | Sequence[int | tuple[int, int]] | None = None,
    negative: bool = False,
) -> torch.Tensor:
    """Cross-attention ``[T, h, w]`` at latent resolution, averaged over the selected steps
    (and layers, when a subset is asked for). ``resolutions`` picks layers by map size: a side
    (``16``; either side on a non-square latent) or an ``(h, w)`` pair, or a list of them."""
    item = check_item(trace, item)
    chosen = select_steps(trace, steps)
    if negative:
        if layers is not None or resolutions is not None:
            raise ValueError("layer and resolution subsets are recorded for the prompt only, not the negative prompt")
        if trace.attention_negative is None:
            raise ValueError("this trace has no negative-prompt attention; generate with a negative prompt to record it")
        return trace.attention_negative[chosen, item].float().mean(0)
    if layers is None and resolutions is None:
        if trace.attention is None:
            raise ValueError("this trace has no cross-attention; record it with an attention tap (taps.diffusers.trace)")
        return trace.attention[chosen, item].float().mean(0)
    h, w = trace.latent_size
    maps = []
    for name in _layer_names(trace, layers, resolutions):
        att = trace.attention_layers[name][chosen, item].float().mean(0)  # [T, hl, wl]
        if tuple(att.shape[-2:]) != (h, w):
            att = F.interpolate(att[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        maps.append(att)
    return torch.stack(maps).mean(0)


def relative_to_words(maps: torch.Tensor, word_positions: Sequence[int]) -> torch.Tensor:
    """Divide each pixel's attention ``[T, h, w]`` by that pixel's summed attention over the
    prompt's word tokens (DAAM's ``normalize=True``): what a word gets *relative to the other
    words*, without the start / end / padding tokens' share, which varies over the image."""
    total = maps[list(word_positions)].sum(0, keepdim=True)
    return maps / total.clamp_min(1e-12)


def _word_positions(trace: Trace, item: int, negative: bool) -> list[int]:
    return sorted({i for w in prompt_words(trace, item, negative) for i in w.token_indices})


def merge_tokens(maps: torch.Tensor, positions: Sequence[int], merge: str = "mean") -> torch.Tensor:
    """One map ``[h, w]`` from the maps ``[T, h, w]`` of a word's tokens."""
    picked = maps[list(positions)]
    if merge == "mean":
        return picked.mean(0)
    if merge == "sum":
        return picked.sum(0)
    if merge == "max":
        return picked.amax(0)
    raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")


def normalize_map(heat: torch.Tensor, how: str = "minmax") -> torch.Tensor:
    """``minmax`` stretches a map to 0..1 (a flat map becomes all zeros), ``sum`` makes it sum
    to 1, ``none`` leaves it."""
    heat = heat.clamp_min(0)
    if how == "minmax":
        lo, hi = heat.amin(dim=(-2, -1), keepdim=True), heat.amax(dim=(-2, -1), keepdim=True)
        span = hi - lo
        return torch.where(span > 1e-12, (heat - lo) / span.clamp_min(1e-12), torch.zeros_like(heat))
    if how == "sum":
        total = heat.sum(dim=(-2, -1), keepdim=True)
        return torch.where(total > 0, heat / total.clamp_min(1e-30), torch.zeros_like(heat))
    if how == "none":
        return heat
    raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALIZATIONS)}")


def upsample(heat: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[..., h, w]`` to ``size``; bicubic overshoot is clipped at zero."""
    if tuple(heat.shape[-2:]) == tuple(size):
        return heat
    lead = heat.shape[:-2]
    flat = heat.reshape(-1, 1, *heat.shape[-2:]).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **kwargs)
    if mode == "bicubic":
        out = out.clamp_min(0)
    return out.reshape(*lead, *size)


def _target_size(trace: Trace, size) -> tuple[int, int]:
    if size is None or size == "image":
        return trace.image_size
    if size == "latent":
        return trace.latent_size
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def word_heatmap(
    trace: Trace,
    word: WordSpec,
    steps: StepSelection = None,
    *,
    item: int = 0,
    layers: str | Sequence[str] | None = None,
    resolutions: int | tuple[int, int] | Sequence[int | tuple[int, int]] | None = None,
    negative: bool = False,
    merge: str = "mean",
    normalize: str = "minmax",
    size="image",
    mode: str = "bilinear",
    relative: bool = False,
) -> torch.Tensor:
    """The heatmap ``[H, W]`` of one prompt word (or several, merged) over the selected steps.

    ``relative`` divides by the summed attention of all prompt words at each pixel first
    (`relative_to_words`).

    ``size`` is ``"image"`` (default), ``"latent"``, an int or ``(H, W)``. The map is normalised
    after upsampling, as DAAM and the paper do, so a min-max map spans exactly 0..1.
    """
    _, positions = resolve_words(trace, word, item, negative)
    maps = attention_maps(trace, steps, item=item, layers=layers, resolutions=resolutions, negative=negative)
    if relative:
        maps = relative_to_words(maps, _word_positions(trace, item, negative))
    heat = upsample(merge_tokens(maps, positions, merge), _target_size(trace, size), mode)
    return normalize_map(heat, normalize)


def word_heatmaps(
    trace: Trace,
    words: Sequence[WordSpec] | None = None,
    steps: StepSelection = None,
    *,
    item: int = 0,
    layers: str | Sequence[str] | None = None,
    resolutions: int | tuple[int, int] | Sequence[int | tuple[int, int]] | None = None,
    negative: bool = False,
    merge: str = "mean",
    normalize: str = "minmax",
    size="image",
    mode: str = "bilinear",
    skip: Sequence[str] = (),
    relative: bool = False,
) -> dict[str, torch.Tensor]:
    """Heatmaps of several words (default: every prompt word not in ``skip``), keyed by a label
    that is unique even when a word occurs twice ("a", "a (2)")."""
    if words is None:
        skipped = {s.lower() for s in skip}
        words = [w for w in prompt_words(trace, item, negative) if w.text.lower() not in skipped and w.token_indices]
        if not words:
            raise ValueError("no prompt words are left to map once the skipped ones are removed")
    maps = attention_maps(trace, steps, item=item, layers=layers, resolutions=resolutions, negative=negative)
    if relative:
        maps = relative_to_words(maps, _word_positions(trace, item, negative))
    target = _target_size(trace, size)
    out: dict[str, torch.Tensor] = {}
    for spec in words:
        label, positions = resolve_words(trace, spec, item, negative)
        key, n = label, 2
        while key in out:
            key, n = f"{label} ({n})", n + 1
        out[key] = normalize_map(upsample(merge_tokens(maps, positions, merge), target, mode), normalize)
    return out


def step_thirds(num_steps: int) -> list[tuple[str, slice]]:
    """Early / middle / late step ranges (as slices) that cover a run of ``num_steps``."""
    if num_steps < 3:
        return [("all steps", slice(0, num_steps))]
    a, b = round(num_steps / 3), round(2 * num_steps / 3)
    return [(f"steps 0-{a - 1}", slice(0, a)), (f"steps {a}-{b - 1}", slice(a, b)), (f"steps {b}-{num_steps - 1}", slice(b, num_steps))]


# ---------------------------------------------------------------------------- scoring against masks
def pointing_hit(heat: torch.Tensor, mask: torch.Tensor) -> bool:
    """The pointing game: is the heatmap's maximum inside the mask? Ties count as a hit when
    any maximal pixel is inside (a flat map therefore hits any non-empty mask, so callers
    should report flat maps separately)."""
    heat, mask = _same_size(heat, mask)
    top = heat >= heat.max()
    return bool((top & mask).any())


def mask_iou(heat: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU between the mask and the heatmap, min-max normalised and cut at ``threshold``."""
    heat, mask = _same_size(heat, mask)
    pred = normalize_map(heat, "minmax") >= threshold
    union = (pred | mask).sum()
    return float((pred & mask).sum()) / float(union) if union > 0 else 0.0


def _same_size(heat: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    heat = torch.as_tensor(heat).float()
    mask = torch.as_tensor(mask).bool()
    if heat.shape != mask.shape:
        heat = upsample(heat, tuple(mask.shape))
    return heat, mask
