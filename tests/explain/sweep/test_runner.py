"""The sweep in one process, on a tiny random-weight pipeline (seconds per test)."""

import json
from functools import lru_cache

import pytest

from explain.sweep import analyses, protocol
from explain.sweep.manifest import SweepFolder, SweepFolderError, comparable
from explain.sweep.prompts import parse_prompts
from explain.sweep.runner import run_sweep

TINY = "tiny (random weights, test only)"


@lru_cache(maxsize=1)
def tiny_pipe():
    from explain.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


def load(spec, device, dtype):
    return tiny_pipe(), TINY


def settings(names=("concepts", "recovery"), **kw):
    return protocol.resolve("default", model="tiny", embedded=False, steps=6, analyses=tuple(names), masks=8, game_space="latent", baselines=("random",), **kw)


def sweep(rows, out, s, **kw):
    return run_sweep(rows, out, s, device="cpu", progress=False, load_model=load, **kw)


def records(out):
    return {r["id"]: r for r in SweepFolder(out).read_records()}


JSONL = "\n".join(
    [
        '{"id": "circle", "prompt": "a red circle"}',
        '{"id": "square", "prompt": "a blue square on the left", "seed": 11}',
        '{"id": "bad", "prompt": "a green triangle", "seed": "eleven"}',
        '{"id": "triangle", "prompt": "a green triangle above a red circle", "negative": "a blue square"}',
    ]
)


def exploding(ctx):
    if "square" in ctx.row.prompt:
        raise RuntimeError("this analysis fails on squares")
    return {"explode_ok": True}


def test_a_bad_row_and_a_failing_analysis_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(analyses.ANALYSES, "explode", analyses.Analysis("explode", exploding, "test"))
    rows = parse_prompts(JSONL, "jsonl")
    summary = sweep(rows, tmp_path, settings(("concepts", "explode", "recovery")))
    got = records(tmp_path)
    assert {k: r["status"] for k, r in got.items()} == {"circle": "ok", "square": "error", "bad": "invalid", "triangle": "ok"}
    assert "seed 'eleven'" in got["bad"]["error"]
    assert got["square"]["errors"] == {"explode": "RuntimeError: this analysis fails on squares"}
    # the failing prompt's other analyses still ran, before and after the one that failed
    assert "concept_words" in got["square"]["columns"] and "r1_step_50" in got["square"]["columns"]
    assert got["square"]["seed"] == 11 and got["triangle"]["negative"] == "a blue square"
    assert summary.manifest["ok"] == 2 and summary.manifest["error"] == 1 and summary.manifest["invalid"] == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"ok": 2, "error": 1, "invalid": 1, "pending": 0, "total": 4}
    assert {f["id"] for f in report["failures"]} == {"square", "bad"}
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("id,index,line,status,prompt")
    assert (tmp_path / "words.csv").is_file() and "<h2>Concepts over the steps</h2>" in (tmp_path / "report.html").read_text()


def test_resume_runs_nothing_twice_and_retry_failed_reruns_only_failures(tmp_path, monkeypatch):
    monkeypatch.setitem(analyses.ANALYSES, "explode", analyses.Analysis("explode", exploding, "test"))
    rows = parse_prompts(JSONL, "jsonl")
    s = settings(("concepts", "explode"))
    assert sweep(rows, tmp_path, s).ran == 4
    first = records(tmp_path)
    again = sweep(rows, tmp_path, s)
    assert again.ran == 0 and again.done_before == 4
    retried = sweep(rows, tmp_path, s, retry_failed=True)
    assert retried.ran == 2  # the failed prompt and the invalid row; the good ones stay
    after = records(tmp_path)
    assert after["circle"] == first["circle"]
    assert comparable(after["square"]) == comparable(first["square"])


def test_a_prompts_result_does_not_depend_on_the_rest_of_the_file(tmp_path):
    a = parse_prompts("a red circle\na blue square\n", "txt")
    b = parse_prompts("a green triangle\na blue square\na red circle\n", "txt")
    s = settings(("concepts", "rise"))
    sweep(a, tmp_path / "a", s)
    sweep(b, tmp_path / "b", s)
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    for row in a:
        x, y = comparable(ra[row.id]), comparable(rb[row.id])
        for key in ("index", "line"):
            x.pop(key), y.pop(key)
        assert x == y


def test_other_settings_are_refused_and_restart_discards(tmp_path):
    rows = parse_prompts("a red circle\n", "txt")
    sweep(rows, tmp_path, settings())
    five_steps = protocol.resolve("default", model="tiny", embedded=False, steps=5, analyses=("concepts",), masks=8, game_space="latent", baselines=("random",))
    with pytest.raises(SweepFolderError, match="other settings"):
        sweep(rows, tmp_path, five_steps)
    summary = sweep(rows, tmp_path, five_steps, restart=True)
    assert summary.ran == 1 and json.loads((tmp_path / "sweep.json").read_text())["steps"] == 5


def test_subset_runs_an_analysis_on_the_files_first_rows_only(tmp_path):
    rows = parse_prompts("a red circle\na blue square\na green triangle\n", "txt")
    sweep(rows, tmp_path, settings(("concepts", "rise"), subsets={"rise": 1}))
    got = records(tmp_path)
    with_rise = {rid for rid, r in got.items() if "rise_insertion_latent_auc" in r["columns"]}
    assert with_rise == {rows[0].id}
    assert "outside the subset" in got[rows[1].id]["skipped"]["rise"]
    assert "baseline_random_insertion_latent_auc" in got[rows[0].id]["columns"]


def test_hooks_and_ground_truth_analyses_are_refused_with_what_brings_them():
    with pytest.raises(analyses.AnalysisUnavailable, match="causal_timing.*issue 12"):
        analyses.parse_analyses("concepts,causal_timing", ground_truth=False)
    with pytest.raises(ValueError, match="'pointing' needs ground truth"):
        analyses.parse_analyses("pointing", ground_truth=False)
    with pytest.raises(ValueError, match="unknown analysis nope"):
        analyses.parse_analyses("nope", ground_truth=False)
    assert analyses.parse_analyses("default", ground_truth=True) == ("concepts", "recovery", "pointing", "settle")
    assert analyses.parse_analyses("default", ground_truth=False, protocol="paper") == ("concepts", "rise", "cam")
    assert "traces" not in analyses.parse_analyses("all", ground_truth=False)
