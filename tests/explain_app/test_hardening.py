"""The Gradio app as an open Space (issue 17): only the operator's models, bounded requests and
trace store, hostile trace files with the CLI's errors, and one log line per refused input."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio", reason="the app needs gradio: pip install -r requirements-dev.txt")

import gradio_app  # noqa: E402
from explain_app import actions, inputs, session, ui  # noqa: E402
from explain_app.inputs import InputError  # noqa: E402
from explain_app.session import ModelCache, ModelPolicy, Session, TraceStore, check_generation, public_policy  # noqa: E402
from explain.trace import Trace, TraceFormatError  # noqa: E402
from tests.explain.synthetic import synthetic_trace  # noqa: E402

PROBES = ["/etc", "/etc/passwd", "/root/.ssh", "/nonexistent", "~", "../../..", "someone/some-model", "C:\\Windows"]


def refusing_loader(calls):
    def loader(spec):
        calls.append(spec)
        raise AssertionError("the loader must not run for a model the operator did not list")
    return loader


# ---------------------------------------------------------------------------- which models
def test_a_public_app_refuses_unlisted_models_alike_before_looking_for_them():
    calls = []
    models = ModelCache(loader=refusing_loader(calls), policy=public_policy(["embedded", "embedded-dit"]))
    messages = set()
    for probe in PROBES:
        with pytest.raises(InputError) as caught:
            models.get(probe)
        messages.add(str(caught.value).replace(repr(probe), "NAME"))
    assert messages == {"the model NAME is not offered here; choose one of: embedded, embedded-dit"}, messages
    assert calls == [], "nothing looked at the file system or the hub"


def test_a_listed_model_that_fails_to_load_says_nothing_about_why_to_the_visitor(caplog):
    from explain.adapters.diffusers import ModelLoadError

    def loader(spec):
        raise ModelLoadError(f"no model folder at {spec}; pass an existing diffusers folder")

    models = ModelCache(loader=loader, policy=public_policy(["/srv/models/sd15"]))
    with caplog.at_level(logging.INFO, logger="explain_app"), pytest.raises(InputError) as caught:
        models.get("/srv/models/sd15")
    assert str(caught.value) == "the model '/srv/models/sd15' could not be loaded on this server; choose another"
    assert [r.getMessage() for r in caplog.records] == ["could not load the model '/srv/models/sd15': no model folder at /srv/models/sd15; pass an existing diffusers folder"]


def test_a_local_app_takes_any_model_and_explains_what_is_wrong():
    models = ModelCache(loader=lambda spec: (object(), spec), policy=session.LOCAL_POLICY)
    assert models.get("/any/folder")[1] == "/any/folder"
    restricted = ModelPolicy(("embedded",), allow_any=False)
    with pytest.raises(InputError, match="not offered here"):
        restricted.check("/etc/passwd")
    assert restricted.check(" embedded ") == "embedded" and restricted.check(None) == "embedded"


@pytest.mark.parametrize(
    "argv, env, public, allow_any, choices",
    [
        ([], {}, False, True, None),
        (["--models", "embedded,embedded-dit"], {}, False, False, ("embedded", "embedded-dit")),
        ([], {"SPACE_ID": "someone/space"}, True, False, ("embedded",)),
        (["--share"], {}, True, False, ("embedded",)),
        (["--host", "0.0.0.0"], {}, True, False, ("embedded",)),
        (["--share", "--models", "embedded-dit", "--model", "embedded"], {}, True, False, ("embedded", "embedded-dit")),
        (["--share", "--allow-any-model"], {}, True, True, ("embedded",)),
        (["--share", "--allow-any-model", "--fixed-model"], {}, True, False, ("embedded",)),
        (["--fixed-model", "--model", "tiny"], {}, False, False, ("tiny",)),
    ],
)
def test_the_operator_decides_which_models_a_public_app_offers(monkeypatch, argv, env, public, allow_any, choices):
    monkeypatch.delenv("SPACE_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    policy, limits, is_public = gradio_app.settings(gradio_app.build_parser().parse_args(argv))
    assert is_public is public and policy.allow_any is allow_any
    if choices is not None:
        assert policy.choices == choices
    assert limits == (inputs.PUBLIC_LIMITS if public else inputs.LOCAL_LIMITS)
    assert policy.hide_load_errors is public


def test_the_bounds_are_options(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    args = gradio_app.build_parser().parse_args(["--share", "--max-steps", "30", "--max-size", "256", "--max-masks", "64", "--max-traces", "4", "--max-trace-mb", "100"])
    _, limits, _ = gradio_app.settings(args)
    assert (limits.max_steps, limits.max_side, limits.max_masks, limits.max_traces, limits.max_trace_mb) == (30, 256, 64, 4, 100)
    assert limits.max_upload_mb == inputs.PUBLIC_LIMITS.max_upload_mb
    with pytest.raises(SystemExit):
        gradio_app.build_parser().parse_args(["--max-steps", "0"])


# ---------------------------------------------------------------------------- bounded requests
@pytest.fixture
def public_limits(monkeypatch):
    monkeypatch.setattr(inputs, "LIMITS", inputs.PUBLIC_LIMITS)
    return inputs.PUBLIC_LIMITS


def test_public_requests_are_bounded_before_any_model_loads(public_limits):
    calls = []
    models = ModelCache(loader=refusing_loader(calls), policy=public_policy(["embedded"]))
    with pytest.raises(InputError, match="steps must be between 1 and 50, got 150"):
        check_generation(models, "embedded", "model default", 150)
    with pytest.raises(InputError, match="image size must be between 64 and 512, got 1024"):
        check_generation(models, "embedded", "1024", 20)
    with pytest.raises(InputError, match=r"the embedded model was trained at 64 px, and 256 px is 4 times that.*Use at most 128 px$"):
        check_generation(models, "embedded", "256", 20)
    with pytest.raises(InputError, match="not offered here"):
        check_generation(models, "/etc/passwd", "64", 20)
    check_generation(models, "embedded", "128", 50)
    check_generation(models, "embedded", "model default", 1)
    with pytest.raises(InputError, match="number of masks must be between 8 and 500, got 4000"):
        inputs.check_masks(4000)
    assert inputs.check_masks(500) == 500
    assert inputs.size_choices() == ["model default", "64", "128", "256", "384", "512"]
    assert calls == []


def test_a_hub_models_size_is_checked_against_the_loaded_pipeline(public_limits):
    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    models = ModelCache(loader=lambda spec: (pipe, spec), policy=public_policy(["org/tiny"]))
    with pytest.raises(InputError, match="'org/tiny' was trained at 32 px, and 128 px is 4 times that"):
        check_generation(models, "org/tiny", "128", 2)
    check_generation(models, "org/tiny", "64", 2)


def test_the_local_limits_keep_the_old_bounds():
    assert inputs.LOCAL_LIMITS.max_steps == inputs.MAX_STEPS and inputs.LOCAL_LIMITS.max_masks == inputs.MAX_MASKS
    assert inputs.LOCAL_LIMITS.max_side == 1024


def _component(demo, elem_id):
    (found,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return found


def test_a_public_ui_offers_the_listed_models_and_shows_its_bounds(public_limits):
    models = ModelCache(loader=refusing_loader([]), policy=public_policy(["embedded", "embedded-dit"]))
    demo = ui.build_app(default_model="embedded", models=models)
    model = _component(demo, "model")
    assert isinstance(model, gr.Dropdown) and [c[1] for c in model.choices] == ["embedded", "embedded-dit"]
    assert _component(demo, "steps").maximum == 50
    sizes = [c[1] for c in _component(demo, "size").choices]  # the model's own size and a few near it (issue 16)
    assert sizes[0] == "model default" and all(int(v) <= 512 for v in sizes[1:])
    note = _component(demo, "limits").value
    assert "at most 50 steps, images up to 512 px" in note and "500 DF-RISE masks" in note
    assert "keeps the traces of the 16 most recent sessions, 1024 MB in all" in note
    local = ui.build_app(default_model="embedded", models=ModelCache(policy=session.LOCAL_POLICY))
    assert isinstance(_component(local, "model"), gr.Textbox)


# ---------------------------------------------------------------------------- the trace store
def _bytes(trace):
    return session.trace_bytes(trace)


def test_the_trace_store_is_bounded_in_count_oldest_first(monkeypatch):
    store = TraceStore(max_traces=2, max_bytes=10**9)
    monkeypatch.setattr(session, "STORE", store)
    first, second = Session(trace=synthetic_trace(steps=2)), Session(trace=synthetic_trace(steps=2))
    first.workdir()
    third = Session(trace=synthetic_trace(steps=2))
    assert first.trace is None and second.trace is not None and third.trace is not None and len(store) == 2
    assert not first.folder.exists(), "a dropped session's files go too"
    with pytest.raises(InputError, match=r"this tab's trace was dropped to make room for newer ones \(the app keeps the traces of the 2 most recent sessions, 954 MB in all\)"):
        first.require_trace()
    session.close_session(second)
    Session(trace=synthetic_trace(steps=2))
    assert third.trace is not None, "a closed tab freed its place"


def test_the_trace_store_is_bounded_in_bytes(monkeypatch):
    size = _bytes(synthetic_trace(steps=3))
    store = TraceStore(max_traces=100, max_bytes=int(2.5 * size))
    assert _bytes(synthetic_trace(steps=40)) > store.max_bytes
    monkeypatch.setattr(session, "STORE", store)
    sessions = [Session(trace=synthetic_trace(steps=3)) for _ in range(4)]
    assert [s.trace is not None for s in sessions] == [False, False, True, True]
    assert store.total() == 2 * size
    with pytest.raises(InputError, match="more than the 0 MB the app keeps for all sessions; use fewer steps or a smaller image"):
        Session(trace=synthetic_trace(steps=40))


def test_the_trace_store_holds_sessions_weakly(monkeypatch):
    import gc

    store = TraceStore(max_traces=3, max_bytes=10**9)
    monkeypatch.setattr(session, "STORE", store)
    for _ in range(5):
        Session(trace=synthetic_trace(steps=2))
    gc.collect()
    assert len(store) == 0 and store.total() == 0


def test_configure_sets_the_store_and_the_limits(monkeypatch):
    store = TraceStore(max_traces=32, max_bytes=2**32)
    monkeypatch.setattr(session, "STORE", store)
    monkeypatch.setattr(inputs, "LIMITS", inputs.LOCAL_LIMITS)
    models = ModelCache(policy=session.LOCAL_POLICY)
    session.configure(policy=public_policy(["embedded"]), limits=inputs.PUBLIC_LIMITS, models=models)
    assert models.policy.choices == ("embedded",) and not models.policy.allow_any
    assert inputs.LIMITS is inputs.PUBLIC_LIMITS and (store.max_traces, store.max_bytes) == (16, 2**30)


# ---------------------------------------------------------------------------- hostile traces and the log
def _deep_trace(path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    synthetic_trace(steps=3).save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["trace"] = "[" * 200_000 + "]" * 200_000
    save_file(tensors, str(path), metadata=metadata)
    return path


def _nan_trace(path):
    trace = synthetic_trace(steps=3)
    trace.save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["attention"] = tensors["attention"].clone()
    tensors["attention"].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("make", [_deep_trace, _nan_trace], ids=["nested 200,000 deep", "NaN attention"])
def test_the_app_opens_hostile_traces_with_the_clis_error(tmp_path, capsys, make):
    from explain.cli import main

    path = make(tmp_path / "hostile.safetensors")
    with pytest.raises(TraceFormatError) as core:
        Trace.load(path)
    with pytest.raises(InputError) as app_error:
        actions.open_trace(str(path))
    assert str(app_error.value) == str(core.value)
    assert main(["open", str(path), "--out", str(tmp_path / "rep")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {core.value}"


def test_a_refused_input_is_one_log_line_not_a_traceback(caplog):
    @ui._ui
    def handler(kind):
        if kind == "input":
            raise InputError("the prompt is empty: type\nwhat the image should show")
        raise KeyError("no word 'dog'")

    with caplog.at_level(logging.INFO, logger="explain_app"):
        for kind in ("input", "key"):
            with pytest.raises(gr.Error) as caught:
                handler(kind)
            assert caught.value.print_exception is False
    assert [r.getMessage() for r in caplog.records] == [
        "refused input: the prompt is empty: type what the image should show",
        "refused input: no word 'dog'",
    ]


@pytest.fixture(scope="module")
def public_app():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "LIMITS", inputs.PUBLIC_LIMITS)
        models = ModelCache(policy=public_policy(["tiny"]))
        demo = ui.build_app(default_model="tiny", models=models)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
        try:
            yield url
        finally:
            demo.close()


def test_a_public_app_over_its_api(public_app, tmp_path, capfd, caplog):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (installed with gradio)")
    client = gradio_client.Client(public_app, verbose=False)
    capfd.readouterr()
    refused = []
    with caplog.at_level(logging.INFO, logger="explain_app"):
        for probe in ("/etc", "/etc/passwd", "/root/.ssh", "/nonexistent"):
            with pytest.raises(Exception) as caught:
                client.predict("a red circle", "", 0, 2, 5.0, "model default", "uniform", 60, probe, api_name="/generate")
            refused.append(str(caught.value).replace(probe, "NAME"))
        # Gradio's own checks of a request: a size not offered, steps over the slider's maximum
        with pytest.raises(Exception, match=r"Value: 1024 is not in the list of choices: \['model default', '64', '128', '256', '384', '512'\]"):
            client.predict("a red circle", "", 0, 2, 5.0, "1024", "uniform", 60, "tiny", api_name="/generate")
        with pytest.raises(Exception, match="Value 150 is greater than maximum value 50"):
            client.predict("a red circle", "", 0, 150, 5.0, "model default", "uniform", 60, "tiny", api_name="/generate")
        # ours: a size the model was not trained near
        with pytest.raises(Exception, match="'tiny' was trained at 32 px, and 128 px is 4 times that"):
            client.predict("a red circle", "", 0, 2, 5.0, "128", "uniform", 60, "tiny", api_name="/generate")
        with pytest.raises(Exception, match="is nested 200000 levels deep"):
            client.predict(gradio_client.handle_file(str(_deep_trace(tmp_path / "deep.safetensors"))), api_name="/open_trace")
    assert len(set(refused)) == 1 and "is not offered here; choose one of: tiny" in refused[0]
    lines = [r.getMessage() for r in caplog.records if r.name == "explain_app"]
    assert len(lines) == 8 and all(line.startswith("refused input: ") for line in lines), lines
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, "a refused input prints no traceback"
    # and the app still works
    result = client.predict("a red circle", "", 0, 2, 5.0, "model default", "uniform", 60, "tiny", api_name="/generate")
    assert "a red circle" in result[1]


def test_direct_calls_obey_the_deployments_bounds(monkeypatch, tmp_path):
    """The library functions behind the UI read the same limits the UI shows (a public app's)."""
    import dataclasses

    import explain_app as app
    from explain_app import inputs

    monkeypatch.setattr(inputs, "LIMITS", dataclasses.replace(inputs.PUBLIC_LIMITS, max_steps=7, max_upload_mb=1))
    with pytest.raises(app.InputError, match="steps must be between 1 and 7"):
        app.generate("a red circle", steps=8)
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(app.InputError, match="more than the 1.0 MiB accepted here"):
        app.open_trace(big)
