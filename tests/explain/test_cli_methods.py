"""The CLI's report with DF-RISE, DF-CAM and the guidance map (--rise / --cam / --guidance-map), and the prompt's warnings in it."""

import json

from explain.cli import build_parser, main
from explain.methods import defaults


def test_rise_and_cam_options_take_their_defaults_from_the_library():
    args = build_parser().parse_args(["report", "a red circle", "--rise", "--cam", "3"])
    assert args.rise == "middle" and args.cam == "3"
    assert args.masks == defaults.RISE.n_masks and args.cam_layers == defaults.CAM.layers and args.rise_preset == "default"
    assert build_parser().parse_args(["report", "a red circle"]).rise is None


def test_report_with_rise_and_cam_has_their_sections_games_and_verdicts(tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", "a red circle above a blue square", "--model", "tiny", "--steps", "3", "--out", str(out),
                 "--rise", "--cam", "2", "--masks", "16", "--device", "cpu", "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    page = (out / "index.html").read_text()
    assert "DF-RISE at step 1" in page and "DF-CAM at step 2" in page  # --rise alone: the middle step
    assert page.count("beats random: ") == 2 and page.count("passes the sanity checks: ") >= 2
    methods = json.loads((out / "methods.json").read_text())
    assert [(m["method"], m["step"]) for m in methods] == [("DF-RISE", 1), ("DF-CAM", 2)]
    assert methods[0]["settings"]["n_masks"] == 16 and methods[0]["settings"]["similarity"] == defaults.RISE.similarity
    assert {g["mode"] for g in methods[0]["games"]} == {"insertion", "deletion"}
    err = capsys.readouterr().err
    assert "DF-RISE at step 1: 16 masks" in err and "beats random" in err


def test_report_with_the_guidance_map_shows_it_with_its_games_and_its_cached_verdict(tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", "a red circle above a blue square", "--steps", "4", "--out", str(out), "--guidance-map", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    methods = json.loads((out / "methods.json").read_text())
    assert [(m["method"], m["method_id"], m["step"]) for m in methods] == [("Guidance map", "guidance_map", 2)]
    assert {g["mode"] for g in methods[0]["games"]} == {"insertion", "deletion"} and methods[0]["settings"] == {"against": "unconditional"}
    # measured once for the embedded model (benchmarks/bench_sanity.py --maps guidance)
    assert methods[0]["sanity"] is True and "cached verdict" in methods[0]["sanity_line"]
    page = (out / "index.html").read_text()
    assert "Guidance map at step 2" in page and "identity path cancels" in page


def test_report_with_word_guidance_maps_draws_one_per_word_with_the_word_verdict(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["report", "a red circle above a blue square", "--steps", "4", "--out", str(out), "--guidance-map", "2", "--quiet"]
    assert main(args + ["--guidance-words", "red, blue square"]) == 0, capsys.readouterr().err
    methods = json.loads((out / "methods.json").read_text())
    assert [(m["method"], m["method_id"]) for m in methods] == [
        ("Guidance map", "guidance_map"), ("Guidance map of 'red'", "guidance_word"), ("Guidance map of 'blue square'", "guidance_word")]
    assert methods[1]["settings"] == {"against": "without red"} and methods[1]["sanity"] is True  # bench_sanity's per-word guidance rows
    assert "Guidance map of &#x27;red&#x27;" in (out / "index.html").read_text()  # the label, HTML-escaped
    other = ["report", "a red circle above a blue square", "--steps", "4", "--out", str(tmp_path / "other"), "--guidance-map", "2", "--quiet"]
    assert main(other + ["--guidance-words", "green"]) == 2
    assert "--guidance-words: 'green' is not in the prompt" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_report_with_the_causal_onset_edits_each_word_in_the_prompt_as_written(tmp_path, capsys):
    out = tmp_path / "rep"
    prompt = "a large red circle, above a small blue square"
    assert main(["report", prompt, "--steps", "4", "--out", str(out), "--onset", "--quiet"]) == 0, capsys.readouterr().err
    onset = json.loads((out / "onset.json").read_text())
    words = ["a", "large", "red", "circle", ",", "above", "a (2)", "small", "blue", "square"]  # a repeated word is labelled by its place
    assert onset["labels"] == words and len(onset["effect"]) == len(words) and all(len(e) == 4 for e in onset["effect"])
    by_word = dict(zip(onset["labels"], onset["edited_prompts"]))
    assert by_word["red"] == "a large cyan circle, above a small blue square"  # the comma kept
    assert by_word["above"] == "a large red circle, below a small blue square"
    assert onset["edits"][4] == "removed" and onset["edited_prompts"][4] == "a large red circle above a small blue square"
    # the content words change the prediction at some step; their onsets lie in the run
    for word in ("red", "circle", "square", "small"):
        k = words.index(word)
        assert max(onset["effect"][k]) > 0 and 0 <= onset["onset_step"][k] <= onset["peak_step"][k] < 4
    assert "61.3 %" in onset["evidence"]  # the embedded model's measured agreement, said beside the curves
    page = (out / "index.html").read_text()
    assert "When each word starts to shape the prediction (causal onset)" in page and "swap: cyan" in page
    assert (out / "onset.png").is_file()


def test_a_method_step_outside_the_run_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from explain import cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["report", "a red circle", "--steps", "4", "--rise", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--rise 9 is outside the run: choose a step between 0 and 3" in capsys.readouterr().err
    assert main(["report", "a red circle", "--cam", "late", "--out", str(tmp_path / "x")]) == 2
    assert "--cam takes a step number" in capsys.readouterr().err
    assert main(["report", "a red circle", "--steps", "4", "--guidance-map", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--guidance-map 4 is outside the run" in capsys.readouterr().err
    assert main(["report", "a red circle", "--guidance-words", "red", "--out", str(tmp_path / "x")]) == 2
    assert "--guidance-words needs --guidance-map" in capsys.readouterr().err


def test_the_cli_report_shows_the_prompts_warnings(tmp_path, capsys):
    prompt = "a red circle above a blue square " * 12 + "green triangle"
    assert main(["report", prompt, "--model", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--quiet", "--device", "cpu", "--dtype", "float32"]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    notes = page[page.index('id="notes"') : page.index("</div>", page.index('id="notes"'))]
    assert "cut off" in notes and "green triangle" in notes
