"""diffusion-explain as a Gradio app: generate an image, then look at how it was denoised.

``python gradio_app.py`` serves it on http://127.0.0.1:7860, ``python gradio_app.py --share``
also prints a public link, and the repository runs as a Hugging Face Space as it is (the
README carries the Space's front matter; GPU work is wrapped in ``spaces.GPU`` when that
package is importable, for ZeroGPU).

The app is thin: every number and picture comes from the ``explain`` core. This module only
checks input, keeps one `Session` per browser tab (``gr.State``) and turns results into
Gradio values. The functions above `build_app` take and return plain Python values, so the
tests call them without a browser; `build_app` wires them to components.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from explain import render, schedules
from explain.methods import concepts, heatmaps, recovery
from explain.trace import Trace, TraceFormatError

try:  # ZeroGPU on Hugging Face Spaces; a no-op decorator elsewhere
    import spaces as _spaces
except ImportError:
    _spaces = None

MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
MAX_LAM = 10_000
MAX_MASKS = 4000
DEFAULT_MASKS = 200
SIZES = ("model default", "64", "128", "256", "384", "512", "768", "1024")
DISPLAY_SIDE = 256  # small images are enlarged by whole pixels to at least this side
FUNCTION_WORDS = ("a", "an", "the", "of", "and", ",", "on", "in", "at", "to", "is")
CURVE_KINDS = ("normalized", "share", "mass")
DEFAULT_MODEL = "embedded"


class InputError(ValueError):
    """Input the app cannot work with; the message says what to change."""


def _no_progress(*args, **kwargs) -> None:
    return None


def gpu(fn):
    """``spaces.GPU`` when running on ZeroGPU, else ``fn`` itself."""
    return _spaces.GPU(duration=120)(fn) if _spaces is not None else fn


# ---------------------------------------------------------------------------- session
@dataclass
class Session:
    """What one browser tab has made or opened. Lives in a ``gr.State``, so tabs never share it."""

    trace: Trace | None = None
    source: str = ""  # "generated" or the opened file's name
    model: str | None = None  # the model spec that made the trace; None when opened from a file
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None

    def require_trace(self) -> Trace:
        if self.trace is None:
            raise InputError("nothing to show yet: generate an image or open a trace file first")
        return self.trace

    def workdir(self) -> Path:
        if self.folder is None or not self.folder.is_dir():
            self.folder = Path(tempfile.mkdtemp(prefix="explain-app-"))
        return self.folder


def close_session(session: Session | None) -> None:
    """Remove a session's files (``gr.State`` calls this when a tab is gone)."""
    if isinstance(session, Session) and session.folder is not None:
        shutil.rmtree(session.folder, ignore_errors=True)


def _session(value) -> Session:
    return value if isinstance(value, Session) else Session()


# ---------------------------------------------------------------------------- models
class ModelCache:
    """Pipelines loaded once per process and shared by all sessions.

    A tap changes a pipeline's attention processors for the length of a run, so runs on one
    pipeline must not overlap: `run_lock` serialises all model work.
    """

    def __init__(self, loader=None, max_models: int = 2):
        from collections import OrderedDict

        self._loader = loader
        self._pipes: OrderedDict[str, tuple[object, str]] = OrderedDict()
        self._max_models = max(1, int(max_models))
        self._load_lock = threading.Lock()
        self.run_lock = threading.Lock()

    def get(self, spec: str | None):
        spec = (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL
        with self._load_lock:
            if spec not in self._pipes:
                self._pipes[spec] = self._load(spec)
                while len(self._pipes) > self._max_models:  # the least recently used goes; runs holding it finish
                    self._pipes.popitem(last=False)
            self._pipes.move_to_end(spec)
            return self._pipes[spec]

    def _load(self, spec: str):
        from explain.adapters.diffusers.loading import ModelLoadError, load_model

        loader = self._loader or load_model
        try:
            return loader(spec)
        except ModelLoadError as exc:
            raise InputError(str(exc).replace("--model", "the model box").replace("pass another model", "enter another model in the model box")) from None


MODELS = ModelCache()


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
    single = render.overlay(base, heat)
    words = [w for w in heatmaps.prompt_words(trace) if w.token_indices and w.text.lower() not in FUNCTION_WORDS]
    words = words or [w for w in heatmaps.prompt_words(trace) if w.token_indices]
    maps = heatmaps.word_heatmaps(trace, words, steps)
    grid = render.heatmap_grid(render.final_image(trace), maps, columns=min(len(maps), 5))
    caption = f"'{label}', steps {steps.start}-{steps.stop - 1} (cross-attention, mean over heads, layers and steps; min-max scaled)"
    return single, grid, caption


def concept_frame(trace: Trace, kind: str = "normalized"):
    """Concept curves as a long table (step, value, word) for an interactive line plot, and the
    per-word score table."""
    import pandas as pd

    if kind not in CURVE_KINDS:
        raise InputError(f"unknown curve {kind!r}; choose one of {', '.join(CURVE_KINDS)}")
    words = [w for w in heatmaps.prompt_words(trace) if w.token_indices and w.text.lower() not in FUNCTION_WORDS]
    scores = concepts.concept_scores(trace, words or None)
    values = getattr(scores, kind).double()
    rows = [
        {"step": int(step), "value": float(values[i, j]), "word": label}
        for j, label in enumerate(scores.labels)
        for i, step in enumerate(scores.steps)
    ]
    table = pd.DataFrame(scores.table()).drop(columns=["tokens"])
    return pd.DataFrame(rows), table.round(4)


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
    if session.notes:
        text += "\n\n" + "\n".join(f"⚠️ {_md(n)}" for n in session.notes)
    return text


def _md(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


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


# ---------------------------------------------------------------------------- UI
# ZeroGPU needs the GPU functions decorated at import time; they reach the shared model cache
# as a global, so only plain values cross into its worker.
_generate_on_gpu = gpu(generate)
_rise_on_gpu = gpu(rise_view)
_cam_on_gpu = gpu(cam_view)


def _custom(models: ModelCache | None) -> ModelCache | None:
    return None if models is None or models is MODELS else models


def _ui(fn):
    """Turn the core's clear errors into a message in the UI; the app keeps running."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, TraceFormatError, heatmaps.UnknownWordError) as exc:
            raise gr.Error(str(exc)) from None
        except (ValueError, KeyError, IndexError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise gr.Error(str(message)) from None

    return wrapper


def build_app(default_model: str = DEFAULT_MODEL, allow_model_choice: bool = True, models: ModelCache | None = None):
    """The Gradio Blocks app. ``models`` replaces the shared model cache (tests)."""
    import gradio as gr

    models = models or MODELS

    # ------------------------------------------------------------------ handlers
    def first_views(session: Session):
        """What a new trace shows first: the image and its settings."""
        return [session, final_view(session.require_trace()), summary(session)]

    @_ui
    def on_views(state, kind):
        """The step, word and concept views of a new trace, and the pickers sized to it."""
        session = _session(state)
        trace = session.require_trace()
        last = trace.num_steps - 1
        x_t, x0, step_caption = step_view(trace, last)
        # one update object per component: Gradio consumes an update as it applies it
        step_range = lambda value: gr.update(maximum=max(last, 1), value=value, interactive=last > 0)  # noqa: E731
        out = [step_range(last), x_t, x0, step_caption]
        if trace.attention is not None:
            word = default_word(trace)
            single, grid, caption = word_view(trace, word, "", 0, last)
            frame, table = concept_frame(trace, kind)
            out += [gr.update(choices=content_words(trace), value=word), step_range(0), step_range(last), single, grid, caption, frame, table]
        else:
            out += [gr.update(choices=[], value=None), gr.update(), gr.update(), None, None, "this trace has no cross-attention", None, None]
        pipe = models.get(session.model)[0] if session.model else None
        out += [step_range(last // 2), step_range(last // 2), gr.update(choices=cam_layer_choices(pipe), value="paper")]
        return out

    @_ui
    def on_generate(state, prompt, negative, seed, steps, guidance, size, schedule, lam, model, progress=gr.Progress()):
        session = _generate_on_gpu(prompt, negative, seed, steps, guidance, size, schedule, lam, model if allow_model_choice else default_model, models=_custom(models), progress=progress)
        close_session(state)
        for note in session.notes:
            gr.Warning(note)
        return first_views(session)

    @_ui
    def on_open(state, file):
        session = open_trace(file)
        close_session(state)
        for note in session.notes:
            gr.Warning(note)
        return first_views(session)

    @_ui
    def on_step(state, step):
        return step_view(_session(state).require_trace(), step)

    @_ui
    def on_word(state, chip, typed, start, end):
        return word_view(_session(state).require_trace(), chip, typed, start, end)

    @_ui
    def on_kind(state, kind):
        return concept_frame(_session(state).require_trace(), kind)

    @_ui
    def on_tol(state, tol):
        return recovery_views(_session(state).require_trace(), tol)

    @_ui
    def on_rise(state, step, n_masks, centered, model_box, progress=gr.Progress()):
        view = _rise_on_gpu(_session(state), step, n_masks, centered, model_box if allow_model_choice else default_model, models=_custom(models), progress=progress)
        return view.overlay_final, view.overlay_x0, view.curves, view.aucs, view.caption

    @_ui
    def on_cam(state, step, layer_name, model_box):
        return _cam_on_gpu(_session(state), step, layer_name, model_box if allow_model_choice else default_model, models=_custom(models))

    @_ui
    def on_download_trace(state):
        return str(save_trace_file(_session(state)))

    @_ui
    def on_report(state, progress=gr.Progress()):
        return str(save_report(_session(state), progress))

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title="diffusion-explain") as demo:
        gr.Markdown(
            "# diffusion-explain\n"
            "See how a text-to-image diffusion model denoises: what it predicts at each step, where each "
            "prompt word looks, when each concept emerges and which regions are recovered when "
            "(after Park, Ju & Lee 2024). The default model is a small one trained on a world of coloured "
            "shapes, so it runs on a CPU in seconds."
        )
        state = gr.State(None, delete_callback=close_session, time_to_live=6 * 3600)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Tab("Generate"):
                    prompt = gr.Textbox(label="prompt", value="a large red circle above a small blue square", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="negative prompt", value="", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="steps", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="guidance", elem_id="guidance")
                        size = gr.Dropdown(list(SIZES), value="model default", label="size (px)", elem_id="size")
                    with gr.Row():
                        schedule = gr.Radio(list(schedules.SCHEDULES), value="uniform", label="time-step schedule", info="early: more steps at high noise (semantics); latter: more at low noise (details)")
                        lam = gr.Number(label="λ (early/latter)", value=60, precision=0, minimum=1, maximum=MAX_LAM)
                    model = gr.Textbox(
                        label="model",
                        value=default_model,
                        info="'embedded' (the shapes model), a local diffusers folder or a hub id",
                        interactive=allow_model_choice,
                        elem_id="model",
                    )
                    run = gr.Button("Generate & explain", variant="primary", elem_id="generate")
                with gr.Tab("Open a trace"):
                    gr.Markdown("Browse a trace saved by this app, the CLI (`python -m explain`) or the ComfyUI Save Trace node; no model needed.")
                    trace_file = gr.File(label="trace file (.safetensors)", file_types=[".safetensors"], type="filepath", elem_id="trace-file")
                with gr.Row():
                    download_trace = gr.Button("Download trace", size="sm", elem_id="download-trace")
                    download_report = gr.Button("HTML report", size="sm", elem_id="download-report")
                with gr.Column(visible=False) as download_box:  # shown once there is a file
                    download = gr.File(label="download", interactive=False, elem_id="download")
            with gr.Column(scale=2):
                with gr.Row():
                    final = gr.Image(label="final image", format="png", interactive=False, elem_id="final-image")
                    info = gr.Markdown("Generate an image or open a trace to begin.", elem_id="summary")

        with gr.Tab("Steps"):
            step = gr.Slider(0, 1, value=0, step=1, label="step", interactive=False, elem_id="step-slider")
            with gr.Row():
                x_t = gr.Image(label="x_t (noisy latent entering the step)", format="png", interactive=False, elem_id="x-t")
                x0 = gr.Image(label="x0 (the model's prediction of the clean image)", format="png", interactive=False, elem_id="x0")
            step_caption = gr.Markdown()
        with gr.Tab("Words"):
            chips = gr.Radio([], label="prompt words (pick one)", elem_id="word-chips")
            typed = gr.Textbox(label="or type words of the prompt (merged)", placeholder="red circle", elem_id="typed-word")
            with gr.Row():
                start = gr.Slider(0, 1, value=0, step=1, label="from step", interactive=False, elem_id="from-step")
                end = gr.Slider(0, 1, value=1, step=1, label="to step", interactive=False, elem_id="to-step")
            with gr.Row():
                word_image = gr.Image(label="heatmap", format="png", interactive=False, elem_id="word-heatmap")
                words_grid = gr.Image(label="all words, same steps", format="png", interactive=False, elem_id="words-grid")
            word_caption = gr.Markdown()
        with gr.Tab("Concepts"):
            kind = gr.Radio(list(CURVE_KINDS), value="normalized", label="curve", info="normalized: per-step min-max across words (paper Fig. 9); share: of all prompt-word attention; mass: raw")
            plot = gr.LinePlot(x="step", y="value", color="word", label="concept curves", elem_id="concept-plot")
            table = gr.Dataframe(label="scores per word", interactive=False)
        with gr.Tab("Recovery (R1)"):
            tol = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="tolerance (× std of the final image)")
            recovery_grid = gr.Image(label="what each step recovers", format="png", interactive=False, elem_id="recovery-grid")
            recovery_curves = gr.Image(label="recovered share per step", format="png", interactive=False)
        with gr.Tab("DF-RISE"):
            gr.Markdown("Re-runs the model on randomly masked copies of the latent at one step (needs the model that made the trace).")
            with gr.Row():
                rise_step = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="rise-step")
                masks = gr.Slider(8, MAX_MASKS, value=DEFAULT_MASKS, step=8, label="masks", info="the paper used 500; ~200 take about 15 s on a 2-core CPU with the embedded model")
                centered = gr.Checkbox(value=False, label="centered (less noisy; subtracts each pixel's mean similarity)")
            rise_run = gr.Button("Run DF-RISE", variant="primary", elem_id="run-rise")
            with gr.Row():
                rise_final = gr.Image(label="DF-RISE map on the final image", format="png", interactive=False, elem_id="rise-map")
                rise_x0 = gr.Image(label="on the x0 prediction at the step", format="png", interactive=False)
            games = gr.LinePlot(x="fraction", y="distance", color="curve", label="insertion / deletion", elem_id="rise-games")
            aucs = gr.Dataframe(label="AUC", interactive=False, elem_id="rise-auc")
            rise_caption = gr.Markdown()
        with gr.Tab("DF-CAM"):
            with gr.Row():
                cam_step = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="cam-step")
                layer = gr.Dropdown(list(CAM_GROUPS), value="paper", label="layers", allow_custom_value=True, info="paper: every ResNet, attention and resampling block but the mid attention (43 in SD 1.x)", elem_id="cam-layer")
            cam_run = gr.Button("Run DF-CAM", variant="primary", elem_id="run-cam")
            with gr.Row():
                cam_final = gr.Image(label="DF-CAM map on the final image", format="png", interactive=False, elem_id="cam-map")
                cam_x0 = gr.Image(label="on the x0 prediction at the step", format="png", interactive=False)
            cam_caption = gr.Markdown()

        first_outputs = [state, final, info]
        view_outputs = [step, x_t, x0, step_caption, chips, start, end, word_image, words_grid, word_caption, plot, table, rise_step, cam_step, layer]

        # ------------------------------------------------------------------ events
        # Only the model run holds the model; the views of its trace follow as separate events, so
        # the image shows first and other users' generations need not wait for our pictures.
        generated = run.click(
            on_generate,
            [state, prompt, negative, seed, steps, guidance, size, schedule, lam, model],
            first_outputs,
            concurrency_limit=1,
            concurrency_id="model",
            api_name="generate",
        )
        opened = trace_file.upload(on_open, [state, trace_file], first_outputs, api_name="open_trace")
        for event in (generated, opened):
            event.success(on_views, [state, kind], view_outputs, api_name=False).success(
                on_tol, [state, tol], [recovery_grid, recovery_curves], api_name=False
            )
        # .input: only what the user moves; the views set these sliders themselves
        step.input(on_step, [state, step], [x_t, x0, step_caption], show_progress="hidden", trigger_mode="always_last", api_name="step")
        word_inputs = [state, chips, typed, start, end]
        word_outputs = [word_image, words_grid, word_caption]
        # one listener for all word controls: a session's word views then run one after another and
        # the last request wins (separate listeners could finish out of order and show a stale word)
        gr.on(
            [chips.input, typed.submit, start.input, end.input],
            on_word,
            word_inputs,
            word_outputs,
            trigger_mode="always_last",
            api_name="word",
        )
        kind.input(on_kind, [state, kind], [plot, table], api_name="concepts")
        tol.input(on_tol, [state, tol], [recovery_grid, recovery_curves], api_name="recovery")
        rise_run.click(on_rise, [state, rise_step, masks, centered, model], [rise_final, rise_x0, games, aucs, rise_caption], concurrency_limit=1, concurrency_id="model", api_name="rise")
        cam_run.click(on_cam, [state, cam_step, layer, model], [cam_final, cam_x0, cam_caption], concurrency_limit=1, concurrency_id="model", api_name="cam")
        for button, fn, name in ((download_trace, on_download_trace, "download_trace"), (download_report, on_report, "report")):
            button.click(fn, [state], [download], api_name=name).success(lambda: gr.Column(visible=True), None, download_box, api_name=False)
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="diffusion-explain: the Gradio app")
    parser.add_argument("--share", action="store_true", help="also serve a public gradio.live link")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model box's default: 'embedded', a diffusers folder or a hub id")
    parser.add_argument("--fixed-model", action="store_true", help="users cannot change the model (for public links)")
    parser.add_argument("--no-preload", action="store_true", help="load the model at the first request, not at start")
    args = parser.parse_args(argv)
    if not args.no_preload:
        # loading takes most of the first request's time; start it while the page opens
        threading.Thread(target=_preload, args=(args.model,), daemon=True).start()
    demo = build_app(default_model=args.model, allow_model_choice=not args.fixed_model)
    demo.launch(share=args.share, server_name=args.host, server_port=args.port)


def _preload(spec: str) -> None:
    try:
        MODELS.get(spec)
    except Exception as exc:  # noqa: BLE001 - the first request will show the error in the UI
        print(f"could not preload the model {spec!r}: {exc}")


if __name__ == "__main__":
    main()
