"""What the app accepts: limits, and input checks with errors that say what to change.

`LIMITS` bounds the work one request may ask for and the traces the app keeps; a public
deployment (a Space, ``--share``, a non-local address) gets `PUBLIC_LIMITS`, where one
1024-px, 150-step request would hold the shared queue for minutes. `explain_app.session.configure`
sets them; the UI shows them (`Limits.describe`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

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
# the model box's hint: the shipped models by name (explain.adapters.diffusers.loading.EMBEDDED_MODELS) first
MODEL_BOX_INFO = "'embedded' (the shapes UNet model), 'embedded-dit' (the shapes MMDiT, SD3-style), a local diffusers folder or a hub id"


class InputError(ValueError):
    """Input the app cannot work with; the message says what to change."""


@dataclass(frozen=True)
class Limits:
    """The work one request may ask for, and how many traces the app keeps for its sessions."""

    max_steps: int = MAX_STEPS
    max_side: int = 1024
    max_masks: int = MAX_MASKS
    max_traces: int = 32  # sessions whose trace is kept (the oldest go first)
    max_trace_mb: int = 4096  # all kept traces together
    max_upload_mb: int = 1024  # a trace file to open

    def describe(self) -> str:
        return (
            f"Bounds here: at most {self.max_steps} steps, images up to {self.max_side} px a side (and at most twice "
            f"the size the model was trained at), {self.max_masks} DF-RISE masks, trace files up to {self.max_upload_mb} MB. "
            f"The app keeps the traces of the {self.max_traces} most recent sessions, {self.max_trace_mb} MB in all; "
            "older ones are dropped first, so download a trace you want to keep."
        )


LOCAL_LIMITS = Limits()
PUBLIC_LIMITS = Limits(max_steps=50, max_side=512, max_masks=500, max_traces=16, max_trace_mb=1024, max_upload_mb=256)
LIMITS = PUBLIC_LIMITS if os.environ.get("SPACE_ID") else LOCAL_LIMITS

LOG = logging.getLogger("explain_app")


def user_error(message) -> Exception:
    """The ``gr.Error`` for input the app refuses: shown to the user, and ONE line in the
    server log instead of Gradio's full traceback (it is the user's input, not a fault)."""
    import gradio as gr

    text = str(message)
    LOG.info("refused input: %s", " ".join(text.split()))
    return gr.Error(text, print_exception=False)


def quiet_request_errors(demo) -> None:
    """Gradio's own checks of a request (a value over a slider's maximum, one not among a
    dropdown's choices) raise a ``gr.Error`` that prints a traceback; API callers can send
    those at will. Make them one log line too (`user_error`)."""
    import inspect

    import gradio as gr

    original = getattr(demo, "preprocess_data", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return  # another Gradio: its errors keep their tracebacks

    async def preprocess_data(*args, **kwargs):
        try:
            return await original(*args, **kwargs)
        except gr.Error as exc:
            if not exc.print_exception:
                raise
            raise user_error(exc.message) from None

    demo.preprocess_data = preprocess_data


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
    """``None`` for the model's own size, else a side in pixels (a multiple of 8, at most
    ``LIMITS.max_side``); `check_size_for_model` then checks it against the model."""
    if size in (None, "", "model default"):
        return None
    side = check_int("image size", size, 64, LIMITS.max_side)
    if side % 8:
        raise InputError(f"the image size must be a multiple of 8 (the VAE's factor), got {side}")
    return side


def size_choices() -> list[str]:
    """The size picker's choices within ``LIMITS``."""
    return [s for s in SIZES if s == "model default" or int(s) <= LIMITS.max_side]


def check_size_for_model(side: int | None, geometry, model: str) -> None:
    """Refuse a side the model cannot make or was not trained near (`explain.sizes.check_side`:
    a multiple of its VAE factor, at most twice its trained size)."""
    from explain import sizes

    if side is None:
        return
    try:
        sizes.check_side("the image size", side, geometry, model=model)
    except sizes.SizeError as exc:
        raise InputError(str(exc).replace(", or allow any size", "")) from None


def check_steps(steps) -> int:
    return check_int("steps", steps, 1, LIMITS.max_steps)


def check_masks(n_masks) -> int:
    return check_int("number of masks", n_masks, 8, LIMITS.max_masks)


def check_step_range(trace: Trace, start, end) -> slice:
    last = trace.num_steps - 1
    start = check_int("'from step'", start, 0, last)
    end = check_int("'to step'", end, 0, last)
    if start > end:
        raise InputError(f"'from step' ({start}) is after 'to step' ({end}); choose from <= to")
    return slice(start, end + 1)
