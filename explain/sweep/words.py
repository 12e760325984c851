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


def word_classes(words: list[str], truth: dict | None = None) -> list[str]:
    roles = role_words(truth or {})
    return [roles.get(w.lower(), lexicon_class(w)) if roles else lexicon_class(w) for w in words]
