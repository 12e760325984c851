"""Tests of the Gradio app: its functions on synthetic traces and tiny pipelines, four concurrent
users against the launched app (each must see only their own results), and an end-to-end
browser test driving Debian's Chromium with Playwright."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason="the app needs gradio: pip install -r requirements-dev.txt")

import explain_app as app  # noqa: E402
from explain import embedded  # noqa: E402
from explain import render as ui_render  # noqa: E402
from explain_app import ui  # noqa: E402
from explain.trace import Trace  # noqa: E402
from tests.explain.synthetic import synthetic_trace  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def solid_previews(steps: int, size: int) -> torch.Tensor:
    """x0 previews whose colour encodes the step: red channel = 10 * step."""
    previews = torch.zeros(steps, 1, size, size, 3, dtype=torch.uint8)
    for s in range(steps):
        previews[s, ..., 0] = 10 * s
        previews[s, ..., 2] = 200
    return previews


def quadrant_change(overlay: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Mean change an overlay made to the top-left and to the bottom-right quadrant."""
    diff = np.abs(overlay.astype(np.float32) - base.astype(np.float32)).mean(-1)
    h, w = diff.shape
    return float(diff[: h // 2, : w // 2].mean()), float(diff[h // 2 :, w // 2 :].mean())


@pytest.fixture(scope="module")
def models():
    return app.ModelCache()


@pytest.fixture
def session():
    return app.Session(trace=synthetic_trace(steps=6, negative=True), source="test")


# ---------------------------------------------------------------------------- input checks
def test_empty_and_overlong_prompts_are_refused_with_what_to_change():
    for empty in ("", "   ", None):
        with pytest.raises(app.InputError, match="prompt is empty"):
            app.check_prompt(empty)
    with pytest.raises(app.InputError, match="characters"):
        app.check_prompt("red " * 1000)
    assert app.check_prompt("  a red circle ") == "a red circle"


@pytest.mark.parametrize("value", [0, 151, 2.5, "many", None, float("nan")])
def test_steps_out_of_range_or_not_whole_are_refused(value):
    with pytest.raises(app.InputError, match="steps must be"):
        app.check_int("steps", value, 1, app.MAX_STEPS)


def test_sizes_must_be_multiples_of_eight_in_range():
    assert app.parse_size("model default") is None
    assert app.parse_size("512") == 512
    with pytest.raises(app.InputError, match="multiple of 8"):
        app.parse_size(100)
    with pytest.raises(app.InputError, match="between 64 and 1024"):
        app.parse_size(2048)


def test_generate_checks_input_before_loading_any_model():
    def loader(spec):
        raise AssertionError("the model must not load for bad input")

    lazy = app.ModelCache(loader=loader)
    with pytest.raises(app.InputError, match="prompt is empty"):
        app.generate("", models=lazy)
    with pytest.raises(app.InputError, match="steps must be between 1 and"):
        app.generate("a red circle", steps=0, models=lazy)
    with pytest.raises(app.InputError, match="guidance"):
        app.generate("a red circle", guidance=-1, models=lazy)
    with pytest.raises(app.InputError, match="unknown schedule"):
        app.generate("a red circle", schedule="sideways", models=lazy)


def test_model_cache_loads_once_keeps_the_recent_ones_and_explains_bad_models():
    loads = []

    def loader(spec):
        if spec == "missing/folder":
            from explain.adapters.diffusers import ModelLoadError

            raise ModelLoadError("no model folder at missing/folder; pass an existing diffusers folder with --model")
        loads.append(spec)
        return object(), spec

    cache = app.ModelCache(loader=loader, max_models=2)
    first = cache.get("one")
    assert cache.get(" one ") is first and cache.get(None)[1] == "embedded"
    cache.get("one")
    cache.get("two")  # "embedded" is now the least recently used and goes
    cache.get("embedded")
    assert loads == ["one", "embedded", "two", "embedded"]
    with pytest.raises(app.InputError, match="with the model box"):
        cache.get("missing/folder")


def test_ui_wrapper_shows_errors_as_messages_and_passes_results():
    @ui._ui
    def fails(kind):
        if kind == "input":
            raise app.InputError("type a prompt")
        if kind == "key":
            raise KeyError("no such word")
        return "ok"

    with pytest.raises(gr.Error, match="type a prompt"):
        fails("input")
    with pytest.raises(gr.Error, match="no such word"):
        fails("key")
    assert fails("fine") == "ok"


# ---------------------------------------------------------------------------- browsing a trace
def test_step_view_shows_the_chosen_steps_prediction(session):
    trace = session.trace
    trace.x0_previews = solid_previews(trace.num_steps, 32)
    for step in (0, 3, 5):
        _, x0, caption = app.step_view(trace, step)
        assert x0.shape[0] >= app.DISPLAY_SIDE
        assert int(np.median(x0[..., 0])) == 10 * step
        assert f"step {step} of 5" in caption
    with pytest.raises(app.InputError, match="between 0 and 5"):
        app.step_view(trace, 6)


def test_word_heatmaps_are_where_the_word_attends(session):
    trace = session.trace
    base = app.enlarge(trace.images[0].numpy())
    red = dict(app.content_words(trace))["red"]
    red_overlay, grid, caption = app.word_view(trace, red, "", 0, 5)
    top_left, bottom_right = quadrant_change(red_overlay[: base.shape[0]], base)  # the colour bar sits below
    assert top_left > 2 * bottom_right
    blue_overlay, _, _ = app.word_view(trace, None, "blue square", 3, 5)
    top_left, bottom_right = quadrant_change(blue_overlay[: base.shape[0]], base)
    assert bottom_right > 2 * top_left
    assert "'red', steps 0-5" in caption and grid.ndim == 3


def test_word_chips_are_unique_and_default_to_a_content_word(session):
    labels = [label for label, _ in app.content_words(session.trace)]
    assert labels == ["a", "red", "circle", "above", "a (2)", "blue", "square"]
    assert ui.heatmaps.prompt_words(session.trace)[app.default_word(session.trace)].text == "red"


def test_word_view_explains_bad_words_and_step_ranges(session):
    with pytest.raises(app.InputError, match="'green' is not in the prompt; its words are: 'a', 'red'"):
        app.word_view(session.trace, None, "green", 0, 5)
    with pytest.raises(app.InputError, match="after 'to step'"):
        app.word_view(session.trace, 1, "", 4, 2)
    with pytest.raises(app.InputError, match="between 0 and 5"):
        app.word_view(session.trace, 1, "", 0, 9)
    with pytest.raises(app.InputError, match="choose a word"):
        app.word_view(session.trace, None, "", 0, 5)


def test_concept_curves_cover_content_words_and_show_the_trend(session):
    frame, table = app.concept_frame(session.trace, "share")
    assert sorted(set(frame["word"])) == ["above", "blue", "circle", "red", "square"]
    assert sorted(set(frame["step"]), key=int) == [str(s) for s in range(6)]  # whole steps, as labels
    red = frame[frame["word"] == "red"].sort_values("step", key=lambda s: s.astype(int))["value"].to_numpy()
    blue = frame[frame["word"] == "blue"].sort_values("step", key=lambda s: s.astype(int))["value"].to_numpy()
    assert red[-1] > red[0] and blue[-1] < blue[0]
    assert list(table["word"]) == ["red", "circle", "above", "blue", "square"]
    with pytest.raises(app.InputError, match="unknown curve"):
        app.concept_frame(session.trace, "volume")


def test_recovery_view_and_tolerance_bounds(session):
    grid, curves = app.recovery_views(session.trace, 0.25)
    assert grid.ndim == 3 and curves.ndim == 3
    with pytest.raises(app.InputError, match="tolerance"):
        app.recovery_views(session.trace, 0)


def test_summary_lists_prompt_negative_prompt_and_notes(session):
    session.notes = ["a | note"]
    text = app.summary(session)
    assert "a red circle above a blue square" in text and "green triangle" in text and "a \\| note" in text
    with pytest.raises(app.InputError, match="generate an image or open a trace"):
        app.summary(app.Session())


# ---------------------------------------------------------------------------- files
def test_trace_files_round_trip_and_bad_files_get_clear_messages(tmp_path, session):
    path = app.save_trace_file(session)
    opened = app.open_trace(str(path))
    assert opened.trace.prompts == session.trace.prompts and opened.source == "opened trace.safetensors"
    assert torch.allclose(opened.trace.x0, session.trace.x0)

    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(app.InputError, match="not a diffusion-explain trace"):
        app.open_trace(str(weights))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(app.InputError, match="not a readable safetensors file"):
        app.open_trace(str(broken))
    picture = tmp_path / "image.png"
    picture.write_bytes(b"\x89PNG")
    with pytest.raises(app.InputError, match="image.png is not a trace"):
        app.open_trace(str(picture))
    with pytest.raises(app.InputError, match="choose a trace file"):
        app.open_trace(None)
    app.close_session(session)
    assert not path.parent.exists()


def test_report_download_is_a_self_contained_page(session):
    html = app.save_report(session)
    page = html.read_text()
    assert html.name == "index.html" and "a red circle above a blue square" in page and "data:image/png;base64," in page
    app.close_session(session)


# ---------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def tiny_session(models):
    return app.generate("a red circle above a blue square", steps=4, seed=3, model="tiny", models=models)


def test_generation_traces_the_prompt_with_the_chosen_settings(tiny_session):
    trace = tiny_session.trace
    assert trace.prompts == ["a red circle above a blue square"]
    assert trace.num_steps == 4 and trace.meta["seed"] == 3 and trace.attention is not None
    assert trace.x0_previews is not None and tiny_session.model == "tiny"
    assert [label for label, _ in app.content_words(trace)][:3] == ["a", "red", "circle"]
    assert set(tiny_session.timings) == {"time: load model", "time: generate + trace"}


def test_paper_schedules_run_on_a_pndm_model_and_leave_its_scheduler_alone():
    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("pndm")
    own = pipe.scheduler
    cache = app.ModelCache(loader=lambda spec: (pipe, "tiny pndm"))
    session = app.generate("a red circle", steps=3, schedule="early", lam=10, model="pndm", models=cache)
    assert type(session.trace.meta["scheduler"]) is str and session.trace.meta["scheduler"] == "DPMSolverMultistepScheduler"
    assert any("PNDMScheduler cannot run custom time steps" in note for note in session.notes)
    assert pipe.scheduler is own  # other users of the cached pipeline keep PNDM


def test_generation_reports_progress_step_by_step(models):
    seen = []
    app.generate("a red circle", steps=3, model="tiny", models=models, progress=lambda fraction, desc=None: seen.append((fraction, desc)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(0.9)
    assert [d for _, d in seen][-3:] == [f"denoising: model call {i} of 3" for i in (1, 2, 3)]


def test_gpu_work_is_wrapped_for_zerogpu_when_spaces_is_importable(monkeypatch):
    import importlib.util
    import sys
    import types

    wrapped = []
    fake = types.ModuleType("spaces")

    def GPU(duration=60):  # noqa: N802 - the name the spaces package uses
        def decorate(fn):
            wrapped.append((fn.__name__, duration))
            return fn

        return decorate

    fake.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", fake)
    spec = importlib.util.spec_from_file_location("explain_app_ui_on_zerogpu", Path(ui.__file__))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert sorted(name for name, _ in wrapped) == ["cam_view", "generate", "guidance_view", "onset_view", "rise_view"]
    assert ui._spaces is None  # the app imported here, without spaces, wraps nothing


def test_overlong_prompts_run_with_a_note_naming_the_cut_words(models):
    prompt = "a red circle above a blue square " * 12 + "green triangle"
    session = app.generate(prompt, steps=2, model="tiny", models=models)
    assert any("cut off" in note and "green triangle" in note for note in session.notes)


def test_df_rise_panel_gives_maps_game_curves_and_aucs(tiny_session, models):
    view = app.rise_view(tiny_session, 2, 16, models=models)
    assert view.overlay_final.shape[:2] == view.overlay_x0.shape[:2]
    assert set(view.curves["curve"]) == {"insertion (DF-RISE)", "deletion (DF-RISE)", "insertion (random)", "deletion (random)"}
    assert len(view.aucs) == 2 and set(view.aucs["beats random"]) <= {"yes", "no"} and "step 2" in view.caption
    with pytest.raises(app.InputError, match="between 8 and"):
        app.rise_view(tiny_session, 2, 1, models=models)
    with pytest.raises(app.InputError, match="DF-RISE step must be between 0 and 3"):
        app.rise_view(tiny_session, 7, 16, models=models)


def test_df_cam_panel_by_layer_group_and_bad_layer(tiny_session, models):
    pipe = models.get("tiny")[0]
    choices = app.cam_layer_choices(pipe)
    assert choices[:5] == list(app.CAM_GROUPS) and any(c.startswith("up_blocks.") for c in choices[5:])
    view = app.cam_view(tiny_session, 1, "up_blocks", models=models)
    assert view.overlay_final.shape == view.overlay_x0.shape and "up_blocks" in view.caption
    assert len(view.aucs) == 2 and "beats random" in view.verdict
    with pytest.raises(app.InputError, match="no layer 'nowhere'"):
        app.cam_view(tiny_session, 1, "nowhere", models=models)


def test_guidance_panel_gives_its_map_games_and_verdicts(tiny_session, models):
    view = app.guidance_view(tiny_session, 1, models=models)
    assert view.overlay_final.shape == view.overlay_x0.shape and "Guidance map at step 1" in view.caption
    assert set(view.curves["curve"]) == {"insertion (Guidance map)", "deletion (Guidance map)", "insertion (random)", "deletion (random)"}
    assert len(view.aucs) == 2 and "beats random" in view.verdict and "passes the sanity checks" in view.verdict
    assert view.method.method_id == "guidance_map" and tiny_session.explanations["Guidance map"] is view.method
    with pytest.raises(app.InputError, match="guidance-map step must be between 0 and 3"):
        app.guidance_view(tiny_session, 9, models=models)


def test_guidance_panel_maps_named_words_with_their_own_verdict(tiny_session, models):
    from explain.methods.guidance import guidance_map

    tiny_session = dataclasses.replace(tiny_session, explanations={})  # the shared session's panels stay as the other tests left them
    view = app.guidance_view(tiny_session, 1, models=models, words="red")
    assert view.method.method_id == "guidance_word" and view.method.method == "Guidance map of 'red'"
    assert "masking the tokens of 'red'" in view.caption and view.method.settings["against"] == "without red"
    whole = app.guidance_view(tiny_session, 1, models=models)
    assert not torch.allclose(view.method.saliency, whole.method.saliency)  # the word's map, not the prompt's
    pipe = models.get("tiny")[0]
    from explain.adapters.diffusers import from_pipeline

    expected = guidance_map(from_pipeline(pipe, tiny_session.trace), tiny_session.trace, 1, words="red").latent
    assert torch.allclose(view.method.saliency, expected, atol=1e-6)
    both = app.guidance_view(tiny_session, 1, models=models, words="red, square")
    assert both.method.settings["against"] == "without red square"
    with pytest.raises(app.InputError, match="'green' is not in the prompt.*leave the words empty"):
        app.guidance_view(tiny_session, 1, models=models, words="green")


def test_causal_onset_panel_gives_each_word_its_edit_and_onset(tiny_session, models):
    view = app.onset_view(tiny_session, models=models)
    words = [w.text for w in tiny_session.trace.words[0] if w.token_indices]
    assert len(view.table) == len(words) and set(view.table.columns) >= {"word", "edit", "onset step", "edited prompt"}
    assert view.plot.ndim == 3 and "causal onset:" in view.verdict and "not measured" in view.verdict  # the tiny model was never benchmarked
    steps = tiny_session.trace.num_steps
    assert all(0 <= k < steps for k in view.table["onset step"]) and tiny_session.onset is view.onset
    assert "causal onset" in app.save_report(tiny_session).read_text()


def test_opened_traces_need_a_model_with_matching_latents(models, session):
    with pytest.raises(app.InputError, match="4-channel latents but this trace has 3"):
        session.trace.x_t = session.trace.x_t[:, :, :3]
        session.trace.x0 = session.trace.x0[:, :, :3]
        app.model_for_trace(session, "tiny", models)


# ---------------------------------------------------------------------------- issue 16: what a panel says
def test_df_rise_panel_runs_the_librarys_defaults_and_shows_its_verdicts(tiny_session, models, monkeypatch):
    from explain.methods import defaults

    changed = dataclasses.replace(defaults.RISE, n_masks=24, similarity="neg_mse", centered=not defaults.RISE.centered)
    monkeypatch.setattr(defaults, "RISE", changed)
    monkeypatch.setitem(defaults.PRESETS, "default", changed)
    view = app.rise_view(tiny_session, 1, models=models)  # nothing chosen: the library's settings
    assert view.method.settings == changed.kwargs()
    assert "**beats random:**" in view.verdict and "passes the sanity checks:** not measured" in view.verdict
    paper = app.rise_view(tiny_session, 1, 16, models=models, preset="paper")
    assert paper.method.settings == dataclasses.replace(defaults.PAPER_RISE, n_masks=16).kwargs()
    with pytest.raises(app.InputError, match="unknown similarity 'ssim3'"):
        app.rise_settings(similarity="ssim3")
    # the panel's controls start at the same settings
    demo = ui.build_app(default_model="tiny", models=models)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["rise-masks"].value == 24 and by_id["rise-similarity"].value == "neg_mse" and by_id["rise-centered"].value == changed.centered
    assert by_id["cam-layer"].value == defaults.CAM.layers and by_id["curve-kind"].value == "share"


def test_the_html_report_includes_the_sessions_df_rise_df_cam_and_guidance_map(tiny_session, models):
    app.rise_view(tiny_session, 1, 16, models=models)
    app.cam_view(tiny_session, 2, "up_blocks", models=models)
    app.guidance_view(tiny_session, 3, models=models)
    page = app.save_report(tiny_session).read_text()
    assert "DF-RISE at step 1" in page and "DF-CAM at step 2" in page and "Guidance map at step 3" in page
    assert page.count("beats random: ") == 3
    assert app.generate("a red circle", steps=2, model="tiny", models=models).explanations == {}  # a new image starts empty


def test_sizes_offered_are_the_models_own_and_others_say_they_were_not_trained(models):
    pipe = models.get("tiny")[0]
    assert app.native_size(pipe) == 32
    choices = app.size_choices(64)
    assert choices[0] == ("64 px (the model's size)", "model default")
    assert [v for _, v in choices[1:]] == ["96", "128"] and all("not trained" in label for label, _ in choices[1:])

    def refuse(spec):
        raise AssertionError("the size menu must not load a model")

    assert app.model_size_choices("embedded", app.ModelCache(loader=refuse))[0][0] == "64 px (the model's size)"  # from its config files
    session = app.generate("a red circle", steps=2, size="64", model="tiny", models=models)
    note = "the model was trained at 32×32 px, not 64×64: expect repeated, tiled objects"
    assert any(note in n for n in session.notes) and any(note in n for n in session.trace.meta["notes"])
    assert not any("trained at" in n for n in app.generate("a red circle", steps=2, model="tiny", models=models).notes)


@pytest.mark.skipif(not embedded.is_available("dit"), reason="the embedded DiT's weights are not shipped")
def test_the_app_offers_the_embedded_dit_and_generates_with_it():
    def refuse(spec):
        raise AssertionError("the size menu must not load a model")

    local = ui.build_app(default_model="embedded", models=app.ModelCache(loader=refuse, policy=app.session.LOCAL_POLICY))
    (box,) = [b for b in local.blocks.values() if getattr(b, "elem_id", None) == "model"]
    assert "'embedded-dit' (the shapes MMDiT" in box.info
    assert app.model_size_choices("embedded-dit", app.ModelCache(loader=refuse))[0][0] == "64 px (the model's size)"
    models = app.ModelCache(policy=app.session.LOCAL_POLICY)
    session = app.generate("a large red circle above a small blue square", steps=3, model="embedded-dit", models=models)
    assert session.trace.meta["family"] == "sd3" and session.trace.meta["model"].startswith("embedded-dit")
    assert session.model == "embedded-dit" and session.trace.images.shape[1:3] == (64, 64)
    with pytest.raises(app.InputError, match=r"did you mean embedded-dit\?.*embedded-dit \(the shapes MMDiT model"):
        app.generate("a red circle", steps=2, model="embeded-dit", models=models)


def test_an_opened_trace_shows_the_warnings_recorded_with_it(tmp_path):
    trace = synthetic_trace(steps=3)
    trace.meta["notes"] = ["the embedded model never saw 'grean' (in the prompt); their maps mean nothing"]
    session = app.open_trace(str(trace.save(tmp_path / "noted.safetensors")))
    assert session.notes == trace.meta["notes"]
    assert "never saw 'grean'" in app.summary(session)


def test_the_word_heatmap_carries_a_colour_bar(session):
    single, _, _ = app.word_view(session.trace, 1, "", 0, 5)
    side = app.enlarge(session.trace.images[0].numpy()).shape[0]
    assert single.shape[0] > side + 10
    bar = single[side + 3 : side + 12]
    assert bar[:, 2, 2].mean() > 100 and bar[:, 2, 0].mean() < 60  # blue at the cold end
    assert bar[:, -3, 0].mean() > 100 and bar[:, -3, 2].mean() < 60  # red at the hot end


def test_model_cache_says_whether_a_model_is_loading_ready_or_failed():
    release = threading.Event()

    def loader(spec):
        if spec == "bad":
            raise app.InputError("no such model")
        release.wait(30)
        return object(), spec

    cache = app.ModelCache(loader=loader)
    assert cache.status("slow") == "not loaded" and "loads at the first Generate" in app.model_status("slow", cache)
    thread = threading.Thread(target=cache.get, args=("slow",))
    thread.start()
    for _ in range(100):
        if cache.status("slow") == "loading":
            break
        threading.Event().wait(0.01)
    assert cache.status("slow") == "loading" and "loading the model" in app.model_status("slow", cache)
    release.set()
    thread.join(30)
    assert cache.status("slow") == "ready" and "is loaded" in app.model_status("slow", cache)
    with pytest.raises(app.InputError):
        cache.get("bad")
    assert cache.status("bad") == "failed: no such model" and "could not be loaded" in app.model_status("bad", cache)


# ---------------------------------------------------------------------------- launched app
@pytest.fixture(scope="module")
def launched(models):
    demo = ui.build_app(default_model="tiny", models=models)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    yield url
    demo.close()


def test_four_users_at_once_see_only_their_own_results(launched, tmp_path):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (installed with gradio)")
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle above a purple square"]
    results: dict[int, object] = {}
    errors: dict[int, Exception] = {}
    barrier = threading.Barrier(len(prompts))

    def user_downloads(i: int) -> None:
        try:
            client = gradio_client.Client(launched, verbose=False, download_files=str(tmp_path / f"user{i}"))
            barrier.wait(timeout=60)
            out = client.predict(prompts[i], "", i, 2, 5.0, "model default", "uniform", 60, "tiny", api_name="/generate")
            barrier.wait(timeout=120)  # everyone has generated before anyone reads back: shared state would show
            path = client.predict(api_name="/download_trace")
            results[i] = (out[1], Trace.load(path))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=user_downloads, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == list(range(len(prompts))), results
    for i, (summary_text, trace) in results.items():
        assert prompts[i] in summary_text
        assert trace.prompts == [prompts[i]] and trace.meta["seed"] == i


def test_bad_input_over_the_api_gets_the_message_and_the_app_keeps_running(launched):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (installed with gradio)")
    client = gradio_client.Client(launched, verbose=False)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("", "", 0, 2, 5.0, "model default", "uniform", 60, "tiny", api_name="/generate")
    with pytest.raises(Exception, match="generate an image or open a trace"):
        client.predict(api_name="/download_trace")
    out = client.predict("a red circle", "", 0, 2, 5.0, "model default", "uniform", 60, "tiny", api_name="/generate")
    assert "a red circle" in out[1]


# ---------------------------------------------------------------------------- browser
def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)


def _need_browser():
    if CHROMIUM is None:
        pytest.skip("no system Chromium: apt-get install chromium (Playwright's own browser download is not used)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -r requirements-dev.txt")
    sync_api.expect.set_options(timeout=20_000)  # the machine is shared: give each check time, not just 5 s
    return sync_api


@pytest.mark.browser
def test_browser_generate_explain_and_open_a_trace(launched, tmp_path):
    sync_api = _need_browser()
    expect = sync_api.expect
    synthetic_trace(steps=6).save(tmp_path / "synthetic.safetensors")

    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(launched)
            expect(page.locator("#generate")).to_be_visible(timeout=60_000)  # a loaded machine serves the page slowly
            # nothing to download before there is an image
            expect(page.locator("#download-trace")).to_be_disabled()
            expect(page.locator("#download-report")).to_be_disabled()
            # an example fills the prompt
            page.locator("#examples").get_by_text("a green triangle on the left").click()
            expect(page.locator("#prompt textarea")).to_have_value("a green triangle on the left")
            # an empty prompt gets a message, and the app keeps working
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            expect(page.get_by_text("the prompt is empty").first).to_be_visible(timeout=30_000)

            page.locator("#prompt textarea").fill("a red circle above a blue square")
            page.locator("#steps input[type=number]").fill("3")
            page.locator("#generate").click()
            expect(page.locator("#summary")).to_contain_text("a red circle above a blue square", timeout=120_000)
            expect(page.locator("#final-image img")).to_be_visible()
            expect(page.locator("#summary")).to_contain_text("3")
            expect(page.locator("#download-trace")).to_be_enabled()
            # the summary's first column never wraps ("settin g", "guidanc e")
            cells = page.locator("#summary td:first-child")
            assert set(cells.evaluate_all("els => els.map(e => getComputedStyle(e).whiteSpace)")) == {"nowrap"}
            heights = cells.evaluate_all("els => els.map(e => e.getBoundingClientRect().height)")
            assert max(heights[:4]) < 1.6 * min(heights[:4])  # one line each
            # the size menu offers the model's size and a few it was not trained at, not 1024 px
            expect(page.locator("#size input")).to_have_value("32 px (the model's size)", timeout=30_000)  # read from the loaded pipeline
            page.locator("#size input").click()
            options = page.get_by_role("option").all_inner_texts()
            page.keyboard.press("Escape")
            assert any("32 px (the model's size)" in o for o in options) and not any("1024" in o for o in options), options

            # Steps: play runs through the steps
            page.get_by_role("tab", name="Steps").click()
            page.locator("#step-slider input[type=number]").fill("0")
            page.locator("#step-slider input[type=number]").press("Enter")
            expect(page.locator("#step-caption")).to_contain_text("step 0 of 2", timeout=30_000)
            page.locator("#play").click()
            expect(page.locator("#step-caption")).to_contain_text("step 2 of 2", timeout=30_000)
            expect(page.locator("#play")).to_have_text("▶ play", timeout=10_000)

            page.get_by_role("tab", name="Words").click()
            expect(page.locator("#word-heatmap img")).to_be_visible()
            page.locator("#word-chips").get_by_text("blue", exact=True).click()
            expect(page.locator("#word-heatmap")).to_contain_text("heatmap")
            expect(page.get_by_text("'blue', steps 0-2")).to_be_visible(timeout=30_000)
            # one range control with two thumbs instead of two sliders
            assert page.locator("#from-step").count() == 0 and page.locator("#step-range input[type=range]").count() == 2
            page.locator("#step-range input.lo").fill("1")
            expect(page.get_by_text("'blue', steps 1-2")).to_be_visible(timeout=30_000)
            # a mistyped word: a message beside the last result, not two red Error badges
            page.locator("#typed-word textarea, #typed-word input").first.fill("grean")
            page.locator("#typed-word textarea, #typed-word input").first.press("Enter")
            expect(page.locator("#word-caption")).to_contain_text("'grean' is not in the prompt", timeout=30_000)
            expect(page.locator("#word-heatmap img")).to_be_visible()
            expect(page.locator("#words-grid img")).to_be_visible()
            assert "Error" not in page.locator("#word-heatmap").inner_text() + page.locator("#words-grid").inner_text()

            page.get_by_role("tab", name="Concepts").click()
            sync_api.expect(page.locator("#concept-plot svg").first).to_be_visible(timeout=30_000)
            expect(page.locator("#concept-plot")).to_contain_text("circle")
            expect(page.locator("#curve-kind input[value=share]")).to_be_checked()
            ticks = page.locator("#concept-plot .role-axis-label text").all_text_contents()
            steps = [t for t in ticks if t.isdigit()]
            assert steps == ["0", "1", "2"], ticks  # whole steps only: no 0.5, no step 3
            titles = page.locator("#concept-plot .role-axis-title text").all_text_contents()
            assert "share of the prompt words' attention" in titles and "value" not in titles
            strokes = page.locator("#concept-plot .mark-line path").evaluate_all("els => els.map(e => e.getAttribute('stroke'))")
            assert ui_render.hex_color(ui_render.WORD_COLORS["blue"]) in strokes and ui_render.hex_color(ui_render.WORD_COLORS["red"]) in strokes
            shot = Path(os.environ.get("GRADIO_APP_SCREENSHOT") or tmp_path / "gradio_app.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # DF-RISE and DF-CAM panels say whether their maps beat random and pass the sanity checks
            page.get_by_role("tab", name="DF-RISE").click()
            page.locator("#rise-masks input[type=number]").fill("16")
            page.locator("#rise-masks input[type=number]").press("Enter")
            page.locator("#run-rise").click()
            expect(page.locator("#rise-verdict")).to_contain_text("beats random", timeout=120_000)
            expect(page.locator("#rise-verdict")).to_contain_text("passes the sanity checks")
            expect(page.locator("#rise-map img")).to_be_visible()
            page.get_by_role("tab", name="DF-CAM").click()
            page.locator("#run-cam").click()
            expect(page.locator("#cam-verdict")).to_contain_text("beats random", timeout=120_000)

            # the HTML report carries the maps computed in the session
            page.locator("#download-report").click()
            link = page.locator("#download a[href$='index.html']")
            expect(link).to_be_visible(timeout=60_000)
            report = page.request.get(link.get_attribute("href")).text()
            assert "DF-RISE at step" in report and "DF-CAM at step" in report

            page.locator("#download-trace").click()
            expect(page.locator("#download a[href$='trace.safetensors']")).to_be_visible(timeout=30_000)

            # opening another trace clears every explanation of the previous image
            page.get_by_role("tab", name="Open a trace").click()
            page.locator("#trace-file input[type=file]").set_input_files(str(tmp_path / "synthetic.safetensors"))
            expect(page.locator("#summary")).to_contain_text("opened synthetic.safetensors", timeout=60_000)
            expect(page.locator("#word-chips")).to_contain_text("square")
            expect(page.locator("#download")).to_be_hidden()
            page.get_by_role("tab", name="DF-CAM").click()
            expect(page.locator("#cam-map img")).to_have_count(0)
            expect(page.locator("#cam-verdict")).not_to_contain_text("beats random")
            page.get_by_role("tab", name="DF-RISE").click()
            expect(page.locator("#rise-map img")).to_have_count(0)
            expect(page.locator("#rise-x0 img")).to_have_count(0)
            expect(page.locator("#rise-verdict")).not_to_contain_text("beats random")
            expect(page.locator("#rise-caption")).not_to_contain_text("DF-RISE at step")
            assert page.locator("#rise-auc").inner_text().count("insertion") == 0
        finally:
            browser.close()


@pytest.mark.browser
def test_browser_says_the_model_is_loading_and_shows_progress_on_the_image(tmp_path):
    sync_api = _need_browser()
    expect = sync_api.expect
    from explain.testing import tiny_sd_pipeline

    release = threading.Event()

    def slow_loader(spec):
        release.wait(60)  # the model loading in the background, as gradio_app.py preloads it
        return tiny_sd_pipeline(), "tiny (random weights, test only)"

    cache = app.ModelCache(loader=slow_loader)
    preload = threading.Thread(target=cache.get, args=("tiny",), daemon=True)
    preload.start()
    demo = ui.build_app(default_model="tiny", models=cache)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        with sync_api.sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                expect(page.locator("#generate")).to_be_visible(timeout=60_000)
                expect(page.locator("#model-status")).to_contain_text("loading the model", timeout=30_000)
                page.locator("#steps input[type=number]").fill("2")
                page.locator("#generate").click()
                # while it waits, the progress shows on the image; the summary keeps its text, uncovered
                expect(page.locator("#final-image [data-testid=status-tracker]").first).not_to_have_class(re.compile(r"\bhide\b"), timeout=30_000)
                expect(page.locator("#summary [data-testid=status-tracker]").first).to_have_class(re.compile(r"\bhide\b"))
                expect(page.locator("#summary")).to_contain_text("Generate an image or open a trace to begin.")
                release.set()
                expect(page.locator("#model-status")).to_contain_text("is loaded", timeout=60_000)
                expect(page.locator("#summary")).to_contain_text("a large red circle", timeout=120_000)
            finally:
                browser.close()
    finally:
        release.set()
        demo.close()


# ---------------------------------------------------------------------------- issue 12: verdicts beside each map
def test_word_and_recovery_views_say_whether_their_method_passes(session):
    """Beside the word heatmap and the R1 view: the cached sanity verdict for the trace's model,
    or, for a model none was measured for, that it was not and how to measure one on demand."""
    from explain import explanations

    _, _, caption = app.word_view(session.trace, None, "red", 0, 5)
    assert "**word heatmaps**" in caption and "not measured for this model" in caption and "verdict_on_demand" in caption
    embedded = dataclasses.replace(session.trace, meta={**session.trace.meta, "model": "embedded (diffusion-explain/shapes-64)"})
    passes, line = explanations.sanity_verdict("recovery", "embedded (diffusion-explain/shapes-64)")
    text = app.recovery_verdict(embedded)
    if passes is None:
        pytest.skip("no verdicts are shipped for the embedded model (run benchmarks/bench_sanity.py --write-verdicts)")
    assert "**R1 recovery view**" in text and "cached verdict" in text and ("✅" if passes else "⚠️") in text
