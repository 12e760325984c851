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
    with pytest.raises(analyses.AnalysisUnavailable, match="sanity_suite.*issue 12"):
        analyses.parse_analyses("concepts,sanity_suite", ground_truth=False)
    with pytest.raises(ValueError, match="'pointing' needs ground truth"):
        analyses.parse_analyses("pointing", ground_truth=False)
    with pytest.raises(ValueError, match="unknown analysis nope"):
        analyses.parse_analyses("nope", ground_truth=False)
    assert analyses.parse_analyses("default", ground_truth=True) == ("concepts", "recovery", "pointing", "settle")
    assert analyses.parse_analyses("default", ground_truth=False, protocol="paper") == ("concepts", "rise", "cam")
    assert "traces" not in analyses.parse_analyses("all", ground_truth=False)


def test_a_failing_generation_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import explain.run

    real = explain.run.generate_and_trace

    def flaky(pipe, model_name, request, **kw):
        if "square" in request.prompt:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return real(pipe, model_name, request, **kw)

    monkeypatch.setattr(explain.run, "generate_and_trace", flaky)
    rows = parse_prompts("a red circle\na blue square\na green triangle\n", "txt")
    summary = sweep(rows, tmp_path, settings())
    got = {r["prompt"]: r for r in records(tmp_path).values()}
    assert got["a blue square"]["status"] == "error"
    assert got["a blue square"]["error"] == "generation: RuntimeError: CUDA out of memory (simulated)"
    assert got["a red circle"]["status"] == got["a green triangle"]["status"] == "ok"
    assert summary.manifest["error"] == 1 and summary.manifest["ok"] == 2
    assert [f["error"] for f in json.loads((tmp_path / "report.json").read_text())["failures"]] == ["generation: RuntimeError: CUDA out of memory (simulated)"]


def test_traces_are_saved_only_when_asked_and_their_cost_is_stated(tmp_path):
    from explain.trace import Trace

    rows = parse_prompts("a red circle\na blue square\n", "txt")
    sweep(rows, tmp_path / "plain", settings(("concepts",)))
    assert not (tmp_path / "plain" / "traces").exists()
    said = []
    sweep(rows, tmp_path / "kept", settings(("traces", "concepts")), say=said.append)
    folder = SweepFolder(tmp_path / "kept")
    sizes = {}
    for row in rows:
        path = folder.trace_path(row.id)
        trace = Trace.load(path)
        assert trace.prompts == [row.prompt] and trace.num_steps == 6
        sizes[row.id] = path.stat().st_size
        assert records(tmp_path / "kept")[row.id]["columns"]["trace_bytes"] == sizes[row.id]
    cost = json.loads((tmp_path / "kept" / "report.json").read_text())["traces"]
    assert cost["saved"] == 2 and cost["bytes"] == sum(sizes.values()) and cost["projected_bytes"] == pytest.approx(sum(sizes.values()))
    assert any(line.startswith("traces: ") and "MB per prompt on disk" in line for line in said)
    assert "Traces (asked for): 2 saved" in (tmp_path / "kept" / "report.html").read_text()


def test_progress_counts_every_process_records_of_this_run_with_an_eta(tmp_path, capsys):
    import os
    import time

    from explain.sweep.runner import SweepProgress

    folder = SweepFolder(tmp_path)
    folder.records.mkdir(parents=True)
    stale = folder.record_path("old")
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # a record of an earlier run is not this run's progress
    bar = SweepProgress(folder, total=6, done_before=2, pending_ids={"a", "b", "c", "old"}, started=time.time(), show=None, every=0.0)
    bar.begin -= 10  # ten seconds into the run
    for name in ("a", "b"):  # "b" as if another process wrote it: progress reads the folder, not its own count
        folder.record_path(name).write_text("{}")
    (folder.records / ".c.json.tmp").write_text("{")  # half written: not done
    bar.update()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("[sweep] 4/6 prompts done (2 this run, ")
    eta = float(line.split("ETA ")[1].split(" min")[0])
    assert eta == pytest.approx(2 / (2 / 10) / 60, abs=0.05)  # 2 left at 0.2 prompts/s
    quiet = SweepProgress(folder, 6, 2, {"a"}, time.time(), show=False)
    quiet.update()
    assert capsys.readouterr().err == ""


def test_paper_protocol_runs_the_published_setup(tmp_path, monkeypatch):
    """--protocol paper end to end: 20 DPM-Solver++ steps, guidance 7.5, seed 1 for every prompt,
    DF-RISE exactly as published (500 masks) at step 15 of 20, the paper's aggregated AUC."""
    import dataclasses

    from explain.methods import defaults, rise

    seen = []
    real = rise.df_rise

    def spy(denoiser, trace, step, **kwargs):
        seen.append((step, trace.num_steps, type(denoiser), kwargs))
        return real(denoiser, trace, step, **kwargs)

    monkeypatch.setattr(rise, "df_rise", spy)
    schedulers = []
    import explain.run

    real_gen = explain.run.generate_and_trace

    def gen(pipe, model_name, request, **kw):
        schedulers.append((type(pipe.scheduler).__name__, pipe.scheduler.config.algorithm_type, pipe.scheduler.config.solver_order))
        return real_gen(pipe, model_name, request, **kw)

    monkeypatch.setattr(explain.run, "generate_and_trace", gen)
    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("pndm")  # the paper's protocol replaces whatever scheduler the model ships
    s = protocol.resolve("paper", model="tiny", embedded=False, analyses=("rise",), game_space="latent")
    rows = parse_prompts("a red circle\na blue square\n", "txt")
    run_sweep(rows, tmp_path, s, device="cpu", progress=False, load_model=lambda *a: (pipe, TINY))
    got = records(tmp_path)
    assert {r["seed"] for r in got.values()} == {1}
    assert schedulers == [("DPMSolverMultistepScheduler", "dpmsolver++", 2)] * 2
    assert [(step, n) for step, n, _, _ in seen] == [(14, 20), (14, 20)]
    assert all(kw == defaults.PAPER_RISE.kwargs() for *_, kw in seen) and defaults.PAPER_RISE.n_masks == 500
    assert all(r["columns"]["rise_masks"] == 500 and r["columns"]["rise_step"] == 14 for r in got.values())
    config = json.loads((tmp_path / "sweep.json").read_text())
    assert (config["steps"], config["guidance"], config["rise"]) == (20, 7.5, dataclasses.asdict(defaults.PAPER_RISE))
    auc = json.loads((tmp_path / "report.json").read_text())["auc"]
    assert set(auc["baselines"]) == {"random"}
    for key in ("insertion_latent", "deletion_latent"):
        curves = [r["details"]["rise_curves"][key] for r in got.values()]
        from explain.methods.faithfulness import paper_auc

        assert auc["methods"]["rise"][key]["paper_auc"] == pytest.approx(paper_auc(curves))


def test_default_protocol_reads_the_project_defaults(tmp_path, monkeypatch):
    from explain.methods import defaults, rise

    seen = []
    real = rise.df_rise
    monkeypatch.setattr(rise, "df_rise", lambda d, t, step, **kw: seen.append(kw) or real(d, t, step, **{**kw, "n_masks": 4}))
    s = protocol.resolve("default", model="tiny", embedded=False, steps=6, analyses=("rise",), game_space="latent", baselines=("random",))
    sweep(parse_prompts("a red circle\n", "txt"), tmp_path, s)
    assert seen == [defaults.RISE.kwargs()]


def test_r3_schedules_tally_each_prompt_under_uniform_early_and_latter(tmp_path):
    from explain.run import GenerationRequest, generate_and_trace
    from explain.methods.concepts import concept_scores
    from explain.sweep import plan

    rows = parse_prompts("a red circle\na blue square on the left\n", "txt")
    sweep(rows, tmp_path, settings(("concepts", "schedules")))
    got = records(tmp_path)
    for row in rows:
        r = got[row.id]
        d = r["details"]["r3_schedules"]
        assert list(d) == ["uniform", "early", "latter"]
        uniform_words = [w for w in r["tables"]["words"]]
        assert d["uniform"]["step_sum"] == pytest.approx([w["step_sum"] for w in uniform_words], abs=1e-5)
        assert d["early"]["timesteps"] != d["uniform"]["timesteps"] != d["latter"]["timesteps"]
        # the early run is the prompt at its own seed with the early schedule, nothing else
        seed = plan.resolve_seed(row, 0, None)
        early = generate_and_trace(tiny_pipe(), TINY, GenerationRequest(prompt=row.prompt, steps=6, guidance=7.5, seed=seed, schedule="early", previews=False)).trace
        assert d["early"]["step_sum"] == pytest.approx(concept_scores(early).step_sum, abs=1e-5)
        assert r["columns"]["r3_early_final_change"] > 0 and "r3_uniform_final_change" not in r["columns"]
    summary = json.loads((tmp_path / "report.json").read_text())["r3"]
    table = [w for r in got.values() for w in r["tables"]["schedule_words"]]
    for cls, entry in summary["classes"].items():
        for name in ("uniform", "early", "latter"):
            assert entry[name]["tally"] == pytest.approx(sum(w["step_sum"] for w in table if w["schedule"] == name and w["word_class"] == cls), abs=1e-4)
    assert summary["curves"]["early"]["colour"]["n"] == 2
    assert "<h2>R3: what the time steps carry under uniform, early and latter sampling</h2>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "schedule_words.csv").is_file()


def test_causal_timing_gives_each_word_a_decision_step_the_report_reads(tmp_path):
    rows = parse_prompts("a red circle\na blue square on the left\n", "txt")
    summary = sweep(rows, tmp_path, settings(("concepts", "causal_timing")))
    got = records(tmp_path)
    for row in rows:
        record = got[row.id]
        assert record["status"] == "ok", record.get("error")
        timing = record["tables"]["timing"]
        concept_words = [w["word"] for w in record["tables"]["words"]]
        assert [t["word"] for t in timing] == concept_words
        assert record["columns"]["timing_steps_tested"] == 2  # steps 0 and 3 of 6
        for t in timing:
            assert t["decision_step"] in (0, 3, 4)  # a tested step, or the one after the last
            assert t["effect_whole_run"] > 0  # re-encoding the prompt without the word changes the run
    report = json.loads((tmp_path / "report.json").read_text())
    classes = report["concepts"]["classes"]
    assert all("decision" in entry for entry in classes.values())
    assert summary is not None


def test_concept_onset_gives_each_word_an_onset_step_the_report_reads(tmp_path):
    rows = parse_prompts("a red circle\na big blue square on the left\n", "txt")
    sweep(rows, tmp_path, settings(("concepts", "concept_onset")))
    got = records(tmp_path)
    for row in rows:
        record = got[row.id]
        assert record["status"] == "ok", record.get("error")
        onset = record["tables"]["onset"]
        assert [t["word"] for t in onset] == [w["word"] for w in record["tables"]["words"]]
        edits = {t["word"]: t["edit"] for t in onset}
        expected = {"red": "swap: cyan", "circle": "swap: square", "a": "removed"} if row.prompt == "a red circle" else {"big": "swap: small", "blue": "swap: yellow", "square": "swap: circle", "on": "removed", "left": "swap: right"}
        assert {w: edits[w] for w in expected} == expected
        if row.prompt == "a red circle":  # the edit is made in the prompt as written, word by word
            assert [t["edited_prompt"] for t in onset] == ["red circle", "a cyan circle", "a red square"]
        for t in onset:
            assert 0 <= t["onset_step"] <= t["onset_peak_step"] < 6
            assert t["largest_effect"] > 0  # every edit changes some step's prediction
        assert record["columns"]["onset_words_swapped"] == (2 if row.prompt == "a red circle" else 4)
    report = json.loads((tmp_path / "report.json").read_text())
    assert all("onset" in entry for entry in report["concepts"]["classes"].values())
    html = (tmp_path / "report.html").read_text()
    assert "onset step (causal), median" in html and (tmp_path / "onset.csv").is_file()


def test_decision_steps_join_their_own_prompt_and_word_only():
    from explain.sweep.aggregate import with_decisions

    words = [{"id": "a", "position": 0, "word": "red"}, {"id": "a", "position": 1, "word": "circle"}, {"id": "b", "position": 0, "word": "red"}]
    timing = [{"id": "a", "position": 1, "decision_step": 6}, {"id": "b", "position": 0, "decision_step": 3}]
    joined = with_decisions(words, timing)
    assert [w.get("decision_step") for w in joined] == [None, 6, 3]
    assert "decision_step" not in words[1]  # the table itself is left as it was
    onset = with_decisions(joined, [{"id": "b", "position": 0, "onset_step": 1}], "onset_step")
    assert [w.get("onset_step") for w in onset] == [None, None, 1] and [w.get("decision_step") for w in onset] == [None, 6, 3]
