"""What the app accepts: limits, and input checks with errors that say what to change."""

from __future__ import annotations

import math

from explain.methods import defaults
from explain.trace import Trace


MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
MAX_LAM = 10_000
MAX_MASKS = 4000
DEFAULT_MASKS = defaults.RISE.n_masks  # one default for every front end
SIZES = ("model default", "64", "128", "256", "384", "512", "768", "1024")
DISPLAY_SIDE = 256  # small images are enlarged by whole pixels to at least this side
FUNCTION_WORDS = ("a", "an", "the", "of", "and", ",", "on", "in", "at", "to", "is")
CURVE_KINDS = ("normalized", "share", "mass")
DEFAULT_MODEL = "embedded"


class InputError(ValueError):
    """Input the app cannot work with; the message says what to change."""


def _no_progress(*args, **kwargs) -> None:
    return None


# ---------------------------------------------------------------------------- input checks
def check_prompt(prompt) -> str:
    text = "" if prompt is None else str(prompt).strip()
    if not text:
        raise InputError("the prompt is empty: type what the image should show, e.g. 'a red circle above a blue square'")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt has {len(text)} characters; keep it under {MAX_PROMPT_CHARS} (the text encoder reads about 75 tokens anyway)")
    return text


def check_int(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number between {low} and {high}, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise InputError(f"{name} must be a whole number between {low} and {high}, got {value!r}")
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {int(number)}")
    return int(number)


def check_float(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number between {low} and {high}, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value!r}")
    return number


def parse_size(size) -> int | None:
    """``None`` for the model's own size, else a side in pixels (a multiple of 8)."""
    if size in (None, "", "model default"):
        return None
    side = check_int("image size", size, 64, 1024)
    if side % 8:
        raise InputError(f"the image size must be a multiple of 8 (the VAE's factor), got {side}")
    return side


def check_step_range(trace: Trace, start, end) -> slice:
    last = trace.num_steps - 1
    start = check_int("'from step'", start, 0, last)
    end = check_int("'to step'", end, 0, last)
    if start > end:
        raise InputError(f"'from step' ({start}) is after 'to step' ({end}); choose from <= to")
    return slice(start, end + 1)
