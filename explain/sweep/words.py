"""Word classes for the tally of what each time step carries.

A prompt word gets a class from, in this order:

1. the row's Visual Genome-style fields ``subject`` / ``relation`` / ``object`` (the paper's
   tally grouped tokens by these roles): words of those phrases are "subject", "relation",
   "object";
2. a small fixed lexicon (ours): "colour", "size", "shape", "spatial", "count", "function";
3. otherwise "other" (content words the lexicon does not know: nouns, verbs, most adjectives).

On the shapes world the lexicon covers every caption word, so the classes there are exact.
There is no part-of-speech tagger on purpose: a lexicon is deterministic, offline and cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

from explain.embedded import world

COLOUR = set(world.COLORS) | {
    "white", "black", "gray", "grey", "brown", "orange", "pink", "silver", "gold", "golden", "beige", "tan",
    "violet", "magenta", "turquoise", "teal", "navy", "maroon", "dark", "light", "bright",
}
SIZE = {w for ws in world.SIZE_WORDS.values() for w in ws} | {"tiny", "huge", "little", "giant", "tall", "short", "long", "wide", "narrow", "massive"}
SHAPE = set(world.SHAPES) | {"round", "rectangle", "rectangular", "oval", "circular", "square-shaped", "cube", "sphere", "star"}
SPATIAL = {
    w for ws in (*world.POSITION_PHRASES.values(), *world.RELATION_PHRASES.values(), world.ROW_PHRASES) for p in ws for w in p.split()
} - {"a", "the", "of", "to", "from", "on", "in", "at"} | {
    "on", "in", "at", "under", "over", "behind", "beside", "near", "next", "inside", "outside", "between", "beneath",
    "front", "top", "bottom", "left", "right", "middle", "center", "centre", "across", "along", "around", "atop",
}
COUNT = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "few", "pair", "couple", "some", "group"}
FUNCTION = {
    "a", "an", "the", "of", "and", "or", ",", ".", "to", "with", "is", "are", "its", "his", "her", "their", "this", "that",
    "for", "from", "by", "as", "it", "be", "there", "picture", "image", "photo", "rendering",
}
LEXICON_CLASSES = ("colour", "size", "shape", "spatial", "count", "function")
ROLE_CLASSES = ("subject", "relation", "object")
CLASSES = (*ROLE_CLASSES, *LEXICON_CLASSES, "other")
_SETS = {"colour": COLOUR, "size": SIZE, "shape": SHAPE, "spatial": SPATIAL, "count": COUNT, "function": FUNCTION}


def lexicon_class(word: str) -> str:
    w = word.strip().lower().strip(".!?;:\"'")
    if w == "" or w in FUNCTION or w == ",":
        return "function"
    for name in ("colour", "size", "shape", "spatial", "count"):
        if w in _SETS[name]:
            return name
    return "other"


def role_words(truth: dict) -> dict[str, str]:
    """word -> role for a row with Visual Genome-style ``subject`` / ``relation`` / ``object`` fields."""
    roles: dict[str, str] = {}
    for role in ROLE_CLASSES:
        phrase = truth.get(role)
        if isinstance(phrase, str):
            for w in phrase.lower().split():
                roles.setdefault(w, role)
    return roles


# contrasting values, for counterfactual prompts that stay in distribution (a colour for a
# colour, the other size, the opposite relation): swapping a word tells more about when the model
# uses it than deleting it, which leaves a prompt unlike any the model was trained on
_HUE_ORDER = list(world.COLORS)  # red, yellow, green, cyan, blue, purple: hue order, opposite = +3
_COLOUR_CONTRAST = {"white": "black", "black": "white", "gray": "white", "grey": "white", "brown": "blue", "orange": "blue", "pink": "green",
                    "silver": "black", "gold": "blue", "golden": "blue", "dark": "light", "light": "dark", "bright": "dark", "violet": "yellow",
                    "magenta": "green", "turquoise": "red", "teal": "red", "navy": "yellow", "maroon": "cyan", "beige": "black", "tan": "blue"}  # fmt: skip
_SIZE_CONTRAST = {"small": "large", "large": "small", "big": "small", "tiny": "huge", "huge": "tiny", "little": "big", "giant": "tiny",
                  "tall": "short", "short": "tall", "long": "short", "wide": "narrow", "narrow": "wide", "massive": "tiny"}  # fmt: skip
_SHAPE_ORDER = [*world.SHAPES, "star"]
_SPATIAL_CONTRAST = {"above": "below", "below": "above", "under": "above", "over": "under", "beneath": "above", "left": "right", "right": "left",
                     "top": "bottom", "bottom": "top", "inside": "outside", "outside": "inside", "front": "back", "behind": "beside"}  # fmt: skip


def contrast(word: str, avoid=()) -> str | None:
    """A contrasting value of the same kind for a colour, size, shape or spatial word (the
    opposite hue, the other size, another shape, the opposite relation), avoiding the words in
    ``avoid`` (the rest of the prompt) where it can; None for a word it has none for."""
    w = word.strip().lower()
    taken = {a.lower() for a in avoid}
    if w in _HUE_ORDER:
        i = _HUE_ORDER.index(w)
        options = [_HUE_ORDER[(i + k) % len(_HUE_ORDER)] for k in (3, 2, 4, 1, 5)]
        return next((c for c in options if c not in taken), None)
    if w in _COLOUR_CONTRAST:
        return _COLOUR_CONTRAST[w]
    if w in _SIZE_CONTRAST:
        return _SIZE_CONTRAST[w]
    if w in _SHAPE_ORDER:
        # a shape the embedded world knows gets one of its own shapes: the prompt stays one it trained on
        others = [s for s in (world.SHAPES if w in world.SHAPES else _SHAPE_ORDER) if s != w]
        return next((s for s in others if s not in taken), others[0])
    return _SPATIAL_CONTRAST.get(w)


_CLOSING = set(",.;:!?)]}'\"")


def word_spans(prompt: str, words: Sequence[str]) -> list[tuple[int, int]] | None:
    """The character span of each of ``words`` (a trace's prompt words, in order) in
    ``prompt``, found left to right and ignoring case; None when one is not there as written
    (a tokenizer that normalised it), so the caller can fall back to joining the words."""
    spans, cursor, low = [], 0, prompt.lower()
    for w in words:
        start = low.find(w.lower(), cursor)
        if not w or start < 0:
            return None
        spans.append((start, start + len(w)))
        cursor = start + len(w)
    return spans


def edited_prompt(prompt: str, words: Sequence[str], index: int, replacement: str | None = None) -> str:
    """``prompt`` with its ``index``-th word (of ``words``, the trace's prompt words) replaced
    by ``replacement``, or removed when that is None, keeping everything else as the user wrote
    it: punctuation, case and spacing, which a text encoder that sees whitespace (T5's
    sentencepiece) would otherwise read differently. Falls back to the words joined by spaces
    when they cannot be located in the prompt."""
    if not 0 <= index < len(words):
        raise IndexError(f"word {index} is outside the prompt's {len(words)} words")
    spans = word_spans(prompt, words)
    if spans is None:
        kept = [replacement if j == index else w for j, w in enumerate(words)]
        return " ".join(w for w in kept if w is not None)
    start, end = spans[index]
    if replacement is not None:
        return prompt[:start] + replacement + prompt[end:]
    # the gap closes to one space, or to none before punctuation, so no two words run together
    left, right = prompt[:start].rstrip(), prompt[end:].lstrip()
    if not left or not right:
        return left + right
    spaced = len(left) < start or len(right) < len(prompt) - end
    joint = "" if right[0] in _CLOSING or not (spaced or (left[-1].isalnum() and right[0].isalnum())) else " "
    return left + joint + right


def counterfactual_prompts(prompt: str, words: Sequence[str]) -> list[tuple[str, str]]:
    """For each of ``words`` (the trace's prompt words, in order): ``(edit, prompt)``, the word
    swapped for its `contrast` (``"swap: cyan"``), which keeps the prompt in distribution, or
    removed where it has none (``"removed"``), edited in ``prompt`` as written (`edited_prompt`)."""
    out = []
    for k, text in enumerate(words):
        other = contrast(text, avoid=words)
        out.append((f"swap: {other}" if other is not None else "removed", edited_prompt(prompt, words, k, other)))
    return out


def word_classes(words: list[str], truth: dict | None = None) -> list[str]:
    roles = role_words(truth or {})
    return [roles.get(w.lower(), lexicon_class(w)) if roles else lexicon_class(w) for w in words]
