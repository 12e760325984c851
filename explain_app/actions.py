"""What the app does with a model or a file: generate, open, DF-RISE, DF-CAM, downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
import os
from pathlib import Path

import numpy as np

from explain import render, schedules
from explain.methods import defaults
from explain.report import trace_notes
from explain.trace import Trace, TraceFormatError
from explain_app import inputs
from explain_app.inputs import (
    DEFAULT_MODEL,
    MAX_GUIDANCE,
    MAX_LAM,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    InputError,
    _no_progress,
    check_float,
    check_int,
    check_prompt,
    parse_size,
)
from explain_app.session import MODELS, ModelCache, Session
from explain_app.views import _picture, enlarge


# ---------------------------------------------------------------------------- actions
def open_trace(path) -> Session:
    """A session browsing the trace file at ``path``; a clear error for anything else."""
    if path is None or path == "":
        raise InputError("choose a trace file (.safetensors) saved by the app, the CLI or the Save Trace node")
    # an uploaded file object carries its path in .name; a Path's .name is only its last part
    path = Path(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path))
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name} is not a trace: traces are .safetensors files saved by the app, the CLI or the Save Trace node")
    try:
        trace = Trace.load(path, max_bytes=inputs.LIMITS.max_upload_mb * 2**20)
    except TraceFormatError as exc:
        raise InputError(str(exc)) from None
    notes = trace_notes(trace)  # the warnings recorded when it was made
    if trace.attention is None:
        notes.append("this trace has no cross-attention, so word heatmaps and concept curves are not available")
    return Session(trace=trace, source=f"opened {path.name}", notes=notes)


def generate(prompt, negative="", seed=0, steps=20, guidance=5.0, size="model default", schedule="uniform", lam=60, model=DEFAULT_MODEL, models: ModelCache | None = None, progress=_no_progress) -> Session:
    """Check the input, generate with the trace tap and return a new session holding the trace."""
    import torch

    models = models or MODELS
    prompt = check_prompt(prompt)
    negative = ("" if negative is None else str(negative)).strip()
    if len(negative) > MAX_PROMPT_CHARS:
        raise InputError(f"the negative prompt has {len(negative)} characters; keep it under {MAX_PROMPT_CHARS}")
    steps = check_int("steps", steps, 1, inputs.LIMITS.max_steps)
    seed = check_int("seed", seed, 0, MAX_SEED)
    guidance = check_float("guidance", guidance, 0.0, MAX_GUIDANCE)
    side = parse_size(size)
    try:
        schedule = schedules.normalize_schedule(schedule or "uniform")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    lam = check_int("λ", lam, 1, MAX_LAM) if schedule != "uniform" else 60
    spec = (model or DEFAULT_MODEL).strip() or DEFAULT_MODEL

    from explain.run import GenerationRequest, generate_and_trace

    progress(0.0, desc=f"loading the model ({spec})")
    t = time.perf_counter()
    pipe, model_name = models.get(spec)
    timings = {"time: load model": time.perf_counter() - t}

    def on_step(pipeline, index, timestep, callback_kwargs):
        # second-order samplers call the model more than once per step: count the calls
        calls = max(len(getattr(pipeline.scheduler, "timesteps", ())), index + 1)
        progress(0.05 + 0.85 * (index + 1) / calls, desc=f"denoising: model call {index + 1} of {calls}")

    progress(0.05, desc=f"generating {steps} steps")
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative or None, steps=steps, guidance=guidance, seed=seed,
        height=side, width=side, schedule=schedule, lam=lam, previews=True,
    )
    with models.run_lock, torch.no_grad():
        try:
            result = generate_and_trace(pipe, model_name, request, on_step=on_step)
        except (ValueError, TypeError, IndexError) as exc:  # the tap and the scheduler say what is wrong
            raise InputError(str(exc)) from None
    timings["time: generate + trace"] = result.seconds
    notes = list(result.notes)
    trained = native_size(pipe)
    if side is not None and trained is not None and side != trained:
        notes.append(size_note(side, trained))
        result.trace.meta["notes"] = notes
    return Session(trace=result.trace, source="generated", model=spec, timings=timings, notes=notes)


# ---------------------------------------------------------------------------- sizes
def native_size(pipe) -> int | None:
    """The side the model was trained at (`explain.sizes.pipeline_geometry`), or None when the
    pipeline does not say."""
    from explain import sizes

    return sizes.pipeline_geometry(pipe).native


def size_note(side: int, trained: int) -> str:
    return (
        f"the model was trained at {trained}×{trained} px, not {side}×{side}: expect "
        f"{'repeated, tiled objects' if side > trained else 'cropped or broken objects'} and maps that say little about how it draws at its own size"
    )


def size_choices(trained: int | None, factor: int = 8) -> list[tuple[str, str]]:
    """The size menu: the model's own size first, then a few it was not trained at (up to
    `explain.sizes.MAX_TIMES_NATIVE` times it, within the app's limits), labelled so. For an
    unknown model, the usual sizes within the limits."""
    from explain import sizes
    from explain_app import inputs

    top = inputs.LIMITS.max_side
    if trained is None:
        return [("model default", "model default")] + [(f"{s} px", s) for s in inputs.size_choices() if s != "model default"]
    candidates = {trained // 2, trained * 3 // 2, trained * 2}
    others = sorted(s for s in candidates if 64 <= s <= min(top, sizes.MAX_TIMES_NATIVE * trained) and s % max(factor, 8) == 0 and s != trained)
    return [(f"{trained} px (the model's size)", "model default")] + [(f"{s} px (not trained: expect artefacts)", str(s)) for s in others]


def model_size_choices(spec: str | None, models: ModelCache | None = None) -> list[tuple[str, str]]:
    """`size_choices` for the model box's model: read from its pipeline when it is loaded, from
    its config files on disk otherwise (nothing is loaded for this)."""
    from explain import sizes

    models = models or MODELS
    pipe = models.loaded(spec)
    geometry = sizes.pipeline_geometry(pipe) if pipe is not None else sizes.spec_geometry((spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL)
    if geometry is None:
        return size_choices(None)
    return size_choices(geometry.native, geometry.factor)


def model_status(spec: str | None, models: ModelCache | None = None) -> str:
    """One line about the model for the page: loading, ready, failed, or loaded at the first Generate."""
    models = models or MODELS
    name = (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL
    status = models.status(name)
    if status == "ready":
        return f"✅ model **{name}** is loaded: a Generate takes seconds."
    if status == "loading":
        return f"⏳ loading the model **{name}** in the background (about 30 s on a CPU, once); Generate waits for it."
    if status.startswith("failed"):
        return f"⚠️ the model **{name}** could not be loaded: {status[len('failed: '):]}"
    return f"ℹ️ the model **{name}** loads at the first Generate (about 30 s on a CPU, once)."


# ---------------------------------------------------------------------------- model-based explanations
def model_for_trace(session: Session, model_box=None, models: ModelCache | None = None):
    """The pipeline that made the session's trace: the one it was generated with, or for an
    opened trace the one named in the model box."""
    models = models or MODELS
    trace = session.require_trace()
    spec = session.model or (model_box or DEFAULT_MODEL).strip() or DEFAULT_MODEL
    pipe, name = models.get(spec)
    channels = int(getattr(pipe.unet.config, "in_channels", trace.x_t.shape[2]))
    if channels != trace.x_t.shape[2]:
        raise InputError(
            f"the model {name!r} takes {channels}-channel latents but this trace has {trace.x_t.shape[2]}; "
            "DF-RISE and DF-CAM re-run the model that made the trace, so enter that model in the model box"
        )
    return pipe, name


def _denoiser(pipe, trace: Trace):
    from explain.adapters.diffusers import from_pipeline

    guidance = trace.meta.get("guidance_scale", trace.meta.get("guidance"))
    if guidance is None:
        raise InputError("this trace does not say which guidance scale made it, so the model cannot be re-run as it was")
    return from_pipeline(pipe, trace, guidance_scale=float(guidance))


@contextlib.contextmanager
def _model_run(session: Session, model_box, models: ModelCache | None, progress, gradients: bool = False):
    """``(pipe, denoiser, decode)`` for the session's trace, holding the shared model for the run
    (without autograd unless the method takes ``gradients``, as DF-CAM does)."""
    import torch

    from explain.adapters.diffusers import vae_decoder

    models = models or MODELS
    progress(0.0, desc="loading the model")
    pipe, _ = model_for_trace(session, model_box, models)
    with models.run_lock, (contextlib.nullcontext() if gradients else torch.no_grad()):
        decode = vae_decoder(pipe.vae) if getattr(pipe, "vae", None) is not None else None
        yield pipe, _denoiser(pipe, session.require_trace()), decode


@dataclass
class MapView:
    """A DF-RISE or DF-CAM panel: the map on the final image and on x0 (with a colour bar),
    the games' curves and AUCs, the verdicts and a caption."""

    overlay_final: np.ndarray
    overlay_x0: np.ndarray
    curves: object  # pandas DataFrame: fraction, distance, curve
    aucs: object  # pandas DataFrame: one row per game
    caption: str
    verdict: str  # markdown: beats random, passes the sanity checks
    method: object = None  # the explain.explanations.MethodMap behind it


RiseView = MapView  # the name the DF-RISE panel had


def _map_view(trace: Trace, method) -> MapView:
    import pandas as pd

    base = enlarge(render.final_image(trace))
    x0 = enlarge(_picture(trace, "x0", method.step))
    heat = method.heat
    label = f"{method.method}, min-max"
    rows, aucs = [], []
    for g in method.games:
        rows += [{"fraction": f, "distance": d, "curve": f"{g.mode} ({method.method})"} for f, d in zip(g.fractions, g.curve)]
        rows += [{"fraction": f, "distance": d, "curve": f"{g.mode} (random)"} for f, d in zip(g.fractions, g.random_curve)]
        aucs.append({
            "game": f"{g.mode} ({g.space})", f"AUC ({method.method})": round(g.auc, 5), "AUC (random map)": round(g.random_auc, 5),
            "better is": "lower" if g.mode == "insertion" else "higher",
            "beats random": {True: "yes", False: "no", None: "—"}[g.beats_random],
        })
    verdict = "\n\n".join(f"**{line.split(':', 1)[0]}:**{line.split(':', 1)[1]}" for line in method.verdict_lines())
    return MapView(
        render.with_colorbar(render.overlay(base, heat), low="0 least", high="1 most", label=label),
        render.with_colorbar(render.overlay(x0, heat), low="0 least", high="1 most", label=label),
        pd.DataFrame(rows, columns=["fraction", "distance", "curve"]),
        pd.DataFrame(aucs),
        method.caption + " Games: the distance of the x0 prediction from the unperturbed one as latent positions are "
        "inserted or removed in the map's order; compare with the random map (dashed).",
        verdict,
        method,
    )


def _fraction_progress(progress):
    return lambda fraction, desc: progress(0.1 + 0.9 * fraction, desc=desc)


RISE_PRESETS = tuple(defaults.PRESETS)


def rise_settings(n_masks=None, preset: str = "default", similarity=None, centered=None):
    """DF-RISE settings: a preset of `explain.methods.defaults` with the panel's changes."""
    from explain.similarity import SIMILARITIES

    if preset not in defaults.PRESETS:
        raise InputError(f"unknown DF-RISE preset {preset!r}; choose one of {', '.join(defaults.PRESETS)}")
    settings = defaults.PRESETS[preset]
    changes = {}
    if n_masks is not None:
        changes["n_masks"] = check_int("number of masks", n_masks, 8, inputs.LIMITS.max_masks)
    if similarity not in (None, ""):
        if similarity not in SIMILARITIES:
            raise InputError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        changes["similarity"] = similarity
    if centered is not None:
        changes["centered"] = bool(centered)
    return dataclasses.replace(settings, **changes)


def rise_view(session: Session, step, n_masks=None, centered=None, model_box=None, models: ModelCache | None = None, progress=_no_progress, preset: str = "default", similarity=None) -> MapView:
    """DF-RISE at one step with the library's defaults (or the panel's changes), then the
    insertion and deletion games for its map and for a random map, and the verdicts."""
    from explain import explanations

    trace = session.require_trace()
    step = check_int("DF-RISE step", step, 0, trace.num_steps - 1)
    settings = rise_settings(n_masks, preset or "default", similarity, centered)
    with _model_run(session, model_box, models, progress) as (_, den, decode):
        method = explanations.run_rise(den, trace, step, settings, decode=decode, progress=_fraction_progress(progress))
    session.explanations[method.method] = method
    return _map_view(trace, method)


CAM_GROUPS = ("paper", "all", "down_blocks", "mid_block", "up_blocks")


def cam_layer_choices(pipe=None) -> list[str]:
    """The layer picker's choices: groups, then every block DF-CAM can hook (when a model is known)."""
    from explain.methods import cam

    names = cam.all_layers(dict(pipe.unet.named_modules())) if pipe is not None else []
    return list(CAM_GROUPS) + names


def cam_view(session: Session, step, layer=None, model_box=None, models: ModelCache | None = None, progress=_no_progress) -> MapView:
    """DF-CAM at one step on a layer or group of layers (default: `defaults.CAM`'s), with its
    games and verdicts."""
    from explain import explanations

    trace = session.require_trace()
    step = check_int("DF-CAM step", step, 0, trace.num_steps - 1)
    layer = (layer or defaults.CAM.layers).strip()
    with _model_run(session, model_box, models, progress, gradients=True) as (_, den, decode):
        try:
            method = explanations.run_cam(den, trace, step, layers=layer, decode=decode, progress=_fraction_progress(progress))
        except KeyError:
            raise InputError(f"no layer {layer!r} in this model; pick one of the list (paper, all, down_blocks, mid_block, up_blocks or a block name)") from None
    session.explanations[method.method] = method
    return _map_view(trace, method)


def guidance_view(session: Session, step, model_box=None, models: ModelCache | None = None, progress=_no_progress, words: str = "") -> MapView:
    """The guidance map at one step, with its games and verdicts: the prompt's (where the prompt
    changes the x0 prediction) or, with ``words`` (comma-separated prompt words, or a phrase),
    theirs (where masking their tokens does)."""
    from explain import explanations
    from explain.methods.heatmaps import UnknownWordError, parse_words

    trace = session.require_trace()
    step = check_int("guidance-map step", step, 0, trace.num_steps - 1)
    chosen = parse_words(words)
    spec = None if not chosen else chosen[0] if len(chosen) == 1 else chosen
    with _model_run(session, model_box, models, progress) as (_, den, decode):
        try:
            method = explanations.run_guidance(den, trace, step, decode=decode, progress=_fraction_progress(progress), words=spec)
        except UnknownWordError as exc:
            raise InputError(f"{exc}; leave the words empty for the whole prompt's map") from None
    session.explanations[method.method] = method
    return _map_view(trace, method)


@dataclass
class OnsetPanel:
    """The causal-onset tab: the curves, the per-word table, what was measured, the caption."""

    plot: object
    table: object
    verdict: str
    caption: str
    onset: object = None  # the explain.explanations.OnsetView behind it


def onset_view(session: Session, model_box=None, models: ModelCache | None = None, progress=_no_progress) -> OnsetPanel:
    """When each prompt word starts to shape the prediction (`explain.explanations.run_onset`):
    each word swapped for a contrasting value, the effect on every step's x0 prediction."""
    import pandas as pd

    from explain import explanations
    from explain.adapters.diffusers import from_pipeline

    trace = session.require_trace()
    with _model_run(session, model_box, models, progress) as (pipe, den, decode):
        progress(0.1, desc="each word swapped at every step")
        scale = den.guidance_scale
        onset = explanations.run_onset(den, trace, lambda prompt: from_pipeline(pipe, trace, prompt=prompt, guidance_scale=scale), decode=decode)
    session.onset = onset
    table = pd.DataFrame(
        [{"word": r["word"], "edit": r["edit"], "onset step": r["onset_step"], "peak step": r["peak_step"], "largest effect": float(f"{r['largest_effect']:.3g}"), "edited prompt": r["edited_prompt"]} for r in onset.table()]
    )  # fmt: skip
    caption = (
        f"At each of the {trace.num_steps} steps the traced x_t is denoised with the prompt and with one word edited; the curve is the "
        f"mean squared difference of the two x0 predictions ({onset.onset.space}), scaled to the word's largest, and ★ its onset "
        f"(the first step at {onset.onset.threshold:g} × the largest). {onset.seconds:.1f} s."
    )
    return OnsetPanel(render.onset_curves(onset.onset, palette=word_palette(trace)), table, f"**causal onset:** {onset.evidence}", caption, onset)


def save_trace_file(session: Session) -> Path:
    trace = session.require_trace()
    return trace.save(session.workdir() / "trace.safetensors")


def word_palette(trace: Trace) -> dict | None:
    """The embedded world's colours, for a trace the embedded model made."""
    if not str(trace.meta.get("model", "")).startswith("embedded"):
        return None
    from explain.embedded import world

    return dict(world.COLORS)


def save_report(session: Session, progress=_no_progress) -> Path:
    """The HTML report of the session's trace with the DF-RISE / DF-CAM maps computed in the
    session (images embedded, so the page alone is enough)."""
    from explain.report import build_report

    trace = session.require_trace()
    extra = {k: round(v, 2) for k, v in session.timings.items()}
    methods = [m for m in session.explanations.values() if m is not None]
    report = build_report(
        trace, session.workdir() / "report", save_trace=False, extra_settings=extra, methods=methods,
        palette=word_palette(trace), progress=lambda m: progress(None, desc=m), onset=session.onset,
    )
    return report.html_path
