"""Explanation nodes on synthetic traces: outputs ComfyUI can use (IMAGE [B,H,W,3] in 0..1,
MASK [B,H,W], JSON strings), the right words and steps, and clear errors for bad input.
DF-RISE and DF-CAM run on a toy denoiser in place of a ComfyUI MODEL (their ComfyUI wiring is
covered by the integration tests)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from explain.denoiser import GuidedDenoiser
from nodes import comfy_denoiser, explain_nodes
from nodes.runs import Run, RunRegistry, TraceHandle, TraceLookupError
from tests.explain.synthetic import synthetic_trace


class FakeVAE:
    """ComfyUI VAE.decode: latents [N, 4, h, w] → IMAGE [N, 8h, 8w, 3] in 0..1."""

    def __init__(self):
        self.calls = 0

    def decode(self, latents):
        self.calls += 1
        rgb = torch.sigmoid(latents[:, :3].float())
        return F.interpolate(rgb, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)


def loaded(trace=None):
    return TraceHandle(trace=trace if trace is not None else synthetic_trace(), source="test")


def check_image(t, n=None):
    assert t.ndim == 4 and t.shape[-1] == 3 and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    if n is not None:
        assert t.shape[0] == n


def test_word_heatmaps_find_the_words_where_the_synthetic_attention_put_them():
    out = explain_nodes.ExplainWordHeatmaps.execute(loaded(), None, "red, blue square", "", 0, False, "paper")
    overlays, masks, grid, words = out.result
    assert json.loads(words) == ["red", "blue square"]
    check_image(overlays, 2)
    check_image(grid, 1)
    assert masks.shape == (2, 32, 32) and float(masks.max()) == 1.0
    h = masks.shape[-1] // 2
    assert masks[0, :h, :h].mean() > masks[0, h:, h:].mean()  # red: top left
    assert masks[1, h:, h:].mean() > masks[1, :h, :h].mean()  # blue square: bottom right
    assert out.ui["images"][0]["type"] == "temp"


def test_word_heatmaps_follow_the_step_range_and_the_image_input():
    trace = synthetic_trace(steps=6)
    image = torch.rand(1, 48, 40, 3)
    early = explain_nodes.ExplainWordHeatmaps.execute(loaded(trace), None, "blue", "0:2", 0, False, "alpha", image)
    late = explain_nodes.ExplainWordHeatmaps.execute(loaded(trace), None, "blue", "-2:", 0, False, "alpha", image)
    assert early.result[1].shape == (1, 48, 40)
    assert not torch.allclose(early.result[0], late.result[0])


def test_word_heatmaps_errors_name_the_fix():
    node = explain_nodes.ExplainWordHeatmaps
    with pytest.raises(ValueError, match="its words are"):
        node.execute(loaded(), None, "zebra", "", 0, False, "paper")
    with pytest.raises(ValueError, match="step"):
        node.execute(loaded(), None, "", "x:y", 0, False, "paper")
    with pytest.raises(ValueError, match="items 0..0"):
        node.execute(loaded(), None, "", "", 3, False, "paper")
    with pytest.raises(ValueError, match="negative"):
        node.execute(loaded(), None, "", "", 0, True, "paper")
    with pytest.raises(TraceLookupError, match="LATENT"):
        node.execute(TraceHandle(tap_key="k", registry=RunRegistry()), None, "", "", 0, False, "paper")


def test_nodes_resolve_a_tap_handle_by_the_samplers_latent():
    registry = RunRegistry()
    latent = torch.randn(1, 4, 8, 8)
    trace = synthetic_trace()
    registry.add(Run("k", trace, [latent]))
    handle = TraceHandle(tap_key="k", registry=registry)
    plot, text = explain_nodes.ExplainConceptScores.execute(handle, {"samples": latent}, "", "", "share", 0, False).result
    check_image(plot, 1)
    assert json.loads(text)["labels"][:3] == ["a", "red", "circle"]
    with pytest.raises(TraceLookupError):
        explain_nodes.ExplainConceptScores.execute(handle, {"samples": latent + 1}, "", "", "share", 0, False)


def test_concept_scores_json_ranks_the_rising_word_up():
    out = explain_nodes.ExplainConceptScores.execute(loaded(), None, "red, blue", "", "normalized", 0, False)
    data = json.loads(out.result[1])
    rho = dict(zip(data["labels"], data["spearman_rho"]))
    assert rho["red"] > 0 > rho["blue"]
    assert out.ui["text"] == [out.result[1]]


def test_step_previews_decode_the_chosen_steps():
    trace = synthetic_trace(steps=6)
    trace.meta.update(latent_space="sigma", latent_scale_factor=0.5)
    vae = FakeVAE()
    x0, xt, grid = explain_nodes.ExplainStepPreviews.execute(loaded(trace), None, vae, "", 3, 0).result
    check_image(x0, 3)
    check_image(xt, 3)
    check_image(grid, 1)
    assert vae.calls == 2
    x0, _, _ = explain_nodes.ExplainStepPreviews.execute(loaded(trace), None, vae, "1,4", 8, 0).result
    expected = torch.sigmoid(trace.x0[4, 0, :3] / 0.5)
    torch.testing.assert_close(x0[1, ::8, ::8].permute(2, 0, 1), expected)


def test_recovery_in_latent_and_image_space():
    trace = synthetic_trace(steps=6)
    trace.meta.update(latent_space="sigma", latent_scale_factor=1.0)
    grid, curves, mask, text = explain_nodes.ExplainRecovery.execute(loaded(trace), None, 0.25, 4, 0).result
    check_image(grid, 1)
    check_image(curves, 1)
    assert mask.shape == (1, 32, 32) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    data = json.loads(text)
    assert data["space"] == "latent" and data["recovered_fraction"][0][-1] == 1.0
    h = mask.shape[-1] // 2
    assert mask[0, :h, :h].mean() < mask[0, h:, h:].mean()  # the top left settles first
    _, _, mask_img, text_img = explain_nodes.ExplainRecovery.execute(loaded(trace), None, 0.25, 4, 0, FakeVAE()).result
    assert json.loads(text_img)["space"] == "preview" and mask_img.shape == (1, 64, 64)


def test_preview_ui_writes_pngs_to_comfyuis_temp_folder(folder_paths):
    ui = explain_nodes.preview_ui(torch.rand(2, 16, 16, 3))
    assert len(ui["images"]) == 2
    for entry in ui["images"]:
        assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), entry["filename"]))


# ---------------------------------------------------------------------------- DF-RISE and DF-CAM wiring
class ResBlock(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class ToyUNet(torch.nn.Module):
    """A conditional toy: the context vector scales the top-left quadrant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = ResBlock(4)
        self.out = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, context):
        h = self.block(x)
        gate = torch.zeros_like(x[:, :1])
        gate[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1
        return self.out(h) * (1 + context.view(-1, 1, 1, 1) * gate)


def toy_run_with_denoiser(model, positive, negative, trace, step, guidance_scale, explain, separate_branches=False, backward=False):
    """Stands in for comfy_denoiser.run_with_denoiser: same contract, a toy model instead of ComfyUI."""
    unet = ToyUNet()
    calls = []

    def model_fn(x, level):
        if separate_branches:  # as the ComfyUI adapter does for DF-CAM: uncond forward first
            u = unet(x, torch.zeros(x.shape[0]))
            c = unet(x, torch.ones(x.shape[0]))
            calls.append("separate")
            return u, c
        both = unet(torch.cat([x, x]), torch.cat([torch.zeros(x.shape[0]), torch.ones(x.shape[0])]))
        calls.append("batched")
        return both.chunk(2)

    denoiser = GuidedDenoiser(model_fn, "sample", guidance_scale, latent_space="sigma", modules=dict(unet.named_modules()))
    result = explain(denoiser)
    assert calls and all(c == ("separate" if separate_branches else "batched") for c in calls)
    assert backward == separate_branches  # DF-CAM asks ComfyUI for room for its weight clones
    return result


def test_rise_node_outputs_a_mask_an_overlay_and_both_aucs(monkeypatch):
    monkeypatch.setattr(comfy_denoiser, "run_with_denoiser", toy_run_with_denoiser)
    trace = synthetic_trace(steps=4)
    trace.meta["guidance_scale"] = 3.0
    out = explain_nodes.ExplainRise.execute(loaded(trace), None, None, [], [], 2, 32, "neg_mse", "x0", "bernoulli", 0.5, True, 0, 0.0, 0, True)
    overlay, mask, insertion, deletion, text = out.result
    check_image(overlay, 1)
    assert mask.shape == (1, 32, 32) and float(mask.max()) == pytest.approx(1.0)
    assert math.isfinite(insertion) and math.isfinite(deletion)
    info = json.loads(text)
    assert info["cfg"] == 3.0 and info["step"] == 2 and info["n_masks"] == 32
    none = explain_nodes.ExplainRise.execute(loaded(trace), None, None, [], [], -1, 8, "cosine", "x0", "grid", 0.5, False, 0, 2.0, 0, False)
    assert math.isnan(none.result[2]) and json.loads(none.result[4])["step"] == 3


def test_cam_node_gets_nonzero_maps_from_separate_branch_forwards(monkeypatch):
    monkeypatch.setattr(comfy_denoiser, "run_with_denoiser", toy_run_with_denoiser)
    trace = synthetic_trace(steps=4)
    trace.meta["guidance_scale"] = 3.0
    overlay, mask, text = explain_nodes.ExplainCam.execute(loaded(trace), None, None, [], [], 1, "all", "sum", "x0", 0.0, 0).result
    check_image(overlay, 1)
    assert mask.shape == (1, 32, 32) and float(mask.max()) > 0
    assert json.loads(text)["modules"] == 1


def test_guidance_map_node_shows_where_the_conditioning_acts(monkeypatch):
    monkeypatch.setattr(comfy_denoiser, "run_with_denoiser", toy_run_with_denoiser)
    trace = synthetic_trace(steps=4)
    trace.meta["guidance_scale"] = 3.0
    overlay, mask, text = explain_nodes.ExplainGuidanceMap.execute(loaded(trace), None, None, [], [], 1, 0.0, 0).result
    check_image(overlay, 1)
    assert mask.shape == (1, 32, 32) and float(mask.max()) == pytest.approx(1.0)
    # the toy's conditioning gates only the top-left quarter: the map is zero elsewhere
    assert float(mask[0, 20:, :].max()) < 1e-6 and float(mask[0, :, 20:].max()) < 1e-6
    info = json.loads(text)
    assert info["against"] == "unconditional" and info["cfg"] == 3.0 and "sanity" in info
    with pytest.raises(ValueError, match="set cfg above 1"):
        explain_nodes.ExplainGuidanceMap.execute(loaded(trace), None, None, [], [], 1, 1.0, 0)


class FakeClip:
    """Encodes a text as one number per word (its letters' sum), so an edited prompt differs."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        value = torch.tensor([[sum(map(ord, text)) % 97 / 97.0]])
        return [[value, {"pooled_output": value}]]


def conditioned_run_with_denoiser(model, positive, negative, trace, step, guidance_scale, explain, separate_branches=False, backward=False):
    """A toy stand-in whose conditional prediction adds the positive conditioning's numbers (of
    every entry, as combined conditioning acts together) to the top-left quarter of the latent."""
    context = sum(float(entry[0].flatten()[0]) for entry in positive)
    calls.append({"context": context, "extra": {k: v for k, v in positive[0][1].items() if k != "pooled_output"}})

    def model_fn(x, level):
        gate = torch.zeros_like(x)
        gate[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1
        return x * 0.5, x * 0.5 + context * gate

    return explain(GuidedDenoiser(model_fn, "sample", guidance_scale, latent_space="sigma"))


calls: list = []


def test_concept_onset_node_re_encodes_each_edited_prompt_and_times_every_word(monkeypatch):
    monkeypatch.setattr(comfy_denoiser, "run_with_denoiser", conditioned_run_with_denoiser)
    calls.clear()
    trace = synthetic_trace(steps=4)
    trace.meta["guidance_scale"] = 3.0
    positive = FakeClip().encode_from_tokens_scheduled(trace.prompts[0])
    positive[0][1]["guidance"] = 3.5  # e.g. FluxGuidance: an edited prompt keeps it
    plot, text = explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, positive, [], FakeClip(), "", 0.0, 0).result
    check_image(plot, 1)
    info = json.loads(text)
    words = [w.text for w in trace.words[0] if w.token_indices]
    assert info["labels"] == ["a", "red", "circle", "above", "a (2)", "blue", "square"] and len(words) == 7
    assert info["edited_prompts"][1] == "a cyan circle above a blue square" and info["edits"][0] == "removed"
    assert len(calls) == 1 + len(words) and all(c["extra"] == {"guidance": 3.5} for c in calls)
    assert all(len(e) == 4 for e in info["effect"]) and max(map(max, info["effect"])) > 0
    assert info["space"] == "latent" and "not measured" in info["evidence"]
    assert info["reference"] == "the sampler's positive conditioning"
    only = json.loads(explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, positive, [], FakeClip(), "red, square", 0.0, 0).result[1])
    assert only["labels"] == ["red", "square"] and only["effect"][0] == info["effect"][1]
    with pytest.raises(ValueError, match="item 3 is outside the batch"):
        explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, positive, [], FakeClip(), "", 0.0, 3)
    with pytest.raises(ValueError, match="'green' is not a word of the prompt"):
        explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, positive, [], FakeClip(), "green", 0.0, 0)
    trace.prompts = [""]
    with pytest.raises(ValueError, match="no prompt text"):
        explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, positive, [], FakeClip(), "", 0.0, 0)


def test_concept_onset_node_compares_edits_with_the_plain_prompt_when_the_positive_is_more(monkeypatch):
    """A positive combined with another prompt (ConditioningCombine: two entries) is not the Tap's
    prompt: the edits are compared with the prompt's own encoding, so the second entry does not
    enter every effect, and the json says so."""
    monkeypatch.setattr(comfy_denoiser, "run_with_denoiser", conditioned_run_with_denoiser)
    trace = synthetic_trace(steps=4)
    trace.meta["guidance_scale"] = 3.0
    plain = FakeClip().encode_from_tokens_scheduled(trace.prompts[0])
    plain[0][1]["guidance"] = 3.5
    combined = plain + FakeClip().encode_from_tokens_scheduled("a green triangle")
    calls.clear()
    info = json.loads(explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, combined, [], FakeClip(), "red", 0.0, 0).result[1])
    assert "re-encoded" in info["reference"] and "2 entries" in info["reference"]
    assert calls[0]["context"] == pytest.approx(float(plain[0][0].flatten()[0])) and calls[0]["extra"] == {"guidance": 3.5}
    calls.clear()
    alone = json.loads(explain_nodes.ExplainConceptOnset.execute(loaded(trace), None, None, plain, [], FakeClip(), "red", 0.0, 0).result[1])
    assert alone["effect"] == info["effect"]  # the same measurement as with the plain positive


def test_guidance_defaults_to_the_recorded_cfg():
    trace = synthetic_trace()
    assert comfy_denoiser.guidance_of(trace, 2.5) == 2.5
    trace.meta["guidance_scale"] = 6.0
    assert comfy_denoiser.guidance_of(trace, 0.0) == 6.0
    trace.meta.pop("guidance_scale")
    with pytest.raises(ValueError, match="set cfg"):
        comfy_denoiser.guidance_of(trace, 0.0)


def test_nodes_that_need_a_missing_package_say_so_at_validation_and_at_start(monkeypatch):
    """Installed without requirements.txt (matplotlib missing, simulated): the explanation nodes fail
    ComfyUI's validation with the install command, and refuse to start if run anyway."""
    from nodes import environment

    real = environment.module_available
    monkeypatch.setattr(environment, "module_available", lambda m: False if m == "matplotlib" else real(m))
    for node in (explain_nodes.ExplainWordHeatmaps, explain_nodes.ExplainConceptScores, explain_nodes.ExplainRise, explain_nodes.ExplainCam, explain_nodes.ExplainGuidanceMap, explain_nodes.ExplainConceptOnset):
        message = node.validate_inputs(trace=None)
        assert isinstance(message, str) and "needs matplotlib" in message and "install.py" in message
    with pytest.raises(environment.MissingRequirementError, match="needs matplotlib"):
        explain_nodes.ExplainWordHeatmaps.execute(loaded(), None, "", "", 0, False, "paper")
    monkeypatch.setattr(environment, "module_available", real)
    assert explain_nodes.ExplainWordHeatmaps.validate_inputs(trace=None) is True


def test_missing_requirements_reads_names_and_minimum_versions(tmp_path, monkeypatch):
    from nodes import environment

    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\nnumpy>=1.24\nMatPlotLib>=3.7  # plots\nnot-installed-pkg>=1\n-r other.txt\npillow\n")
    versions = {"numpy": "1.21.5", "matplotlib": "3.8.0rc1", "pillow": "10.0"}
    monkeypatch.setattr(environment, "installed_version", lambda name: versions.get(name))
    assert environment.missing_requirements(reqs) == ["numpy>=1.24 (found 1.21.5)", "not-installed-pkg>=1"]
    assert environment.version_tuple("3.8.0rc1") == (3, 8, 0) and environment.version_tuple("2.13.0+cpu") == (2, 13, 0)


def test_rise_node_settings_follow_the_library_defaults_and_can_be_the_published_algorithm():
    """The node's widgets start at explain.methods.defaults.RISE and are laid over it; the paper's
    values typed into them give the published algorithm exactly (the settings the node does not
    show, perturbation and score, are the paper's in the default)."""
    import dataclasses

    from explain.methods import defaults

    d = defaults.RISE
    same = explain_nodes.rise_settings(d.n_masks, d.similarity, d.quantity, d.masks, d.p, d.centered, d.seed)
    assert same == d and defaults.method_id(same) == "df_rise"
    pr = defaults.PAPER_RISE
    paper = explain_nodes.rise_settings(pr.n_masks, pr.similarity, pr.quantity, pr.masks, pr.p, pr.centered, 3)
    assert dataclasses.replace(paper, cells=pr.cells) == dataclasses.replace(pr, seed=3) and defaults.method_id(paper) == "df_rise:paper"


def test_nodes_say_whether_a_method_passes_on_the_traces_model():
    line = explain_nodes.sanity_line("df_rise", synthetic_trace())
    assert line.startswith("passes the sanity checks: not measured for this model") and "on demand" in line
