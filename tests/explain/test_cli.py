import json
import os
import sys
from pathlib import Path

import pytest
import torch

from explain import embedded
from explain.cli import main
from explain.trace import Trace

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
    assert capsys.readouterr().err == "error: argument --steps: must be from 1 to 1000, got 0 (see python -m explain report --help)\n"


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


# ---------------------------------------------------------------------------- hardening (issue 17)
def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def _one_error_line(capsys, *expected):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--guidance", "inf", "argument --guidance: must be a finite number from 0 to 100, got inf"),
        ("--guidance", "nan", "must be a finite number from 0 to 100, got nan"),
        ("--guidance", "-1", "got -1"),
        ("--guidance", "1e9", "got 1e9"),
        ("--guidance", "lots", "expected a number from 0 to 100, got 'lots'"),
        ("--seed", "1e23", "argument --seed: expected a whole number from 0 to 18446744073709551615, got '1e23'"),
        ("--seed", "-1", "must be from 0 to 18446744073709551615, got -1"),
        ("--seed", str(2**64), "must be from 0 to 18446744073709551615"),
        ("--steps", "1001", "argument --steps: must be from 1 to 1000, got 1001"),
        ("--lam", "0", "argument --lam: must be from 1 to 10000, got 0"),
        ("--height", "-64", "argument --height: must be at least 1, got -64"),
    ],
)
def test_numbers_out_of_range_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, option, value, message):
    from explain import cli

    monkeypatch.setattr(cli, "load_model", _no_model)
    with pytest.raises(SystemExit) as exc:
        main(["report", "a red circle", option, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sizes, message",
    [
        (["--height", "99"], "--height 99 is not a multiple of 4 (the VAE's factor); use 96 or 100"),
        (["--width", "100000"], "--width 100000 is larger than 4096 px, the largest image diffusion-explain traces"),
        (["--height", "100000", "--width", "100000"], "--height 100000 is larger than 4096 px"),
        (["--height", "2048"], "--height 2048: the embedded model was trained at 64 px, and 2048 px is 32 times that"),
        (["--width", "2"], "--width 2 is smaller than one latent pixel (4 px); use 64 or more"),
    ],
)
def test_sizes_the_model_cannot_make_are_refused_before_it_loads(tmp_path, capsys, monkeypatch, sizes, message):
    from explain import cli

    monkeypatch.setattr(cli, "load_model", _no_model)
    assert main(["report", "a red circle", *sizes, "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, message)
    if "trained at" in message:
        assert "Use at most 128 px, or pass --allow-any-size" in line
    assert not (tmp_path / "out").exists()


class _Stop(Exception):
    pass


def test_other_sizes_are_allowed_with_a_warning_or_the_flag(tmp_path, capsys, monkeypatch):
    from explain import cli

    def stop(*args, **kwargs):
        raise cli.CommandError("stopped at loading")

    monkeypatch.setattr(cli, "load_model", stop)
    assert main(["report", "a red circle", "--height", "96", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "warning: the embedded model was trained at 64 px; at 96 px (--height) its images and maps may be poor" in err
    assert "error: stopped at loading" in err, "96 px passed the checks"
    assert main(["report", "a red circle", "--height", "2048", "--allow-any-size", "--out", str(tmp_path / "b")]) == 2
    assert "error: stopped at loading" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_a_hub_models_sizes_are_checked_once_loaded_before_generating(tmp_path, capsys, monkeypatch):
    from explain import cli, run
    from explain.testing import tiny_sd_pipeline

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (tiny_sd_pipeline(), "someone/tiny"))
    monkeypatch.setattr(run, "generate_and_trace", _no_model)
    assert main(["report", "a red circle", "--model", "someone/tiny", "--height", "33", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "--height 33 is not a multiple of 2 (the VAE's factor); use 32 or 34")
    assert main(["report", "a red circle", "--model", "someone/tiny", "--width", "128", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "someone/tiny was trained at 32 px, and 128 px is 4 times that")
    assert not list(tmp_path.iterdir()), "no report folder and no staging folder left"


def test_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from explain import cli

    monkeypatch.setattr(cli, "load_model", _no_model)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["report", "a red circle", "--out", str(a_file)]) == 2
    _one_error_line(capsys, f"--out {a_file} is a file; pass a folder for the report")
    assert main(["report", "a red circle", "--out", str(a_file / "sub" / "rep")]) == 2
    _one_error_line(capsys, f"--out {a_file / 'sub' / 'rep'} is under {a_file}, which is a file, not a folder")
    assert a_file.read_text() == "mine"
    assert main(["open", str(tmp_path / "t.safetensors"), "--out", str(a_file)]) == 2
    _one_error_line(capsys, "is a file")


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from explain import cli

    monkeypatch.setattr(cli, "load_model", _no_model)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked / "rep"
        if os.access(locked, os.W_OK):  # root writes anywhere: use a read-only file system
            target = Path("/sys/diffusion-explain-test/rep")
            if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_mkdir(Path("/sys/diffusion-explain-test")):
                pytest.skip("no folder here refuses writes (running as root without a read-only /sys)")
        assert main(["report", "a red circle", "--out", str(target)]) == 2
        _one_error_line(capsys, "cannot write the report in", "pass a --out in a folder you can write")
    finally:
        locked.chmod(0o755)


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


def _old_report(folder):
    """A report folder from an earlier run, with files this run will not write."""
    (folder / "words").mkdir(parents=True)
    for name in ("index.html", "trace.safetensors", "negative_heatmaps.png", "words/09_old.png"):
        (folder / name).write_text(f"old {name}")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_existing_report_is_replaced_only_with_overwrite_and_nothing_old_is_left(tmp_path, capsys):
    trace = synthetic_trace(steps=3).save(tmp_path / "run.safetensors")
    out = tmp_path / "rep"
    old = _old_report(out)
    assert main(["open", str(trace), "--out", str(out)]) == 2
    _one_error_line(capsys, f"--out {out} already holds files (a report of an earlier run?); pass --overwrite")
    assert _contents(out) == old
    assert main(["open", str(trace), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    names = set(_contents(out))
    assert "negative_heatmaps.png" not in names and "words/09_old.png" not in names, "the old run's files are gone"
    assert {"index.html", "trace.safetensors", "final.png", ".diffusion-explain-report"} <= names
    assert Trace.load(out / "trace.safetensors").num_steps == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "run.safetensors"], "no staging folder is left"
    # the folder of a report written by this version can be replaced again
    assert main(["open", str(trace), "--out", str(out), "--overwrite", "--quiet"]) == 0


def test_overwrite_never_replaces_a_folder_that_is_not_a_report(tmp_path, capsys):
    trace = synthetic_trace(steps=3).save(tmp_path / "run.safetensors")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    assert main(["open", str(trace), "--out", str(home), "--overwrite"]) == 2
    _one_error_line(capsys, "holds files that are not a diffusion-explain report; --overwrite replaces only report folders")
    assert (home / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_the_old_report_untouched(tmp_path, capsys, monkeypatch, interrupt):
    from explain import report as report_module

    trace = synthetic_trace(steps=3).save(tmp_path / "run.safetensors")
    out = tmp_path / "rep"
    old = _old_report(out)

    def interrupted(trace, out_dir, **kwargs):
        # a run that wrote some of its PNGs when Ctrl-C came (or an error)
        (Path(out_dir) / "final.png").write_bytes(b"new")
        (Path(out_dir) / "words").mkdir()
        (Path(out_dir) / "words" / "00_red.png").write_bytes(b"new")
        raise interrupt("stop")

    monkeypatch.setattr(report_module, "build_report", interrupted)
    if interrupt is KeyboardInterrupt:
        assert main(["open", str(trace), "--out", str(out), "--overwrite"]) == 130
        assert "interrupted" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError):
            main(["open", str(trace), "--out", str(out), "--overwrite"])
    assert _contents(out) == old, "the old run is as it was, with none of the new run's files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "run.safetensors"], "the staging folder is gone"


def test_an_interrupted_first_run_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from explain import report as report_module

    trace = synthetic_trace(steps=3).save(tmp_path / "run.safetensors")

    def interrupted(trace, out_dir, **kwargs):
        (Path(out_dir) / "final.png").write_bytes(b"new")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "build_report", interrupted)
    assert main(["open", str(trace), "--out", str(tmp_path / "fresh")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


def test_a_hostile_trace_gives_one_error_line(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = synthetic_trace(steps=3).save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["trace"] = "[" * 200_000 + "]" * 200_000
    save_file(tensors, str(path), metadata=metadata)
    assert main(["open", str(path), "--out", str(tmp_path / "rep")]) == 2
    _one_error_line(capsys, "error: t.safetensors has a damaged trace header (it is nested 200000 levels deep")
    assert not (tmp_path / "rep").exists()


def test_the_same_seed_twice_gives_the_same_trace_file(tmp_path):
    args = ["report", "a red circle", "--model", "tiny", "--steps", "2", "--seed", "5", "--no-previews", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "trace.safetensors").read_bytes() == (tmp_path / "b" / "trace.safetensors").read_bytes()


dit_shipped = pytest.mark.skipif(
    not embedded.is_available("dit"),
    reason="the embedded DiT's weights are not shipped in explain/models/shapes-dit-64",
)


@dit_shipped
def test_report_with_the_embedded_dit_by_name(tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", "a large red circle above a small blue square", "--model", "embedded-dit", "--steps", "4",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "loading the model (embedded-dit)" in err and "guidance 5.0" in err and "report written to" in err
    trace = Trace.load(out / "trace.safetensors")
    assert trace.meta["family"] == "sd3" and trace.meta["model"] == "embedded-dit (diffusion-explain/shapes-dit-64)"
    assert trace.meta["max_sequence_length"] == 0  # no T5 stand-in tokens in the joint attention
    assert [w.text for w in trace.words[0]] == "a large red circle above a small blue square".split()
    assert trace.num_steps == 4 and tuple(trace.images.shape[1:3]) == (64, 64)
    assert torch.isfinite(trace.attention).all() and float(trace.attention.std()) > 0
    page = (out / "index.html").read_text()
    assert "embedded-dit (diffusion-explain/shapes-dit-64)" in page
    assert (out / "heatmaps.png").stat().st_size > 500


@pytest.mark.parametrize("name, hint", [("embeded-dit", "did you mean embedded-dit?"), ("dit", "did you mean embedded-dit?"),
                                        ("unet", "did you mean embedded?"), ("sdxl", None)])
def test_a_misspelt_model_name_gets_the_list_of_names(tmp_path, capsys, name, hint):
    assert main(["report", "a red circle", "--model", name, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"no model folder at {name}" in err
    assert "embedded (the shapes UNet model, default), embedded-dit (the shapes MMDiT model, SD3-style)" in err
    if hint:
        assert hint in err
    else:
        assert "did you mean" not in err  # no guess when nothing is close
    assert not (tmp_path / "out").exists()


def test_usage_names_the_command_the_user_typed(monkeypatch, capsys):
    """The console script's help says `diffusion-explain`, `python -m explain`'s says that."""
    from explain import cli

    for argv0, expected in (("/venv/bin/diffusion-explain", "usage: diffusion-explain"), ("/repo/explain/__main__.py", "usage: python -m explain")):
        monkeypatch.setattr(sys, "argv", [argv0, "--help"])
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert capsys.readouterr().out.startswith(expected)
