"""The Gradio Blocks: components wired to the plain functions of `explain_app`."""

from __future__ import annotations

from explain import schedules
from explain.methods import defaults, heatmaps
from explain.trace import TraceFormatError
from explain_app.actions import (
    CAM_GROUPS,
    RISE_PRESETS,
    cam_layer_choices,
    cam_view,
    generate,
    guidance_view,
    model_size_choices,
    model_status,
    onset_view,
    open_trace,
    rise_view,
    save_report,
    save_trace_file,
)
from explain_app.inputs import CURVE_KINDS, DEFAULT_MODEL, MAX_GUIDANCE, MAX_LAM, MAX_SEED, InputError, check_int
from explain_app.session import MODELS, ModelCache, Session, _session, close_session
from explain_app import inputs
from explain_app.inputs import user_error
from explain_app.session import check_generation
from explain_app.views import CURVE_TITLES, concept_colors, concept_frame, content_words, default_word, final_view, recovery_verdict, recovery_views, step_view, summary, word_view

try:  # ZeroGPU on Hugging Face Spaces; a no-op decorator elsewhere
    import spaces as _spaces
except ImportError:
    _spaces = None


def gpu(fn):
    """``spaces.GPU`` when running on ZeroGPU, else ``fn`` itself."""
    return _spaces.GPU(duration=120)(fn) if _spaces is not None else fn


# ---------------------------------------------------------------------------- UI
# ZeroGPU needs the GPU functions decorated at import time; they reach the shared model cache
# as a global, so only plain values cross into its worker.
_generate_on_gpu = gpu(generate)
_rise_on_gpu = gpu(rise_view)
_cam_on_gpu = gpu(cam_view)
_guidance_on_gpu = gpu(guidance_view)
_onset_on_gpu = gpu(onset_view)

EXAMPLES = [
    ["a large red circle above a small blue square", 1],
    ["a green triangle on the left", 0],
    ["a yellow square below a purple circle", 3],
    ["a cyan circle, a red square and a blue triangle in a row", 2],
]

CSS = """
#summary table td:first-child, #summary table th:first-child { white-space: nowrap; }
#summary table { table-layout: auto; }
#step-range .range2 { padding: 6px 10px; }
#step-range .tracks { position: relative; height: 28px; }
#step-range .tracks input[type=range] { position: absolute; left: 0; right: 0; width: 100%; top: 4px; margin: 0; background: none; pointer-events: none; }
#step-range .tracks input[type=range]::-webkit-slider-thumb { pointer-events: all; }
#step-range .tracks input[type=range]::-moz-range-thumb { pointer-events: all; }
#step-range .lbl { font-weight: 600; }
"""

# One control for a step range: two thumbs on one track. Its value is "FROM-TO"; moving a thumb
# updates the label at once and sends "release" when let go, so the heatmap is computed once.
RANGE_TEMPLATE = """
<div class="range2">
  <label>steps (from – to): <span class="lbl">${value.replace('-', ' – ')}</span> <span class="of">of 0 – ${max}</span></label>
  <div class="tracks">
    <input type="range" class="lo" aria-label="from step" min="0" max="${max}" step="1" value="${value.split('-')[0]}" ${max > 0 ? '' : 'disabled'}>
    <input type="range" class="hi" aria-label="to step" min="0" max="${max}" step="1" value="${value.split('-')[1]}" ${max > 0 ? '' : 'disabled'}>
  </div>
</div>
"""
RANGE_JS = """
function parts() { return [element.querySelector('.lo'), element.querySelector('.hi'), element.querySelector('.lbl')]; }
function sync(target) {
  const [lo, hi, lbl] = parts();
  let a = +lo.value, b = +hi.value;
  if (a > b) { if (target === lo) { hi.value = a; } else { lo.value = b; } a = +lo.value; b = +hi.value; }
  lbl.textContent = a + ' – ' + b;
  return a + '-' + b;
}
element.addEventListener('input', (ev) => { if (ev.target.type === 'range') sync(ev.target); });
element.addEventListener('change', (ev) => {
  if (ev.target.type !== 'range') return;
  props.value = sync(ev.target);
  trigger('release');
});
"""


def _custom(models: ModelCache | None) -> ModelCache | None:
    return None if models is None or models is MODELS else models


def _ui(fn):
    """Turn the core's clear errors into a message in the UI; the app keeps running."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, TraceFormatError, heatmaps.UnknownWordError) as exc:
            raise user_error(exc) from None
        except (ValueError, KeyError, IndexError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise user_error(message) from None

    return wrapper


def parse_range(value, last: int) -> tuple[int, int]:
    """The range control's "FROM-TO" as two steps (checked against the trace's last step)."""
    text = str(value or "").strip()
    try:
        first, second = text.split("-")
    except ValueError:
        raise InputError(f"a step range is FROM-TO, e.g. 0-{last}; got {text!r}") from None
    return check_int("'from step'", first, 0, last), check_int("'to step'", second, 0, last)


def map_panel(gr, prefix: str, name: str) -> list:
    """A model-based map's outputs, in the order `panel` fills them: the map on the final image and
    on x0, the game curves, the AUC table, the caption and the verdict (shown above the maps)."""
    verdict = gr.Markdown(elem_id=f"{prefix}-verdict")
    with gr.Row():
        final = gr.Image(label=f"{name} map on the final image", format="png", interactive=False, elem_id=f"{prefix}-map")
        x0 = gr.Image(label="on the x0 prediction at the step", format="png", interactive=False, elem_id=f"{prefix}-x0")
    games = gr.LinePlot(x="fraction", y="distance", color="curve", label="insertion / deletion", elem_id=f"{prefix}-games")
    aucs = gr.Dataframe(label="AUC", interactive=False, elem_id=f"{prefix}-auc")
    caption = gr.Markdown(elem_id=f"{prefix}-caption")
    return [final, x0, games, aucs, caption, verdict]


def build_app(default_model: str = DEFAULT_MODEL, allow_model_choice: bool = True, models: ModelCache | None = None):
    """The Gradio Blocks app. ``models`` replaces the shared model cache (tests)."""
    import gradio as gr

    models = models or MODELS

    def model_of(box):
        return box if allow_model_choice else default_model

    # ------------------------------------------------------------------ handlers
    def first_views(session: Session):
        """What a new trace shows first: the image and its settings. Everything made from the
        previous trace (DF-RISE / DF-CAM / guidance panels, the offered download) is cleared, so no
        explanation of another image stays on screen."""
        empty_plot = gr.update(value=None)
        cleared = [None, None, empty_plot, None, "", ""] * 3  # DF-RISE, DF-CAM, guidance: maps, games, AUCs, caption, verdict
        cleared += [None, None, "", ""]  # causal onset: curves, table, verdict, caption
        return [session, final_view(session.require_trace()), summary(session), *cleared,
                gr.update(value=None), gr.Column(visible=False), gr.update(interactive=True), gr.update(interactive=True)]

    @_ui
    def on_views(state, kind):
        """The step, word and concept views of a new trace, and the pickers sized to it."""
        session = _session(state)
        trace = session.require_trace()
        last = trace.num_steps - 1
        x_t, x0, step_caption = step_view(trace, last)
        # one update object per component: Gradio consumes an update as it applies it
        step_range = lambda value: gr.update(maximum=max(last, 1), value=value, interactive=last > 0)  # noqa: E731
        out = [step_range(last), gr.update(interactive=last > 0), x_t, x0, step_caption]
        if trace.attention is not None:
            word = default_word(trace)
            single, grid, caption = word_view(trace, word, "", 0, last)
            frame, table = concept_frame(trace, kind)
            plot = gr.update(value=frame, color_map=concept_colors(trace), sort=[str(s) for s in range(trace.num_steps)], y_title=CURVE_TITLES[kind])
            out += [gr.update(choices=content_words(trace), value=word), gr.update(value=f"0-{last}", max=last), single, grid, caption, plot, table]
        else:
            out += [gr.update(choices=[], value=None), gr.update(value="0-0", max=0), None, None, "this trace has no cross-attention", None, None]
        pipe = models.get(session.model)[0] if session.model else None
        out += [step_range(last // 2), step_range(last // 2), gr.update(choices=cam_layer_choices(pipe), value=defaults.CAM.layers), step_range(last // 2)]
        return out

    @_ui
    def on_generate(state, prompt, negative, seed, steps, guidance, size, schedule, lam, model, progress=gr.Progress()):
        check_generation(models, model_of(model), size, steps)  # before the queue for the model
        session = _generate_on_gpu(prompt, negative, seed, steps, guidance, size, schedule, lam, model_of(model), models=_custom(models), progress=progress)
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

    def on_word(state, chip, typed, steps_value):
        """A word's heatmap. A mistyped word or bad range keeps the last result on screen and
        says what is wrong beside it (an error would blank both pictures)."""
        try:
            trace = _session(state).require_trace()
            start, end = parse_range(steps_value, trace.num_steps - 1)
            return word_view(trace, chip, typed, start, end)
        except (InputError, heatmaps.UnknownWordError, KeyError, IndexError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            gr.Warning(str(message))
            return gr.skip(), gr.skip(), f"⚠️ {message} (the pictures still show the last word)"

    @_ui
    def on_kind(state, kind):
        trace = _session(state).require_trace()
        frame, table = concept_frame(trace, kind)
        return gr.update(value=frame, y_title=CURVE_TITLES[kind], color_map=concept_colors(trace), sort=[str(s) for s in range(trace.num_steps)]), table

    @_ui
    def on_tol(state, tol):
        trace = _session(state).require_trace()
        return (*recovery_views(trace, tol), recovery_verdict(trace))

    def panel(view):
        return view.overlay_final, view.overlay_x0, view.curves, view.aucs, view.caption, view.verdict

    @_ui
    def on_rise(state, step, n_masks, preset, similarity, centered, model_box, progress=gr.Progress()):
        inputs.check_masks(n_masks)
        return panel(_rise_on_gpu(_session(state), step, n_masks, centered, model_of(model_box), models=_custom(models), progress=progress, preset=preset, similarity=similarity))

    @_ui
    def on_preset(preset):
        settings = defaults.PRESETS.get(preset, defaults.RISE)
        return gr.update(value=settings.n_masks), gr.update(value=settings.similarity), gr.update(value=settings.centered)

    @_ui
    def on_cam(state, step, layer_name, model_box, progress=gr.Progress()):
        return panel(_cam_on_gpu(_session(state), step, layer_name, model_of(model_box), models=_custom(models), progress=progress))

    @_ui
    def on_guidance(state, step, words, model_box, progress=gr.Progress()):
        return panel(_guidance_on_gpu(_session(state), step, model_of(model_box), models=_custom(models), progress=progress, words=words))

    @_ui
    def on_onset(state, model_box, progress=gr.Progress()):
        view = _onset_on_gpu(_session(state), model_of(model_box), models=_custom(models), progress=progress)
        return view.plot, view.table, view.verdict, view.caption

    @_ui
    def on_download_trace(state):
        return str(save_trace_file(_session(state)))

    @_ui
    def on_report(state, progress=gr.Progress()):
        return str(save_report(_session(state), progress))

    def on_status(box):
        status = model_status(model_of(box), models)
        ready = status.startswith("✅") or status.startswith("⚠️")
        # once loaded, the size menu is read from the pipeline itself
        sizes = gr.update(choices=model_size_choices(model_of(box), models)) if ready else gr.skip()
        return status, gr.Timer(active=not ready), sizes

    def on_model_box(box):
        return gr.update(choices=model_size_choices(model_of(box), models), value="model default")

    def on_sizes(box):
        """The size menu read from the pipeline once a Generate has loaded it (the choice stays)."""
        return gr.update(choices=model_size_choices(model_of(box), models))

    def on_play(state, step, playing):
        trace = _session(state).trace
        if playing or trace is None or trace.num_steps < 2:
            return gr.Timer(active=False), gr.update(value="▶ play"), False, gr.skip()
        start = 0 if int(step or 0) >= trace.num_steps - 1 else int(step or 0)
        return gr.Timer(active=True), gr.update(value="❚❚ pause"), True, start

    def on_tick(state, step):
        trace = _session(state).trace
        if trace is None:
            return gr.Timer(active=False), gr.update(value="▶ play"), False, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        nxt = min(int(step or 0) + 1, trace.num_steps - 1)
        x_t, x0, caption = step_view(trace, nxt)
        done = nxt >= trace.num_steps - 1
        return gr.Timer(active=not done), gr.update(value="▶ play" if done else "❚❚ pause"), not done, nxt, x_t, x0, caption

    # ------------------------------------------------------------------ layout
    from explain.similarity import SIMILARITIES

    with gr.Blocks(title="diffusion-explain") as demo:
        gr.Markdown(
            "# diffusion-explain\n"
            "See how a text-to-image diffusion model denoises: what it predicts at each step, where each "
            "prompt word looks, when each concept emerges and which regions are recovered when "
            "(after Park, Ju & Lee 2024). The default model is a small one trained on a world of coloured "
            "shapes, so it runs on a CPU in seconds."
        )
        # the app's few styles travel in the page itself, so every way of launching it gets them
        gr.HTML(f"<style>{CSS}</style>", elem_id="app-style", padding=False, container=False)
        state = gr.State(None, delete_callback=close_session, time_to_live=6 * 3600)
        playing = gr.State(False)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Tab("Generate"):
                    prompt = gr.Textbox(label="prompt", value="a large red circle above a small blue square", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="negative prompt", value="", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                        steps = gr.Slider(1, inputs.LIMITS.max_steps, value=20, step=1, label="steps", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="guidance", elem_id="guidance")
                        size = gr.Dropdown(model_size_choices(default_model, models), value="model default", label="size", info="the model's own size, or sizes it was not trained at", elem_id="size")
                    with gr.Row():
                        schedule = gr.Radio(list(schedules.SCHEDULES), value="uniform", label="time-step schedule", info="early: more steps at high noise (semantics); latter: more at low noise (details)")
                        lam = gr.Number(label="λ (early/latter)", value=60, precision=0, minimum=1, maximum=MAX_LAM)
                    if models.policy.allow_any:
                        model = gr.Textbox(
                            label="model",
                            value=default_model,
                            info=inputs.MODEL_BOX_INFO,
                            interactive=allow_model_choice,
                            elem_id="model",
                        )
                    else:  # a public app: the operator's models only (any other is refused, whatever it names)
                        model = gr.Dropdown(
                            list(dict.fromkeys([default_model, *models.policy.choices])), value=default_model, label="model",
                            info="the models this app offers", interactive=allow_model_choice, allow_custom_value=True, elem_id="model",
                        )
                    run = gr.Button("Generate & explain", variant="primary", elem_id="generate")
                    status = gr.Markdown(model_status(default_model, models), elem_id="model-status")
                    gr.Examples(EXAMPLES, [prompt, seed], label="examples (click one, then Generate)", elem_id="examples")
                    gr.Markdown(inputs.LIMITS.describe(), elem_id="limits")
                with gr.Tab("Open a trace"):
                    gr.Markdown("Browse a trace saved by this app, the CLI (`python -m explain`) or the ComfyUI Save Trace node; no model needed.")
                    trace_file = gr.File(label="trace file (.safetensors)", file_types=[".safetensors"], type="filepath", elem_id="trace-file")
                with gr.Row():
                    download_trace = gr.Button("Download trace", size="sm", interactive=False, elem_id="download-trace")
                    download_report = gr.Button("HTML report", size="sm", interactive=False, elem_id="download-report")
                with gr.Column(visible=False) as download_box:  # shown once there is a file
                    download = gr.File(label="download", interactive=False, elem_id="download")
            with gr.Column(scale=2):
                with gr.Row():
                    final = gr.Image(label="final image", format="png", interactive=False, elem_id="final-image")
                    info = gr.Markdown("Generate an image or open a trace to begin.", elem_id="summary")

        with gr.Tab("Steps"):
            with gr.Row():
                play = gr.Button("▶ play", size="sm", scale=0, min_width=90, interactive=False, elem_id="play")
                step = gr.Slider(0, 1, value=0, step=1, label="step", interactive=False, elem_id="step-slider", scale=8)
            timer = gr.Timer(0.6, active=False)
            with gr.Row():
                x_t = gr.Image(label="x_t (noisy latent entering the step)", format="png", interactive=False, elem_id="x-t")
                x0 = gr.Image(label="x0 (the model's prediction of the clean image)", format="png", interactive=False, elem_id="x0")
            step_caption = gr.Markdown(elem_id="step-caption")
        with gr.Tab("Words"):
            chips = gr.Radio([], label="prompt words (pick one)", elem_id="word-chips")
            typed = gr.Textbox(label="or type words of the prompt (merged), then Enter", placeholder="red circle", elem_id="typed-word")
            step_span = gr.HTML("0-1", html_template=RANGE_TEMPLATE, js_on_load=RANGE_JS, max=1, elem_id="step-range", apply_default_css=True)
            with gr.Row():
                word_image = gr.Image(label="heatmap", format="png", interactive=False, elem_id="word-heatmap")
                words_grid = gr.Image(label="all words, same steps", format="png", interactive=False, elem_id="words-grid")
            word_caption = gr.Markdown(elem_id="word-caption")
        with gr.Tab("Concepts"):
            kind = gr.Radio(list(CURVE_KINDS), value="share", label="curve", info="share: of all prompt-word attention; normalized: per-step min-max across words (paper Fig. 9); mass: raw", elem_id="curve-kind")
            plot = gr.LinePlot(x="step", y="value", color="word", label="concept curves", x_title="step", y_title=CURVE_TITLES["share"], elem_id="concept-plot")
            table = gr.Dataframe(label="scores per word", interactive=False)
        with gr.Tab("Recovery (R1)"):
            tol = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="tolerance (× std of the final image)")
            recovery_grid = gr.Image(label="what each step recovers", format="png", interactive=False, elem_id="recovery-grid")
            recovery_curves = gr.Image(label="recovered share per step", format="png", interactive=False)
            recovery_sanity = gr.Markdown(elem_id="recovery-verdict")
        with gr.Tab("DF-RISE"):
            gr.Markdown(
                "Re-runs the model on randomly masked copies of the latent at one step (needs the model that made the trace). "
                "Settings start at the library's defaults (`explain.methods.defaults`); *paper* is the published algorithm."
            )
            with gr.Row():
                rise_step = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="rise-step")
                preset = gr.Radio(list(RISE_PRESETS), value="default", label="settings", elem_id="rise-preset")
            with gr.Row():
                masks = gr.Slider(8, inputs.LIMITS.max_masks, value=min(defaults.RISE.n_masks, inputs.LIMITS.max_masks), step=8, label="masks", info=f"the paper used {defaults.PAPER_RISE.n_masks}; a few hundred take seconds with the embedded model", elem_id="rise-masks")
                similarity = gr.Dropdown(list(SIMILARITIES), value=defaults.RISE.similarity, label="similarity", elem_id="rise-similarity")
                centered = gr.Checkbox(value=defaults.RISE.centered, label="centered (subtracts each pixel's mean similarity: less noisy)", elem_id="rise-centered")
            rise_run = gr.Button("Run DF-RISE", variant="primary", elem_id="run-rise")
            rise_outputs = map_panel(gr, "rise", "DF-RISE")
        with gr.Tab("DF-CAM"):
            with gr.Row():
                cam_step = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="cam-step")
                layer = gr.Dropdown(list(CAM_GROUPS), value=defaults.CAM.layers, label="layers", allow_custom_value=True, info="paper: every ResNet, attention and resampling block but the mid attention (43 in SD 1.x)", elem_id="cam-layer")
            cam_run = gr.Button("Run DF-CAM", variant="primary", elem_id="run-cam")
            cam_outputs = map_panel(gr, "cam", "DF-CAM")
        with gr.Tab("Guidance map"):
            gr.Markdown(
                "Where the prompt changes the model's x0 prediction at one step: the prediction with the prompt minus the one without it, "
                "at the same x_t (two model calls, no masks, needs the model that made the trace). It passes the sanity checks on the "
                "embedded model; it shows where the conditioning acts, not which input pixels the prediction depends on. Name words "
                "(comma-separated, or a phrase) for theirs instead: the prediction with their tokens masked against the unmasked one."
            )
            guidance_step = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="guidance-step")
            guidance_words = gr.Textbox(label="words (empty: the whole prompt)", placeholder="e.g. red, or: red circle", elem_id="guidance-words")
            guidance_run = gr.Button("Run the guidance map", variant="primary", elem_id="run-guidance")
            guidance_outputs = map_panel(gr, "guidance", "guidance")
        with gr.Tab("Causal onset"):
            gr.Markdown(
                "When each prompt word starts to shape the model's prediction: at every step the traced x_t is denoised with the "
                "prompt and with the word swapped for a contrasting value of its kind (another colour, the other size, the opposite "
                "relation; removed where it has none). One model call per word and step; needs the model that made the trace."
            )
            onset_run = gr.Button("Run the causal onset", variant="primary", elem_id="run-onset")
            onset_verdict = gr.Markdown(elem_id="onset-verdict")
            onset_plot = gr.Image(label="effect of editing each word, per step", format="png", interactive=False, elem_id="onset-plot")
            onset_table = gr.Dataframe(label="per word", interactive=False, elem_id="onset-table")
            onset_caption = gr.Markdown(elem_id="onset-caption")

        onset_outputs = [onset_plot, onset_table, onset_verdict, onset_caption]
        first_outputs = [state, final, info, *rise_outputs, *cam_outputs, *guidance_outputs, *onset_outputs, download, download_box, download_trace, download_report]
        view_outputs = [step, play, x_t, x0, step_caption, chips, step_span, word_image, words_grid, word_caption, plot, table, rise_step, cam_step, layer, guidance_step]

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
            show_progress_on=[final],  # the progress text sits on the image, not over the summary's placeholder
        )
        generated.success(on_sizes, [model], [size], show_progress="hidden", api_name=False)
        opened = trace_file.upload(on_open, [state, trace_file], first_outputs, api_name="open_trace", show_progress_on=[final])
        for event in (generated, opened):
            event.success(on_views, [state, kind], view_outputs, api_name=False).success(
                on_tol, [state, tol], [recovery_grid, recovery_curves, recovery_sanity], api_name=False
            )
        # .input: only what the user moves; the views set these sliders themselves
        step.input(on_step, [state, step], [x_t, x0, step_caption], show_progress="hidden", trigger_mode="always_last", api_name="step")
        play.click(on_play, [state, step, playing], [timer, play, playing, step], api_name=False)
        timer.tick(on_tick, [state, step], [timer, play, playing, step, x_t, x0, step_caption], show_progress="hidden", api_name=False)
        word_inputs = [state, chips, typed, step_span]
        word_outputs = [word_image, words_grid, word_caption]
        # one listener for all word controls: a session's word views then run one after another and
        # the last request wins (separate listeners could finish out of order and show a stale word)
        gr.on(
            [chips.input, typed.submit, step_span.release],
            on_word,
            word_inputs,
            word_outputs,
            trigger_mode="always_last",
            api_name="word",
        )
        kind.input(on_kind, [state, kind], [plot, table], api_name="concepts")
        tol.input(on_tol, [state, tol], [recovery_grid, recovery_curves, recovery_sanity], api_name="recovery")
        preset.input(on_preset, [preset], [masks, similarity, centered], api_name=False)
        rise_run.click(on_rise, [state, rise_step, masks, preset, similarity, centered, model], rise_outputs, concurrency_limit=1, concurrency_id="model", api_name="rise")
        cam_run.click(on_cam, [state, cam_step, layer, model], cam_outputs, concurrency_limit=1, concurrency_id="model", api_name="cam")
        guidance_run.click(on_guidance, [state, guidance_step, guidance_words, model], guidance_outputs, concurrency_limit=1, concurrency_id="model", api_name="guidance")
        onset_run.click(on_onset, [state, model], onset_outputs, concurrency_limit=1, concurrency_id="model", api_name="onset")
        for button, fn, name in ((download_trace, on_download_trace, "download_trace"), (download_report, on_report, "report")):
            button.click(fn, [state], [download], api_name=name).success(lambda: gr.Column(visible=True), None, download_box, api_name=False)
        # the model's loading state: polled until it is loaded (or failed), e.g. while gradio_app.py preloads it
        status_timer = gr.Timer(1.0, active=True)
        status_timer.tick(on_status, [model], [status, status_timer, size], show_progress="hidden", api_name=False)
        demo.load(on_status, [model], [status, status_timer, size], show_progress="hidden", api_name=False)
        # a typed model: when the box is left or Enter pressed; a public app's menu: when picked
        for event in (model.blur, model.submit) if isinstance(model, gr.Textbox) else (model.change,):
            event(on_model_box, [model], [size], api_name=False)
    demo.queue(default_concurrency_limit=4, max_size=64)
    inputs.quiet_request_errors(demo)
    return demo
