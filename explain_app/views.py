"""Pictures, tables and captions of a trace, as plain values (no Gradio)."""

from __future__ import annotations

import numpy as np

from explain import render
from explain.methods import concepts, heatmaps, recovery
from explain.report import trace_notes
from explain.trace import Trace
from explain_app.inputs import CURVE_KINDS, DISPLAY_SIDE, FUNCTION_WORDS, InputError, check_float, check_int, check_step_range
from explain_app.session import Session


# ---------------------------------------------------------------------------- pictures
def enlarge(image, side: int = DISPLAY_SIDE) -> np.ndarray:
    """Small images enlarged by a whole factor (nearest), so pixels stay sharp in the browser."""
    image = render.as_uint8_image(image)
    factor = max(1, -(-side // max(image.shape[:2])))
    if factor == 1:
        return image
    return render.resize(image, (image.shape[0] * factor, image.shape[1] * factor), nearest=True)


def _picture(trace: Trace, kind: str, step: int) -> np.ndarray:
    previews = trace.x_t_previews if kind == "x_t" else trace.x0_previews
    if previews is not None:
        return render.as_uint8_image(previews[step, 0])
    latents = trace.x_t if kind == "x_t" else trace.x0
    return render.resize(render.latent_rgb(latents[step, 0]), trace.image_size, nearest=True)


def final_view(trace: Trace) -> np.ndarray:
    return enlarge(render.final_image(trace))


def step_view(trace: Trace, step) -> tuple[np.ndarray, np.ndarray, str]:
    """x_t entering ``step`` and the model's x0 prediction there, side by side."""
    step = check_int("step", step, 0, trace.num_steps - 1)
    decoded = trace.x0_previews is not None
    caption = f"step {step} of {trace.num_steps - 1}: timestep t = {float(trace.timesteps[step]):.0f}, σ = {float(trace.sigmas[step]):.3g}"
    if not decoded:
        caption += " (this trace has no decoded previews: latent channels shown)"
    return enlarge(_picture(trace, "x_t", step)), enlarge(_picture(trace, "x0", step)), caption


def content_words(trace: Trace) -> list[tuple[str, int]]:
    """(label, index into the prompt's words) of every prompt word with tokens; labels are unique."""
    choices, seen = [], {}
    for index, word in enumerate(heatmaps.prompt_words(trace)):
        if not word.token_indices:
            continue
        n = seen.get(word.text, 0) + 1
        seen[word.text] = n
        choices.append((word.text if n == 1 else f"{word.text} ({n})", index))
    return choices


def default_word(trace: Trace) -> int | None:
    choices = content_words(trace)
    words = heatmaps.prompt_words(trace)
    for _, index in choices:
        if words[index].text.lower() not in FUNCTION_WORDS:
            return index
    return choices[0][1] if choices else None


def _word_spec(trace: Trace, chip, typed):
    typed = (typed or "").strip()
    if typed:
        return typed
    if chip is None or chip == "":
        raise InputError("choose a word of the prompt (click a chip) or type one")
    return check_int("word", chip, 0, len(heatmaps.prompt_words(trace)) - 1)


def word_view(trace: Trace, chip, typed, start, end) -> tuple[np.ndarray, np.ndarray, str]:
    """The heatmap of one word (or a typed phrase, merged) over a step range, and all the
    content words' heatmaps over the same range."""
    steps = check_step_range(trace, start, end)
    spec = _word_spec(trace, chip, typed)
    try:
        label, _ = heatmaps.resolve_words(trace, spec)
    except (KeyError, IndexError) as exc:
        raise InputError(exc.args[0] if exc.args else str(exc)) from None
    base = enlarge(render.final_image(trace))
    size = base.shape[:2]
    heat = heatmaps.word_heatmap(trace, spec, steps, size=size)
    single = render.with_colorbar(render.overlay(base, heat), low="0 least", high="1 most", label="attention, min-max")
    words = [w for w in heatmaps.prompt_words(trace) if w.token_indices and w.text.lower() not in FUNCTION_WORDS]
    words = words or [w for w in heatmaps.prompt_words(trace) if w.token_indices]
    maps = heatmaps.word_heatmaps(trace, words, steps)
    grid = render.heatmap_grid(render.final_image(trace), maps, columns=5)
    caption = f"'{label}', steps {steps.start}-{steps.stop - 1} (cross-attention, mean over heads, layers and steps; min-max scaled)"
    return single, grid, caption + "\n\n" + verdict_markdown("word heatmaps", "word_heatmap", trace)


def verdict_markdown(what: str, method_id: str, trace: Trace) -> str:
    """The sanity verdict shown beside a map: cached for the model, or how to measure one."""
    from explain.explanations import sanity_verdict

    passes, line = sanity_verdict(method_id, trace.meta.get("model"))
    mark = {True: "✅", False: "⚠️", None: "❔"}[passes]
    return f"{mark} **{what}** {_md(line)}"


def recovery_verdict(trace: Trace) -> str:
    return verdict_markdown("R1 recovery view", "recovery", trace)


CURVE_TITLES = {"share": "share of the prompt words' attention", "normalized": "per-step min-max across words (paper)", "mass": "attention mass (raw)"}


def concept_frame(trace: Trace, kind: str = "share"):
    """Concept curves as a long table (step, value, word) for an interactive line plot, and the
    per-word score table. Steps are labels ("0", "1", ...), so the plot's axis shows whole steps."""
    import pandas as pd

    if kind not in CURVE_KINDS:
        raise InputError(f"unknown curve {kind!r}; choose one of {', '.join(CURVE_KINDS)}")
    words = [w for w in heatmaps.prompt_words(trace) if w.token_indices and w.text.lower() not in FUNCTION_WORDS]
    scores = concepts.concept_scores(trace, words or None)
    values = getattr(scores, kind).double()
    rows = [
        {"step": str(int(step)), "value": float(values[i, j]), "word": label}
        for j, label in enumerate(scores.labels)
        for i, step in enumerate(scores.steps)
    ]
    table = pd.DataFrame(scores.table()).drop(columns=["tokens"])
    return pd.DataFrame(rows, columns=["step", "value", "word"]), table.round(4)


def concept_colors(trace: Trace) -> dict[str, str]:
    """A colour per concept-curve word (`explain.render.word_colors`): colour words in their
    colour, with the embedded world's shades for its model."""
    words = [w for w in heatmaps.prompt_words(trace) if w.token_indices and w.text.lower() not in FUNCTION_WORDS]
    labels = concepts.concept_scores(trace, words or None).labels
    palette = None
    if str(trace.meta.get("model", "")).startswith("embedded"):
        from explain.embedded import world

        palette = world.COLORS
    return {label: render.hex_color(c) for label, c in zip(labels, render.word_colors(labels, palette))}


def recovery_views(trace: Trace, tol=0.25) -> tuple[np.ndarray, np.ndarray]:
    tol = check_float("tolerance", tol, 0.01, 2.0)
    space = "preview" if trace.x0_previews is not None else "latent"
    view = recovery.trace_recovery(trace, space=space, tol=tol)
    return render.recovery_grid(view, trace), render.recovery_curves(view)


def summary(session: Session) -> str:
    trace = session.require_trace()
    meta = trace.meta
    rows = [("prompt", trace.prompts[0])]
    if trace.negative_prompts and trace.negative_prompts[0]:
        rows.append(("negative prompt", trace.negative_prompts[0]))
    for key in ("model", "scheduler", "steps", "guidance_scale", "guidance", "seed", "schedule", "lam"):
        skip = (key == "guidance" and "guidance_scale" in meta) or (key == "lam" and meta.get("schedule", "uniform") == "uniform")
        if key in meta and not skip:
            rows.append((key.replace("_scale", ""), meta[key]))
    h, w = trace.image_size
    rows.append(("size", f"{w}×{h} px, latent {trace.latent_size[1]}×{trace.latent_size[0]}, {trace.num_steps} steps traced"))
    rows.append(("source", session.source or "?"))
    for name, seconds in session.timings.items():
        rows.append((name, f"{seconds:.1f} s"))
    lines = [f"| {k} | {_md(v)} |" for k, v in rows]
    text = "| setting | value |\n|---|---|\n" + "\n".join(lines)
    notes = list(dict.fromkeys(list(session.notes) + trace_notes(trace)))  # generated: both hold them
    if notes:
        text += "\n\n" + "\n\n".join(f"⚠️ {_md(n)}" for n in notes)
    return text


def _md(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
