"""The Gradio Blocks: components wired to the plain functions of `explain_app`."""

from __future__ import annotations

from explain import schedules
from explain.methods import heatmaps
from explain.trace import TraceFormatError
from explain_app.actions import CAM_GROUPS, cam_layer_choices, cam_view, generate, open_trace, rise_view, save_report, save_trace_file
from explain_app.inputs import CURVE_KINDS, DEFAULT_MASKS, DEFAULT_MODEL, MAX_GUIDANCE, MAX_LAM, MAX_MASKS, MAX_SEED, MAX_STEPS, SIZES, InputError
from explain_app.session import MODELS, ModelCache, Session, _session, close_session
from explain_app import inputs
from explain_app.inputs import user_error
from explain_app.session import check_generation
from explain_app.views import concept_frame, content_words, default_word, final_view, recovery_views, step_view, summary, word_view

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
            raise user_error(exc) from None
        except (ValueError, KeyError, IndexError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise user_error(message) from None

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
        check_generation(models, model if allow_model_choice else default_model, size, steps)  # before the queue for the model
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
        inputs.check_masks(n_masks)
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
                        steps = gr.Slider(1, inputs.LIMITS.max_steps, value=20, step=1, label="steps", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="guidance", elem_id="guidance")
                        size = gr.Dropdown(inputs.size_choices(), value="model default", label="size (px)", elem_id="size")
                    with gr.Row():
                        schedule = gr.Radio(list(schedules.SCHEDULES), value="uniform", label="time-step schedule", info="early: more steps at high noise (semantics); latter: more at low noise (details)")
                        lam = gr.Number(label="λ (early/latter)", value=60, precision=0, minimum=1, maximum=MAX_LAM)
                    if models.policy.allow_any:
                        model = gr.Textbox(
                            label="model",
                            value=default_model,
                            info="'embedded' (the shapes model), a local diffusers folder or a hub id",
                            interactive=allow_model_choice,
                            elem_id="model",
                        )
                    else:  # a public app: the operator's models only (any other is refused, whatever it names)
                        model = gr.Dropdown(
                            list(dict.fromkeys([default_model, *models.policy.choices])), value=default_model, label="model",
                            info="the models this app offers", interactive=allow_model_choice, allow_custom_value=True, elem_id="model",
                        )
                    run = gr.Button("Generate & explain", variant="primary", elem_id="generate")
                    gr.Markdown(inputs.LIMITS.describe(), elem_id="limits")
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
                masks = gr.Slider(8, inputs.LIMITS.max_masks, value=min(DEFAULT_MASKS, inputs.LIMITS.max_masks), step=8, label="masks", info="the paper used 500; ~200 take about 15 s on a 2-core CPU with the embedded model")
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
    inputs.quiet_request_errors(demo)
    return demo
