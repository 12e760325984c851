"""Save Trace / Load Trace: the core's file format in ComfyUI's output folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from explain.trace import Trace
from nodes.runs import TraceHandle
from nodes.trace_io import ExplainLoadTrace, ExplainSaveTrace, is_trace_file, list_trace_files, resolve_trace_path
from tests.explain.synthetic import synthetic_trace
from tests.nodes.test_explain_nodes import FakeVAE


def test_save_then_load_round_trip(folder_paths):
    trace = synthetic_trace(batch=2)
    out = ExplainSaveTrace.execute(TraceHandle(trace=trace), "explain/run")
    (path,) = out.result
    assert out.ui["text"] == ["explain/run_00001_.safetensors"]
    assert Path(path).parent == Path(folder_paths.get_output_directory()) / "explain"
    names = ExplainLoadTrace.define_schema().inputs[0].options
    assert names == ["explain/run_00001_.safetensors"]
    assert ExplainLoadTrace.validate_inputs(names[0]) is True
    (handle,) = ExplainLoadTrace.execute(names[0]).result
    loaded = handle.resolve()
    torch.testing.assert_close(loaded.attention, trace.attention, rtol=1e-3, atol=1e-3)  # stored as fp16
    assert loaded.words[1][2].text == "circle" and loaded.prompts == trace.prompts
    second = ExplainSaveTrace.execute(TraceHandle(trace=trace), "explain/run")
    assert second.ui["text"] == ["explain/run_00002_.safetensors"]


def test_save_with_a_vae_stores_images_and_previews(folder_paths):
    trace = synthetic_trace(steps=3)
    trace.meta.update(latent_space="sigma", latent_scale_factor=0.5)
    images_before, previews_before = trace.images, trace.x0_previews
    (path,) = ExplainSaveTrace.execute(TraceHandle(trace=trace), "t", vae=FakeVAE()).result
    loaded = Trace.load(path)
    assert loaded.images.shape == (1, 64, 64, 3) and loaded.images.dtype == torch.uint8
    assert loaded.x0_previews.shape == (3, 1, 64, 64, 3) and loaded.x_t_previews.shape == (3, 1, 64, 64, 3)
    assert trace.images is images_before and trace.x0_previews is previews_before, "the node must not change its input"


def test_load_lists_only_traces_newest_first(folder_paths, tmp_path):
    out = Path(folder_paths.get_output_directory())
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))  # model weights, not a trace
    (out / "broken.safetensors").write_bytes(b"\x00" * 5)
    older = synthetic_trace().save(out / "a" / "old.safetensors")
    newer = synthetic_trace().save(out / "new.safetensors")
    past = time.time() - 100
    os.utime(older, (past, past))
    assert list_trace_files(out) == ["new.safetensors", "a/old.safetensors"]
    assert not is_trace_file(out / "model.safetensors") and not is_trace_file(out / "broken.safetensors")
    assert is_trace_file(newer)
    assert list_trace_files(tmp_path / "missing") == []


def test_load_refuses_paths_outside_the_output_folder_and_missing_files(folder_paths):
    assert "outside the output folder" in ExplainLoadTrace.validate_inputs("../secrets.safetensors")
    assert "no trace file" in ExplainLoadTrace.validate_inputs("nope.safetensors")
    with pytest.raises(ValueError, match="outside"):
        resolve_trace_path("/etc/passwd", folder_paths.get_output_directory())


def test_is_changed_follows_the_file(folder_paths):
    out = Path(folder_paths.get_output_directory())
    path = synthetic_trace().save(out / "t.safetensors")
    first = ExplainLoadTrace.fingerprint_inputs("t.safetensors")
    later = time.time() + 10
    os.utime(path, (later, later))
    assert ExplainLoadTrace.fingerprint_inputs("t.safetensors") != first


def test_a_tap_handle_needs_the_samplers_latent(folder_paths):
    from nodes.runs import RunRegistry, TraceLookupError

    with pytest.raises(TraceLookupError, match="LATENT"):
        ExplainSaveTrace.execute(TraceHandle(tap_key="k", registry=RunRegistry()), "t")


def test_hostile_traces_are_not_offered_and_load_with_the_clis_error(folder_paths, capsys):
    # issue 17: a header nested 200,000 levels deep crashed the node with a RecursionError and
    # stayed in the file list; the node must say what the CLI says
    from explain.cli import main
    from explain.trace import TraceFormatError
    from tests.explain.test_trace import parts

    out = Path(folder_paths.get_output_directory())
    good = synthetic_trace().save(out / "good.safetensors")
    hostile = {}
    for name, edit in {
        "deep": lambda t, m: m.update(trace="[" * 200_000 + "]" * 200_000),
        "nan": lambda t, m: t["x_t"].view(-1).__setitem__(0, float("nan")),
        "huge-height": lambda t, m: m.update(trace=m["trace"].replace('"height": 32', '"height": 16000')),
    }.items():
        tensors, _, metadata = parts(good)
        edit(tensors, metadata)
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=metadata)
        hostile[name] = out / f"{name}.safetensors"
    listed = list_trace_files(out)
    assert "good.safetensors" in listed and "deep.safetensors" not in listed
    for name, path in hostile.items():
        # what Load Trace runs: the path inside the output folder, then the core's loader
        with pytest.raises(TraceFormatError) as caught:
            Trace.load(resolve_trace_path(path.name, out))
        assert main(["open", str(path), "--out", str(out / f"{name}-report")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {caught.value}"
