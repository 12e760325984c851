import json

import pytest

from explain.cli import main


@pytest.fixture
def tiny(monkeypatch):
    from explain import cli
    from explain.testing import tiny_sd_pipeline

    monkeypatch.setattr(cli, "load_model", lambda spec, device, dtype: (tiny_sd_pipeline(), "tiny (random weights, test only)"))


FAST = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--steps", "4", "--no-progress"]


@pytest.mark.parametrize(
    "content, name, args, message",
    [
        ("id,seed\n1,2\n", "p.csv", [], "has no 'prompt' column"),
        ("a red circle\n", "p.md", [], "cannot tell the format of p.md"),
        ('{"prompt": "a red circle", "seed": "x"}\n', "p.jsonl", ["--strict"], "1 invalid row(s) (--strict); the first: line 1 has the seed 'x'"),
        ("a red circle\n", "p.txt", ["--analyses", "pointing"], "'pointing' needs ground truth"),
        ("a red circle\n", "p.txt", ["--analyses", "sanity_suite"], "not available yet: it lands with issue 12"),
        ("a red circle\n", "p.txt", ["--subset", "rise"], "cannot read --subset 'rise'"),
        ("a red circle\n", "p.txt", ["--subset", "rise=3"], "--subset names rise, which the sweep does not run"),
        ("a red circle\n", "p.txt", ["--explain-step", "9"], "--explain-step 9 is outside the run's steps 0..3"),
        ("a red circle\n", "p.txt", ["--baselines", "random,lime"], "unknown baseline(s) lime"),
    ],
)
def test_bad_input_ends_with_one_clear_error(tmp_path, capsys, tiny, content, name, args, message):
    path = tmp_path / name
    path.write_text(content)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), *FAST, *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err or message in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_needs_prompts_or_the_shapes_world_but_not_both(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "o")]) == 2
    assert "pass a prompt file (.txt, .csv or .jsonl) or --shapes-world N" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["sweep", str(tmp_path / "p.txt"), "--shapes-world", "3", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err


def test_sweep_then_report_only_rebuilds_the_same_report(tmp_path, capsys, tiny):
    (tmp_path / "p.txt").write_text("a red circle\na blue square on the left\n")
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "p.txt"), "--out", str(out), *FAST, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    first = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    assert main(["sweep", "--out", str(out), "--report-only", "--quiet"]) == 0
    second = json.loads((out / "report.json").read_text())
    assert second["counts"] == first["counts"] and second["concepts"] == first["concepts"]
    assert main(["sweep", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "holds no sweep" in capsys.readouterr().err


def test_list_analyses_names_every_plug_in_and_hook(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--list-analyses"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("traces", "concepts", "recovery", "schedules", "rise", "cam", "sanity", "pointing", "settle", "layers", "causal_timing", "concept_onset", "r3"):
        assert f"\n{name} " in "\n" + out
    assert "hook, not available yet: issue 12" in out


def test_paper_protocol_settings():
    from explain.methods import defaults
    from explain.sweep import protocol

    s = protocol.resolve("paper", model="m", embedded=False)
    assert (s.steps, s.guidance, s.explain_step, s.fixed_seed, s.rise, s.force_dpm_solver) == (20, 7.5, 14, 1, defaults.PAPER_RISE, True)
    assert s.rise.n_masks == 500 and s.baselines == ("random",)
    d = protocol.resolve("default", model="embedded", embedded=True)
    assert (d.guidance, d.fixed_seed, d.rise, d.cam) == (5.0, None, defaults.RISE, defaults.CAM)
    assert protocol.paper_step(30) == 21


def test_paper_protocol_swaps_in_dpm_solver_pp():
    from explain.sweep.runner import use_paper_scheduler
    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("pndm")
    assert use_paper_scheduler(pipe) == "PNDMScheduler"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
    assert use_paper_scheduler(pipe) is None
