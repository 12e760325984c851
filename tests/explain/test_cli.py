import json

import pytest
import torch

from explain.cli import main

from .synthetic import synthetic_trace


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
        ("FILE", "is a single file; --model needs a diffusers model folder"),
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
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", offline)
    assert main(["report", "a red circle", "--model", "someone/some-model", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not load 'someone/some-model' from the Hugging Face hub" in err
    assert "pass its local folder with --model PATH" in err


def test_bad_numbers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "a red circle", "--steps", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
