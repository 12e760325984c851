"""One "generate and trace" for every front end: the CLI, the Gradio app and scripts.

`generate_and_trace` takes a loaded pipeline and a `GenerationRequest`, and returns the trace
with everything a reader of it should know: warnings about the prompt (words cut off by the
text encoder, words the embedded model never saw), a scheduler swapped in for the paper's
schedules (for this run only: the pipeline may be shared), schedule warnings, and the run's
settings in ``trace.meta``. The notes travel with the trace (``meta["notes"]``), so a report
made later from the file shows them too.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from explain import schedules


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    schedule: str = "uniform"
    lam: int = 60
    previews: bool = True
    keep_layers: bool | str = False
    memory_budget_mb: float | None = None  # refuse, before any step, a run whose maps would not fit (explain.memory)


@dataclass
class GenerationResult:
    trace: object  # explain.trace.Trace
    images: list
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def prompt_notes(pipe, prompt: str, model_name: str, what: str = "prompt") -> list[str]:
    """Warnings about a prompt before it runs: words cut off by the text encoder's context, and
    words an embedded model never saw."""
    from explain import tokens
    from explain.adapters.diffusers.loading import is_embedded

    notes = []
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not prompt:
        return notes
    pieces = tokens.tokenize_prompt(tokenizer, prompt, warn=False)
    if pieces.truncated:
        notes.append(
            f"the {what} is longer than the text encoder reads; these words were cut off and have no effect "
            f"or heatmap: {' '.join(pieces.dropped_words)}. Shorten the {what}."
        )
    if is_embedded(model_name):
        from explain import embedded

        unknown = embedded.check_prompt(prompt, tokenizer)
        if unknown:
            notes.append(
                f"the embedded model never saw {', '.join(repr(w) for w in unknown)} (in the {what}); their maps "
                "mean nothing. It knows the shapes world: colours red/yellow/green/cyan/blue/purple, shapes "
                "circle/square/triangle, small/large, positions"
            )
    return notes


def generate_and_trace(pipe, model_name: str, request: GenerationRequest, on_step: Callable | None = None) -> GenerationResult:
    """Generate ``request`` with ``pipe`` under the tap; ``on_step(pipeline, index, timestep,
    callback_kwargs)`` is diffusers' ``callback_on_step_end`` (for progress bars)."""
    from explain.adapters.diffusers import generate, use_paper_scheduler_if_needed

    schedule = schedules.normalize_schedule(request.schedule or "uniform")
    notes = prompt_notes(pipe, request.prompt, model_name)
    if request.negative_prompt:
        notes += prompt_notes(pipe, request.negative_prompt, model_name, what="negative prompt")
    extra = {}
    if on_step is not None:
        def callback(pipeline, index, timestep, callback_kwargs):
            on_step(pipeline, index, timestep, callback_kwargs)
            return callback_kwargs

        extra["callback_on_step_end"] = callback
    own_scheduler = pipe.scheduler
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", schedules.ScheduleSwapWarning)
        switched = use_paper_scheduler_if_needed(pipe, schedule)
        try:
            trace, images = generate(
                pipe,
                request.prompt,
                negative_prompt=request.negative_prompt or None,
                steps=request.steps,
                guidance=request.guidance,
                seed=request.seed,
                height=request.height,
                width=request.width,
                schedule=schedule,
                lam=request.lam,
                previews=request.previews,
                keep_layers=request.keep_layers,
                memory_budget_mb=request.memory_budget_mb,
                **extra,
            )
        finally:
            pipe.scheduler = own_scheduler
    for w in caught:  # everything but ours goes on to the caller's filters
        if not issubclass(w.category, schedules.ScheduleSwapWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seconds = time.perf_counter() - start
    if switched:
        notes.append(f"{switched} cannot run custom time steps, so this run used DPMSolverMultistepScheduler (the paper's)")
    notes += [str(w.message) for w in caught if issubclass(w.category, schedules.ScheduleSwapWarning)]
    trace.meta["model"] = model_name
    trace.meta.update(steps=int(request.steps), guidance=float(request.guidance), seed=int(request.seed), schedule=schedule)
    if schedule == "uniform":
        trace.meta.pop("lam", None)
    if notes:
        trace.meta["notes"] = list(notes)
    return GenerationResult(trace=trace, images=images, notes=notes, seconds=seconds)
