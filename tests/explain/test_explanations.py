"""DF-RISE / DF-CAM with their games and verdicts, as every front end shows them."""

import dataclasses
import sys
import types

import pytest
import torch

from explain import explanations
from explain.adapters.diffusers import from_pipeline
from explain.methods import defaults
from explain.testing import tiny_sd_pipeline
from tests.explain.generation import run_and_trace


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_sd_pipeline("dpm++")
    trace = run_and_trace(pipe, "a red circle above a blue square", steps=3)
    trace.meta["model"] = "tiny (random weights, test only)"
    return trace, from_pipeline(pipe, trace)


def game(mode, auc, random_auc):
    return explanations.Game(mode, [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], auc, random_auc)


def test_beats_random_means_lower_insertion_and_higher_deletion_auc_than_the_random_map():
    assert game("insertion", 0.1, 0.2).beats_random and not game("insertion", 0.3, 0.2).beats_random
    assert game("deletion", 0.3, 0.2).beats_random and not game("deletion", 0.1, 0.2).beats_random
    assert game("deletion", float("nan"), 0.2).beats_random is None
    both = explanations.MethodMap("DF-RISE", "df_rise", 1, 500.0, torch.zeros(2, 2), torch.zeros(2, 2), games=[game("insertion", 0.1, 0.2), game("deletion", 0.1, 0.2)])
    assert both.beats_random is False and both.verdict_lines()[0].startswith("beats random: no (insertion: yes")
    assert explanations.MethodMap("DF-CAM", "df_cam", 1, 500.0, torch.zeros(2, 2), torch.zeros(2, 2)).beats_random is None


def test_df_rise_runs_with_the_librarys_defaults_and_reports_its_games(tiny, monkeypatch):
    trace, den = tiny
    monkeypatch.setattr(defaults, "RISE", dataclasses.replace(defaults.RISE, n_masks=16, similarity="neg_mse", centered=False))
    seen = []
    result = explanations.run_rise(den, trace, 1, progress=lambda fraction, desc: seen.append(fraction))
    assert result.settings["similarity"] == "neg_mse" and result.settings["n_masks"] == 16 and not result.settings["centered"]
    assert "16 random masks" in result.caption and "neg_mse" in result.caption
    assert [g.mode for g in result.games] == ["insertion", "deletion"] and all(g.space == "latent" for g in result.games)  # no decoder given
    assert result.method_id == "df_rise" and result.heat.shape == trace.latent_size
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_df_cam_runs_on_a_layer_group_with_its_games(tiny):
    trace, den = tiny
    result = explanations.run_cam(den, trace, 2, layers="up_blocks")
    assert result.settings["layers"] == "up_blocks" and result.settings["blocks"] > 1
    assert result.heat.shape == trace.image_size and len(result.games) == 2 and result.method_id == "df_cam"


def test_guidance_map_of_words_reads_the_word_verdict_not_the_prompts(tiny, monkeypatch):
    trace, den = tiny
    asked = []
    monkeypatch.setattr(explanations, "sanity_verdict", lambda method, model: (asked.append(method), (True, f"{method} line"))[1])
    prompt = explanations.run_guidance(den, trace, 1, games=False)
    word = explanations.run_guidance(den, trace, 1, games=False, words="red")
    assert asked == ["guidance_map", "guidance_word"] and word.sanity_line == "guidance_word line"
    assert (prompt.method_id, word.method_id) == ("guidance_map", "guidance_word") and word.method == "Guidance map of 'red'"
    assert word.settings["against"] == "without red" and not torch.allclose(word.saliency, prompt.saliency)


def test_sanity_verdict_says_not_measured_until_the_sanity_module_knows_the_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "explain.methods.sanity", None)  # this version has no sanity module
    assert explanations.sanity_verdict("df_rise", "embedded (diffusion-explain/shapes-64)") == (None, explanations.NOT_MEASURED)

    asked = []

    class Verdict:
        passes = False

        def line(self):
            return "FAILS the sanity checks (ρ vs randomised model 0.91)"

    def known_verdict(method, model):
        asked.append((method, model))
        return Verdict() if model == "diffusion-explain/shapes-64" else None

    monkeypatch.setitem(sys.modules, "explain.methods.sanity", types.SimpleNamespace(known_verdict=known_verdict))
    passes, line = explanations.sanity_verdict("df_rise", "embedded (diffusion-explain/shapes-64)")
    assert passes is False and line.startswith("passes the sanity checks: no (ρ vs randomised model 0.91)")
    assert line.endswith("[cached verdict, measured once for diffusion-explain/shapes-64]")  # says where it came from
    assert asked == [("df_rise", "embedded (diffusion-explain/shapes-64)"), ("df_rise", "diffusion-explain/shapes-64")]
    assert explanations.sanity_verdict("df_cam", "someone/else") == (None, explanations.NOT_MEASURED)


def test_rise_method_ids_follow_the_presets():
    assert explanations.rise_method_id(defaults.RISE) == "df_rise"
    assert explanations.rise_method_id(dataclasses.replace(defaults.RISE, n_masks=7, seed=3)) == "df_rise"
    assert explanations.rise_method_id(defaults.PAPER_RISE) in ("df_rise:paper", "df_rise")
    assert explanations.rise_method_id(dataclasses.replace(defaults.RISE, p=0.123)) == "df_rise:custom"
