"""The Tap and every explanation node on joint-attention (DiT) graphs inside the real ComfyUI:
tiny random-weight SD3, SD3.5 (MMDiT-X), Flux schnell, Flux dev and Chroma models built with
ComfyUI's own classes (``comfyui_dit_models.py``), run through ComfyUI's prompt validation and
PromptExecutor (``comfyui_dit_scenarios.py``).

Opt-in like the other integration tests: set ``COMFYUI_PATH``. On a ComfyUI older than 0.3.60 (no
``optimized_attention_override``) the DiT graphs must fail at the Tap with a message naming the
version they need, and UNet graphs keep working (test_comfyui_integration.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nodes.comfyui_report import ok, scenario, version_tuple

COMFYUI = os.environ.get("COMFYUI_PATH", "")
FAMILIES = ["sd3", "sd35", "flux-schnell", "flux-dev", "chroma"]
GUIDED = {"sd3": True, "sd35": True, "flux-schnell": True, "flux-dev": False, "chroma": True}  # flux-dev: cfg 1 + FluxGuidance
BLOCKS = {"sd3": ["double_block 0", "double_block 1"], "sd35": ["double_block 0", "double_block 1"]}
FLUX_BLOCKS = ["double_block 0", "double_block 1", "single_block 0", "single_block 1"]
MAP_TOLERANCE = 1e-6  # float32 maps against the float64 reference (largest difference seen: 6e-8)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(
        not COMFYUI or not (Path(COMFYUI) / "execution.py").is_file(),
        reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration tests",
    ),
]


@pytest.fixture(scope="module")
def report(comfyui_report):
    return comfyui_report


@pytest.fixture(scope="module")
def supported(report):
    return version_tuple(report["comfyui_version"]) >= (0, 3, 60)


def need_override(supported):
    if not supported:
        pytest.skip("this ComfyUI predates optimized_attention_override (0.3.60): test_dit_graphs_on_an_older_comfyui_say_what_they_need covers it")


def test_dit_graphs_on_an_older_comfyui_say_what_they_need(report, supported):
    facts = scenario(report, "dit_families")
    assert facts["supported"] == supported
    if supported:
        pytest.skip(f"ComfyUI {report['comfyui_version']} has the override: the other tests cover the DiT graphs")
    for family in FAMILIES:
        result = facts[family]["result"]
        assert not result["ok"] and result["error"]["node_type"] == "DiffusionExplainTap", result
        assert "needs ComfyUI 0.3.60 or newer" in result["error"]["exception_message"]


def test_the_version_message_on_a_dit_without_the_override(report):
    facts = scenario(report, "dit_old_comfyui")
    assert "needs ComfyUI 0.3.60 or newer for Flux" in facts["message"] and "UNet model (SD1.x, SD2.x, SDXL), which works from 0.3.52" in facts["message"]
    assert facts["model_untouched"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tapped_sampling_is_bit_identical_to_untapped(report, supported, family):
    need_override(supported)
    facts = scenario(report, "dit_families")[family]
    ok(facts["result"])
    assert facts["bit_identical"] and facts["max_abs_diff"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_equal_the_explicit_joint_softmax_of_independently_captured_q_and_k(report, supported, family):
    """A test speed pack before the Tap kept every joint attention's q and k; the reference is the
    float64 softmax over all joint keys, image rows × text columns renormalised over the text,
    heads and blocks averaged, per branch by cond_or_uncond (the trace: its token-grid layer)."""
    need_override(supported)
    facts = scenario(report, "dit_families")[family]
    ok(facts["result"])
    assert facts["reference_calls_0"] == 3
    diffs = facts["reference_max_abs_diff"]
    assert isinstance(diffs["0"], float) and diffs["0"] <= MAP_TOLERANCE, diffs
    if GUIDED[family]:
        assert facts["reference_calls_1"] == 3
        assert isinstance(diffs["1"], float) and diffs["1"] <= MAP_TOLERANCE, diffs
    else:
        assert facts["reference_calls_1"] == 0 and facts["trace"]["attention_negative_shape"] is None
    assert facts["latent_grid_max_abs_diff"] <= 1e-6  # the latent-grid maps are the token-grid ones resized
    assert facts["saved_attention_max_abs_diff"] <= 2e-3  # the file keeps them as float16


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tap_chains_to_a_speed_packs_override_which_still_runs(report, supported, family):
    need_override(supported)
    facts = scenario(report, "dit_families")[family]
    ok(facts["result"])
    assert facts["tapped_override"] == "JointAttentionTap" and facts["tapped_chains_to_speed_pack"]
    assert facts["speed_pack_calls_behind_the_tap"] >= 3 * len(BLOCKS.get(family, FLUX_BLOCKS))  # every joint attention of the tapped run
    assert facts["speed_pack_calls"] > facts["speed_pack_calls_behind_the_tap"]  # and the untapped run's
    assert facts["speed_pack_model_kept"] and facts["loaded_model_untouched"]  # the Tap patched a clone
    assert facts["trace"]["meta"]["chained_attention_patches"] == ["optimized_attention_override"]
    assert facts["dit_wrappers"] == BLOCKS.get(family, FLUX_BLOCKS)


def test_without_a_speed_pack_the_same_latents_and_maps(report, supported):
    need_override(supported)
    facts = scenario(report, "dit_without_speed_pack")
    for family in ("sd3", "flux-schnell"):
        ok(facts[family]["result"])
        ok(facts[family]["with_pack_result"])
        assert facts[family]["previous"] is None
        assert facts[family]["same_latent"] and facts[family]["same_maps"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trace_of_a_dit_run(report, supported, family):
    need_override(supported)
    trace = scenario(report, "dit_families")[family]["trace"]
    meta = trace["meta"]
    assert trace["steps"] == 3 and trace["batch"] == 1 and trace["latent_size"] == [6, 4] and trace["image_size"] == [48, 32]
    assert meta["latent_space"] == "flow" and meta["prediction_type"] == "flow" and meta["joint_rows"] == "renormalized"
    assert meta["prompt_matches_conditioning"] is True and "notes" not in meta
    assert meta["family"] == {"sd3": "sd3", "sd35": "sd3", "chroma": "chroma"}.get(family, "flux")
    assert all(0.0 < s <= 1.0 for s in trace["sigmas"]) and trace["sigmas"][0] == pytest.approx(1.0)
    words = {w for w, _ in trace["words"]}
    assert {"red", "circle", "above", "blue", "square"} <= words
    if family.startswith("sd3"):  # CLIP-L's part, then T5's: a word keeps a position in each
        assert meta["text_layout"] == [["l", 9], ["t5xxl", 10]] and trace["attention_shape"] == [3, 1, 19, 6, 4]
        assert dict((w, i) for w, i in trace["words"])["red"] == [2, 11]
        assert trace["tokens"][:3] == ["<|startoftext|>", "a</w>", "red</w>"] and trace["tokens"][-1] == "</s>"
    else:  # T5 only
        assert meta["text_layout"] == [["t5xxl", 10]] and trace["attention_shape"] == [3, 1, 10, 6, 4]
        assert dict((w, i) for w, i in trace["words"])["red"] == [2] and trace["tokens"][2] == "▁red"
    assert trace["layers"] == {"3x2": [3, 1, trace["attention_shape"][2], 3, 2]}  # per_resolution_maps: the token grid
    assert trace["row_sums"][1] <= 1.0 + 1e-5  # renormalised over the whole text context, of which the kept positions are a part
    if GUIDED[family]:
        assert trace["negative_words"] == ["blurry"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_explanation_node_runs_on_a_dit_graph(report, supported, family):
    need_override(supported)
    facts = scenario(report, "dit_families")[family]
    ok(facts["result"])
    assert all(facts["previews"].values()), facts["previews"]  # word heatmaps, step previews, concepts, DF-RISE, DF-CAM, recovery
    assert facts["heatmap_masks_shape"] == [len(facts["trace"]["words"]), 48, 32]
    assert all(a == a for a in facts["rise_aucs"])  # both games played (not NaN)
    assert facts["cam_mask_shape"] == [1, 48, 32] and facts["cam_mask_max"] > 0
    cam = facts["cam_json"]
    assert cam["layers"] == "image tokens of every transformer block" and cam["modules"] == len(BLOCKS.get(family, FLUX_BLOCKS))
    assert facts["x0_previews_shape"] == [3, 48, 32, 3] and facts["recovery_mask_shape"] == [1, 48, 32]
    assert facts["dit_wrappers_after_cam"] == BLOCKS.get(family, FLUX_BLOCKS)  # DF-CAM's probes were on a clone
    onset = facts["onset_json"]  # the edited prompts re-encoded with the graph's own CLIP (and FluxGuidance's guidance kept)
    assert "18" in facts["previews"] and onset["labels"] == ["red", "square"] and onset["space"] == "decoded"
    assert all(max(e) > 0 for e in onset["effect"]), onset["effect"]
    if family != "flux-dev":  # guidance-distilled Flux dev runs at cfg 1: one branch, no guidance map
        assert "17" in facts["previews"] and facts["guidance_mask_shape"] == [1, 48, 32] and facts["guidance_mask_max"] == pytest.approx(1.0)
        assert facts["guidance_json"]["against"] == "unconditional" and facts["guidance_json"]["cfg"] == 3.0


@pytest.mark.parametrize("family", ["sd3", "flux-schnell"])
def test_probes_reproduce_the_samplers_x0_in_the_flow_space(report, supported, family):
    need_override(supported)
    facts = scenario(report, "dit_probes_match_the_sampler")[family]
    assert facts["latent_space"] == "flow" and 0 < facts["sigma"] < 1
    assert facts["x0_max_abs_diff"] <= 1e-5 * max(facts["scale"], 1.0)
    assert facts["flow_identity_max_abs_diff"] <= 1e-4  # x = (1-σ)·x0 + σ·ε for the probe's x0 and ε


@pytest.mark.parametrize("family,tokens", [("sd3", 19), ("flux-schnell", 10)])
def test_a_batch_of_two_gets_one_map_per_item(report, supported, family, tokens):
    need_override(supported)
    facts = scenario(report, "dit_batch_of_two")[family]
    assert facts["attention_shape"] == [2, 2, tokens, 6, 4] and facts["attention_negative_shape"][:2] == [2, 2]
    assert facts["items_differ"] and facts["bit_identical"]


def test_a_saved_dit_trace_loads_back_and_explains_without_a_model(report, supported):
    need_override(supported)
    facts = scenario(report, "dit_trace_roundtrip")
    ok(facts["first"])
    assert facts["same_tokens_words_meta"] and facts["same_latents"]
    assert facts["attention_max_abs_diff"] <= 2e-3  # float16 maps in the file
    assert facts["masks_shape"] == [2, 48, 32] and facts["words"] == '["red", "square"]'


def test_dit_graphs_under_newer_comfyuis_calling_convention(report, supported):
    need_override(supported)
    facts = scenario(report, "dit_newer_calling_convention")
    for family in ("sd3", "flux-schnell"):
        entry = facts[family]
        ok(entry["result"])
        assert entry["bit_identical"] and all(entry["previews"].values())
        assert entry["reference_max_abs_diff"]["0"] <= MAP_TOLERANCE
    received = facts["latent_shapes_received"]
    assert received and all(shapes is not None and len(shapes) == 1 for shapes in received), received
