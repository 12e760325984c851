"""The node pack inside the real ComfyUI: its own node loading, prompt validation and
PromptExecutor, on the shipped example workflows and on hand-made graphs, with a tiny
random-weight SD1 checkpoint built by the harness.

Opt-in: set ``COMFYUI_PATH`` to a ComfyUI checkout (whose requirements, minus torch, are
installed). All scenarios run in one ComfyUI subprocess (``comfyui_harness.py``); each test
asserts on what one scenario reported. See the README for how to run them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.nodes.comfyui_report import ok, scenario

HERE = Path(__file__).resolve().parent
COMFYUI = os.environ.get("COMFYUI_PATH", "")

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


def test_comfyui_loads_every_node_of_the_pack(report):
    from nodes.pack import NODES_BY_ID

    assert report["loaded_pack"] == sorted(NODES_BY_ID)


def test_txt2img_example_runs_every_explanation_node(report):
    facts = scenario(report, "txt2img_workflow")
    ok(facts["result"])
    outputs = facts["outputs_by_type"]
    for node in ("DiffusionExplainWordHeatmaps", "DiffusionExplainStepPreviews", "DiffusionExplainConceptScores",
                 "DiffusionExplainRise", "DiffusionExplainCam", "DiffusionExplainRecovery", "DiffusionExplainGuidanceMap",
                 "DiffusionExplainConceptOnset"):  # fmt: skip
        assert outputs[node] and outputs[node]["images"], f"{node} showed no preview"
    trace = facts["trace"]
    assert trace["steps"] == 4 and trace["batch"] == 1 and trace["latent_size"] == [4, 4]
    assert trace["words"][:6] == ["a", "photo", "of", "a", "red", "apple"]
    assert trace["attention_shape"] == [4, 1, len(trace["tokens"]), 4, 4]
    assert trace["meta"]["prompt_matches_conditioning"] is True
    assert trace["has_images"] and trace["has_previews"]
    assert facts["final_latent_diff"] == 0.0
    assert facts["heatmap_masks_shape"] == [len(trace["words"]), 32, 32]
    assert facts["heatmap_masks_range"] == [0.0, 1.0]
    assert all(a == a for a in facts["rise_aucs"])  # not NaN: both games were played
    assert facts["rise_mask_shape"] == [1, 32, 32] and facts["cam_mask_shape"] == [1, 32, 32]
    assert facts["cam_mask_max"] > 0, "DF-CAM gave an all-zero map"
    assert facts["x0_previews_shape"] == [3, 32, 32, 3]


def test_the_loaded_model_stays_unpatched(report):
    facts = scenario(report, "txt2img_workflow")
    assert facts["loaded_model_attn2_patches"] == 0
    assert facts["loaded_model_wrappers"] == {}
    assert facts["tapped_model_attn2_patches"] == 7  # every cross-attention block of the tiny UNet


def test_sampler_custom_with_exponential_sigmas(report):
    facts = scenario(report, "sampler_custom_workflow")
    ok(facts["result"])
    assert facts["sigmas_node"] == pytest.approx(facts["sigmas_expected"])
    assert facts["trace"]["sigmas"] == pytest.approx(facts["sigmas_expected"][:-1], rel=1e-5)
    assert facts["trace"]["meta"]["sampler"] == "dpmpp_2m"
    assert facts["final_latent_diff"] == 0.0


@pytest.mark.parametrize("name", ["heun", "dpm_2"])
def test_multi_call_samplers_give_one_record_per_step(report, name):
    facts = scenario(report, name)
    ok(facts["result"])
    trace = facts["trace"]
    assert trace["steps"] == 3
    assert trace["attention_shape"][0] == 3
    assert trace["meta"]["model_calls"] == 5  # two evaluations per step, one for the last
    assert len(trace["sigmas"]) == 3


def test_cfg_one_records_no_negative_branch(report):
    facts = scenario(report, "cfg_one")
    ok(facts["result"])
    assert facts["trace"]["attention_negative_shape"] is None
    assert facts["trace"]["meta"]["guided"] is False
    assert facts["trace"]["attention_shape"][0] == 3


def test_batch_of_two_non_square(report):
    facts = scenario(report, "batch_nonsquare")
    ok(facts["result"])
    trace = facts["trace"]
    assert trace["batch"] == 2 and trace["latent_size"] == [6, 4] and trace["image_size"] == [48, 32]
    assert trace["attention_shape"] == [3, 2, len(trace["tokens"]), 6, 4]
    assert trace["attention_negative_shape"][:2] == [3, 2]
    assert facts["final_latent_diff"] == 0.0


def test_tapped_sampling_equals_untapped(report):
    facts = scenario(report, "same_output_as_untapped")
    ok(facts["result"])
    assert facts["max_abs_diff"] <= 1e-4 * max(facts["scale"], 1.0)


def test_ksampler_advanced_records_its_step_range(report):
    facts = scenario(report, "ksampler_advanced")
    ok(facts["result"])
    assert facts["trace"]["steps"] == 2


def test_sampler_custom_advanced_and_its_denoised_output(report):
    facts = scenario(report, "sampler_custom_advanced")
    ok(facts["result"])
    assert facts["trace"]["steps"] == 3 and facts["final_latent_diff"] == 0.0
    ok(facts["denoised_output_result"])


def test_cached_sampler_never_gives_a_stale_or_empty_trace(report):
    facts = scenario(report, "caching")
    ok(facts["first"]["result"])
    second = ok(facts["second"]["result"])
    assert "6" in second["cached"], "the sampler should have been cached"
    assert facts["second"]["trace"]["sigmas"] == facts["first"]["trace"]["sigmas"]
    evicted = facts["evicted"]["result"]
    assert not evicted["ok"] and "6" in evicted["cached"]
    assert evicted["error"]["node_type"] == "DiffusionExplainSaveTrace"
    assert "re-run" in evicted["error"]["exception_message"]
    ok(facts["reseeded"]["result"])
    assert facts["reseeded_final_latent_diff"] == 0.0
    ok(facts["new_prompt"]["result"])
    assert facts["new_prompt"]["trace"]["words"] == ["a", "green", "triangle"]


def test_runs_never_leak_between_samplers(report):
    facts = scenario(report, "two_runs_one_tap")
    ok(facts["result"])
    assert facts["steps"] == [3, 2]
    assert facts["final_latent_diff"] == [0.0, 0.0]
    untapped = facts["untapped"]
    assert not untapped["ok"] and "was not produced by any run" in untapped["error"]["exception_message"]


def test_another_packs_attn2_replace_is_chained(report):
    facts = scenario(report, "chained_patch")
    assert facts["other_pack_calls"] >= 2  # its function made the block's output at both steps
    assert facts["chained"] == ["input.1.0"]
    assert facts["steps"] == 2
    assert facts["loaded_attn2_patches"] == 0
    assert facts["other_attn2_patches"] == 1 and facts["other_patch_kept"]  # the Tap patched a clone


@pytest.mark.parametrize("family,prediction", [("sdxl", "epsilon"), ("sd2", "v_prediction")])
def test_sdxl_and_sd2_shaped_unets(report, family, prediction):
    facts = scenario(report, "unet_families")[family]
    assert facts["patched"] == facts["blocks"] == 11  # 1 + 2 + 2 (middle) + 1 + 1 + 2 + 2 transformer blocks
    assert facts["steps"] == 3 and facts["attention_shape"] == [3, 2, 77, 6, 4]
    assert facts["attention_negative_shape"] == [3, 2, 77, 6, 4]
    assert facts["prediction_type"] == prediction
    assert facts["max_abs_diff"] <= 1e-4 * max(facts["scale"], 1.0)


def test_probes_follow_a_guidance_patch_like_rescale_cfg(report):
    facts = scenario(report, "custom_guidance")
    assert facts["found"] == ["sampler_cfg_function"]
    assert facts["rescaled"]["hosted"] and not facts["plain"]["hosted"]
    assert "linearly" in facts["rescaled"]["cam_note"] and facts["plain"]["cam_note"] is None  # DF-CAM says what it explains
    hosted, plain = facts["rescaled"]["max_abs_diff"], facts["plain"]["max_abs_diff"]
    assert hosted <= 1e-4 * max(facts["scale"], 1.0), facts  # the sampler's own x0 at that step
    assert plain > 20 * hosted and plain > 1e-3 * facts["scale"], facts  # plain CFG explains another prediction


@pytest.mark.parametrize(
    "patch,key",
    [("pre_cfg", "sampler_pre_cfg_function"), ("calc_cond_batch", "sampler_calc_cond_batch_function"), ("cfg_one_post_cfg", "sampler_post_cfg_function")],
)
def test_probes_apply_the_samplers_branch_patches(report, patch, key):
    facts = scenario(report, "branch_patches")[patch]
    assert facts["found"] == [key]
    assert facts["patched"]["hosted"] and not facts["plain"]["hosted"]
    assert "linearly" in facts["patched"]["cam_note"] and facts["plain"]["cam_note"] is None
    hosted, plain = facts["patched"]["max_abs_diff"], facts["plain"]["max_abs_diff"]
    assert hosted <= 1e-4 * max(facts["scale"], 1.0), facts  # the sampler's own x0 at that step
    assert plain > 20 * hosted and plain > 1e-3 * facts["scale"], facts  # without the patch: another prediction


def test_probe_batches_use_comfyuis_memory_estimate(report):
    facts = scenario(report, "branch_patches")
    for case, branches in ((facts["pre_cfg"]["plain"], 2), (facts["cfg_one_post_cfg"]["patched"], 2), (facts["cfg_one_post_cfg"]["plain"], 1)):
        assert case["comfy_item_bytes"] > 0
        assert case["item_bytes"] == int(case["comfy_item_bytes"] * branches * 1.5) + 1  # with ComfyUI's safety factor


def test_the_pack_runs_under_newer_comfyuis_calling_convention(report):
    """ComfyUI since late October 2025 passes ``latent_shapes`` to OUTER_SAMPLE wrappers (a shim
    in comfyui_scenarios.py makes a125cd84 do so): the example workflows, Heun and
    SamplerCustomAdvanced still run, and the keyword reaches ComfyUI's outer_sample through the
    Tap's wrapper (also for DF-RISE's and DF-CAM's probe runs)."""
    facts = scenario(report, "newer_calling_convention")
    for name in ("txt2img", "sampler_custom", "heun", "custom_advanced"):
        ok(facts[name]["result"])
    assert facts["txt2img"]["trace"]["steps"] == 4 and facts["txt2img"]["trace"]["words"][:2] == ["a", "photo"]
    assert facts["sampler_custom"]["trace"]["meta"]["sampler"] == "dpmpp_2m"
    assert facts["heun"]["trace"]["meta"]["model_calls"] == 5
    assert facts["custom_advanced"]["trace"]["steps"] == 3
    received = facts["latent_shapes_received"]
    # 4 sampling runs, DF-RISE's probe run and DF-CAM's: every one got latent_shapes through the Tap
    assert len(received) >= 6 and all(shapes is not None and len(shapes) == 1 for shapes in received), received
    assert [1, 4, 4, 4] in [shapes[0] for shapes in received]


V1_INTERFACE = json.loads((HERE / "data" / "node_interface_v1.json").read_text())


def _rise_widget_defaults() -> dict:
    """The DF-RISE node's widget defaults follow the project's one set (explain.methods.defaults,
    issue 12), not the V1 nodes': a saved workflow stores its widget values, so a new default
    changes only nodes added from now on."""
    from explain.methods.defaults import RISE

    names = {"n_masks": RISE.n_masks, "similarity": RISE.similarity, "quantity": RISE.quantity, "masks": RISE.masks, "p": RISE.p, "centered": RISE.centered, "mask_seed": RISE.seed}
    return {("DiffusionExplainRise", name): value for name, value in names.items()}


def test_comfyui_registers_the_v3_nodes_and_serves_the_interface_saved_workflows_know(report):
    """What /object_info gives the front end for each V3 node equals what the V1 nodes gave (node
    ids, display names, input names, order, sections, types, choices, defaults, ranges; output
    names and types), so workflows saved before the port load unchanged; every output has a tooltip."""
    facts = scenario(report, "node_schemas")
    assert facts["registered_by_entrypoint"]
    rise_defaults = _rise_widget_defaults()
    for node_id, before in V1_INTERFACE.items():
        now = facts["nodes"][node_id]
        assert now is not None and now["v3"] and now["same_class"], node_id
        assert now["display_name"] == before["display_name"] and now["output_node"] == before["output_node"]
        assert now["outputs"] == before["outputs"], node_id
        assert all(now["output_tooltips"]), node_id
        assert [i["name"] for i in now["inputs"]] == [i["name"] for i in before["inputs"]], node_id
        for was, is_ in zip(before["inputs"], now["inputs"]):
            assert is_["tooltip"], f"{node_id}.{is_['name']} has no tooltip"
            for key in ("section", "type", "options", "default", "min", "max", "step", "multiline"):
                if key in was:
                    expected = rise_defaults.get((node_id, was["name"]), was[key]) if key == "default" else was[key]
                    assert is_.get(key) == expected, f"{node_id}.{was['name']}.{key}: {is_.get(key)!r} != {expected!r}"
        assert set(before["hidden"]) <= set(now["hidden"]), node_id


def test_example_workflows_in_api_format_validate_and_run_and_saved_ones_still_load(report):
    facts = scenario(report, "workflow_files")
    for name, result in facts["api"].items():
        assert result["valid"] and not result["node_errors"], (name, result)
    ok(facts["api_run"]["result"])
    assert facts["api_run"]["trace"]["meta"]["sampler"] == "dpmpp_2m"
    for name, result in facts["saved_v1"].items():
        assert result["valid"] and not result["node_errors"], (name, result)
    assert len(facts["saved_v1"]) == 2
    assert facts["regenerated_equal"] and all(facts["regenerated_equal"].values()), facts["regenerated_equal"]


def test_a_missing_requirement_is_named_at_validation_before_anything_runs(report):
    facts = scenario(report, "missing_requirement")
    flagged = {e["class_type"]: e["messages"] for e in facts["node_errors"].values()}
    explanation = {"DiffusionExplainWordHeatmaps", "DiffusionExplainStepPreviews", "DiffusionExplainConceptScores",
                   "DiffusionExplainRise", "DiffusionExplainCam", "DiffusionExplainRecovery", "DiffusionExplainGuidanceMap",
                   "DiffusionExplainConceptOnset"}  # fmt: skip
    assert set(flagged) == explanation
    for messages in flagged.values():
        assert any("needs matplotlib" in m and "install.py" in m and "-m pip install -r requirements.txt" in m for m in messages), messages
    # the nodes that need nothing missing (Save Trace, SaveImage) stay runnable
    assert "DiffusionExplainSaveTrace" in facts["good_outputs"] and not explanation & set(facts["good_outputs"])


def test_the_guidance_map_node_reads_the_samplers_own_branches(report):
    facts = scenario(report, "guidance_map_node")
    assert facts["overlay_shape"] == [1, 32, 32, 3] and facts["mask_shape"] == [1, 32, 32]
    assert facts["mask_max"] == pytest.approx(1.0)
    assert facts["info"]["against"] == "unconditional" and facts["info"]["cfg"] == 5.0 and "sanity" in facts["info"]
    # the map equals the one read off ComfyUI's own cfg: (guided x0 - cfg-1 x0) / (cfg - 1)
    assert facts["scale"] > 0 and facts["max_diff"] <= 1e-4 * facts["scale"]
    assert "set cfg above 1" in facts["refused"]


def test_the_concept_onset_node_times_each_edited_word_through_the_sampler(report):
    facts = scenario(report, "concept_onset_node")
    assert facts["encode_matches_clip_text_encode"]
    latent = facts["latent"]
    assert latent["labels"] == ["red", "square", "above"] and latent["space"] == "latent"
    assert latent["reference"] == "the sampler's positive conditioning"  # the Tap's prompt re-encodes to CLIPTextEncode's positive
    assert latent["edited_prompts"] == ["a cyan circle above a blue square", "a red circle above a blue triangle", "a red circle below a blue square"]
    assert all(len(e) == 3 and max(e) > 0 for e in latent["effect"])  # every edit changes some step's prediction
    assert all(0 <= o <= p < 3 for o, p in zip(latent["onset_step"], latent["peak_step"]))
    decoded = facts["decoded"]
    assert decoded["labels"] == ["red"] and decoded["space"] == "decoded" and max(decoded["effect"][0]) > 0
    assert facts["plot_shape"][0] == 1 and facts["plot_shape"][-1] == 3
