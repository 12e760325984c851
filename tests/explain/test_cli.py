import json

import pytest
import torch

from explain.cli import main

from tests.explain.synthetic import synthetic_trace


def test_open_makes_a_report_from_a_saved_trace_without_a_model(tmp_path, capsys):
    path = synthetic_trace(steps=4).save(tmp_path / "run.safetensors")
    assert main(["open", str(path), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "a red circle above a blue square" in page
    assert (tmp_path / "rep" / "trace.safetensors").is_file()
    err = capsys.readouterr().err
    assert "reading" in err and "report written to" in err
    # default output folder sits next to the trace
    assert main(["open", str(path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("run-report/index.html")
    assert (tmp_path / "run-report" / "index.html").is_file()


def test_open_rejects_files_that_are_not_traces(tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    assert main(["open", str(weights)]) == 2
    assert "not a diffusion-explain trace" in capsys.readouterr().err
    assert main(["open", str(tmp_path / "missing.safetensors")]) == 2
    assert "error: no trace file at" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/folder", "no model folder at ./no/such/folder"),
        ("FILE", "is a single file; pass a diffusers model folder"),
        ("DIR", "is not a diffusers model folder: it has no model_index.json"),
    ],
)
def test_report_says_what_is_wrong_with_the_model(tmp_path, capsys, model, message):
    if model == "FILE":
        model = str(tmp_path / "weights.ckpt")
        (tmp_path / "weights.ckpt").write_bytes(b"x")
    elif model == "DIR":
        model = str(tmp_path)
    assert main(["report", "a red circle", "--model", model, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id_gets_a_clear_message(tmp_path, capsys, monkeypatch):
    from explain.adapters.diffusers import loading

    class Offline:  # stands in for diffusers' AutoPipelineForText2Image without a network
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading, "pipeline_class", lambda: Offline)
    monkeypatch.setattr(loading, "quiet_loading", lambda: None)
    assert main(["report", "a red circle", "--model", "someone/some-model", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not load 'someone/some-model' from the Hugging Face hub" in err
    assert "pass its local folder with --model PATH" in err


def test_bad_numbers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "a red circle", "--steps", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_report_runs_the_whole_job_on_a_tiny_pipeline(tmp_path, capsys):
    from explain.schedules import early_timesteps
    from explain.trace import Trace

    out = tmp_path / "rep"
    code = main(["report", "a red circle above a blue square", "--model", "tiny", "--steps", "3", "--seed", "3",
                 "--guidance", "4", "--schedule", "early", "--lam", "10", "--negative", "green triangle",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    for phase in ("loading the model (tiny)", "generating 3 steps, seed 3, guidance 4.0, schedule early", "report written to"):
        assert phase in err
    trace = Trace.load(out / "trace.safetensors")
    assert trace.num_steps == 3 and trace.prompts == ["a red circle above a blue square"]
    assert [int(t) for t in trace.timesteps] == early_timesteps(3, 10)
    assert trace.meta["schedule"] == "early" and trace.meta["lam"] == 10 and trace.meta["seed"] == 3
    assert trace.negative_prompts == ["green triangle"] and trace.attention_negative is not None
    assert trace.x0_previews is not None and trace.images is not None
    page = (out / "index.html").read_text()
    assert "a red circle above a blue square" in page and "negative prompt: green triangle" in page
    assert "tiny (random weights, test only)" in page and "time: generate + trace (s)" in page
    for name in ("final.png", "step_grid.png", "heatmaps.png", "negative_heatmaps.png", "concepts.png", "recovery.png"):
        assert (out / name).stat().st_size > 500, name
    assert sorted(p.name for p in (out / "words").iterdir()) == ["00_red.png", "01_circle.png", "02_above.png", "03_blue.png", "04_square.png"]
    scores = json.loads((out / "concepts.json").read_text())
    assert scores["labels"] == ["a", "red", "circle", "above", "a (2)", "blue", "square"]
    assert json.loads((out / "recovery.json").read_text())["space"] == "preview"



def test_report_runs_the_papers_schedule_on_a_pndm_model_and_says_so(tmp_path, capsys, monkeypatch):
    # an SD 1.x model loads with PNDM, which takes no custom time steps
    from explain import cli
    from explain.schedules import early_timesteps
    from explain.testing import tiny_sd_pipeline
    from explain.trace import Trace

    monkeypatch.setattr(cli, "load_model", lambda spec, device, dtype, announce=None: (tiny_sd_pipeline("pndm"), "tiny pndm"))
    out = tmp_path / "rep"
    assert main(["report", "a red circle", "--model", "x", "--steps", "3", "--guidance", "4", "--schedule", "early",
                 "--lam", "10", "--no-previews", "--out", str(out)]) == 0
    assert "warning: PNDMScheduler cannot run custom time steps, so this run used DPMSolverMultistepScheduler" in capsys.readouterr().err
    trace = Trace.load(out / "trace.safetensors")
    assert trace.meta["scheduler"] == "DPMSolverMultistepScheduler"
    assert [int(t) for t in trace.timesteps] == early_timesteps(3, 10)
