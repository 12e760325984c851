"""What the app does with a model or a file: generate, open, DF-RISE, DF-CAM, downloads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explain import render, schedules
from explain.trace import Trace, TraceFormatError
from explain_app.inputs import (
    DEFAULT_MASKS,
    DEFAULT_MODEL,
    MAX_GUIDANCE,
    MAX_LAM,
    MAX_MASKS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
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
    path = Path(getattr(path, "name", path))
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name} is not a trace: traces are .safetensors files saved by the app, the CLI or the Save Trace node")
    try:
        trace = Trace.load(path)
    except TraceFormatError as exc:
        raise InputError(str(exc)) from None
    if trace.attention is None:
        notes = ["this trace has no cross-attention, so word heatmaps and concept curves are not available"]
    else:
        notes = []
    return Session(trace=trace, source=f"opened {path.name}", notes=notes)


def generate(prompt, negative="", seed=0, steps=20, guidance=5.0, size="model default", schedule="uniform", lam=60, model=DEFAULT_MODEL, models: ModelCache | None = None, progress=_no_progress) -> Session:
    """Check the input, generate with the trace tap and return a new session holding the trace."""
    import torch

    models = models or MODELS
    prompt = check_prompt(prompt)
    negative = ("" if negative is None else str(negative)).strip()
    if len(negative) > MAX_PROMPT_CHARS:
        raise InputError(f"the negative prompt has {len(negative)} characters; keep it under {MAX_PROMPT_CHARS}")
    steps = check_int("steps", steps, 1, MAX_STEPS)
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
    return Session(trace=result.trace, source="generated", model=spec, timings=timings, notes=result.notes)


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


@dataclass
class RiseView:
    overlay_final: np.ndarray
    overlay_x0: np.ndarray
    curves: object  # pandas DataFrame: fraction, distance, curve
    aucs: object  # pandas DataFrame: one row per map and game
    caption: str


def rise_view(session: Session, step, n_masks=DEFAULT_MASKS, centered: bool = False, model_box=None, models: ModelCache | None = None, progress=_no_progress) -> RiseView:
    """DF-RISE at one step, then the insertion and deletion games for its map and for a random
    map (the baseline that gives the AUCs a meaning)."""
    import pandas as pd
    import torch

    from explain.adapters.diffusers import vae_decoder
    from explain.methods import faithfulness, rise

    models = models or MODELS
    trace = session.require_trace()
    step = check_int("DF-RISE step", step, 0, trace.num_steps - 1)
    n = check_int("number of masks", n_masks, 8, MAX_MASKS)
    progress(0.0, desc="loading the model")
    pipe, _ = model_for_trace(session, model_box, models)
    with models.run_lock, torch.no_grad():
        den = _denoiser(pipe, trace)
        progress(0.1, desc=f"DF-RISE: {n} masked predictions")
        result = rise.df_rise(den, trace, step, n_masks=n, centered=bool(centered), seed=0)
        progress(0.7, desc="insertion and deletion games")
        decode = vae_decoder(pipe.vae) if getattr(pipe, "vae", None) is not None else None
        games = {
            "DF-RISE": faithfulness.insertion_deletion(den, trace, step, result.saliency, decode=decode),
            "random": faithfulness.insertion_deletion(den, trace, step, faithfulness.random_saliency(trace.latent_size), decode=decode),
        }
    heat = result.display()
    base = enlarge(render.final_image(trace))
    x0 = enlarge(_picture(trace, "x0", step))
    space = "image" if decode is not None else "latent"
    rows, aucs = [], []
    for name, played in games.items():
        for mode, game in played.items():
            curve = game.image_curve if game.image_curve is not None else game.latent_curve
            rows += [{"fraction": float(f), "distance": float(d), "curve": f"{mode} ({name})"} for f, d in zip(game.fractions, curve)]
            aucs.append({"map": name, "game": mode, f"AUC ({space})": round(game.image_auc if game.image_auc is not None else game.latent_auc, 5), "AUC (latent)": round(game.latent_auc, 5)})
    caption = (
        f"DF-RISE at step {step} (t = {float(trace.timesteps[step]):.0f}) from {n} random masks{' (centered)' if centered else ''}: "
        "where keeping the latent keeps the model's x0 prediction the same (ReLU + min-max). "
        "Games: the distance of the x0 prediction from the unperturbed one as latent positions are inserted "
        "(from a blurred latent) or deleted in the map's order. A faithful map makes insertion fall fast "
        "(low AUC is good) and deletion rise fast (high AUC is good); compare with the random map."
    )
    return RiseView(render.overlay(base, heat), render.overlay(x0, heat), pd.DataFrame(rows), pd.DataFrame(aucs), caption)


CAM_GROUPS = ("paper", "all", "down_blocks", "mid_block", "up_blocks")


def cam_layer_choices(pipe=None) -> list[str]:
    """The layer picker's choices: groups, then every block DF-CAM can hook (when a model is known)."""
    from explain.methods import cam

    names = cam.all_layers(dict(pipe.unet.named_modules())) if pipe is not None else []
    return list(CAM_GROUPS) + names


def cam_view(session: Session, step, layer="paper", model_box=None, models: ModelCache | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """DF-CAM at one step on a layer or group of layers: the map on the final image and on x0."""
    from explain.methods import cam

    models = models or MODELS
    trace = session.require_trace()
    step = check_int("DF-CAM step", step, 0, trace.num_steps - 1)
    layer = (layer or "paper").strip()
    pipe, _ = model_for_trace(session, model_box, models)
    with models.run_lock:
        den = _denoiser(pipe, trace)
        every = cam.all_layers(den.modules)
        if layer in ("down_blocks", "mid_block", "up_blocks"):
            names = [n for n in every if n.startswith(layer + ".")]
        else:
            names = layer
        try:
            result = cam.df_cam(den, trace, step, layers=names)
        except KeyError:
            raise InputError(f"no layer {layer!r} in this model; pick one of the list (paper, all, down_blocks, mid_block, up_blocks or a block name)") from None
    heat = result.display()
    count = len(result.layers)
    caption = (
        f"DF-CAM at step {step} (t = {float(trace.timesteps[step]):.0f}) on {layer} ({count} block{'s' if count != 1 else ''}): "
        "Grad-CAM of the guided noise prediction, each block's map min-max scaled, then summed."
    )
    return render.overlay(enlarge(render.final_image(trace)), heat), render.overlay(enlarge(_picture(trace, "x0", step)), heat), caption


def save_trace_file(session: Session) -> Path:
    trace = session.require_trace()
    return trace.save(session.workdir() / "trace.safetensors")


def save_report(session: Session, progress=_no_progress) -> Path:
    """The HTML report of the session's trace (images embedded, so the page alone is enough)."""
    from explain.report import build_report

    trace = session.require_trace()
    extra = {k: round(v, 2) for k, v in session.timings.items()}
    report = build_report(trace, session.workdir() / "report", save_trace=False, extra_settings=extra, progress=lambda m: progress(None, desc=m))
    return report.html_path
