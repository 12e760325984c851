"""Scenarios the ComfyUI harness runs in one ComfyUI process; each returns JSON-able facts that
test_comfyui_integration.py asserts on. Imported only inside the harness (ComfyUI loaded)."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import torch
from comfyui_harness import CHECKPOINT_NAME, load_workflow, pack_module, workflow_to_prompt

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry"
TEST_OVERRIDES = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT_NAME},
    "EmptyLatentImage": {"width": 32, "height": 32},  # 4×4 latents: VAE decodes dominate the run time
    "KSampler": {"steps": 4},
    "DiffusionExplainRise": {"n_masks": 8, "step": 1},
    "DiffusionExplainCam": {"step": 1},
    "DiffusionExplainGuidanceMap": {"step": 1},
    "DiffusionExplainConceptOnset": {"words": "red, apple"},  # two words keep the test quick
    "DiffusionExplainStepPreviews": {"count": 3},
    "DiffusionExplainExponentialSigmas": {"steps": 4, "lam": 2},
}


def _output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def _trace(path: str):
    from explain.trace import Trace

    return Trace.load(path)


def _trace_facts(path: str) -> dict:
    trace = _trace(path)
    return {
        "path": path,
        "steps": trace.num_steps,
        "batch": trace.batch_size,
        "latent_size": list(trace.latent_size),
        "image_size": list(trace.image_size),
        "tokens": trace.tokens[0],
        "words": [w.text for w in trace.words[0]],
        "negative_words": [w.text for w in trace.negative_words[0]] if trace.negative_words else [],
        "attention_shape": list(trace.attention.shape) if trace.attention is not None else None,
        "attention_negative_shape": list(trace.attention_negative.shape) if trace.attention_negative is not None else None,
        "attention_finite": bool(torch.isfinite(trace.attention).all()) if trace.attention is not None else None,
        "sigmas": trace.sigmas.tolist(),
        "timesteps": trace.timesteps.tolist(),
        "meta": trace.meta,
        "has_images": trace.images is not None,
        "has_previews": trace.x0_previews is not None,
        "layers": sorted(trace.attention_layers),
    }


def _saved(result: dict, node_id: str) -> str | None:
    paths = result.get("outputs", {}).get(str(node_id), {}).get("text", [])
    return str(_output_dir() / paths[0]) if paths else None


def basic_prompt(sampler="euler", steps=3, cfg=5.0, width=32, height=32, batch=1, seed=1, prefix="explain-test/basic") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {
            "class_type": "DiffusionExplainTap",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE},
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0,
            },
        },  # fmt: skip
        "7": {"class_type": "DiffusionExplainSaveTrace", "inputs": {"trace": ["4", 1], "latent": ["6", 0], "filename_prefix": prefix}},
    }


def _run(runner, prompt: dict, save_node: str = "7") -> dict:
    result = runner.run(prompt)
    facts = {"result": result}
    path = _saved(result, save_node) if result["ok"] else None
    if path:
        facts["trace"] = _trace_facts(path)
    return facts


def _latent(runner, node_id: str, slot: int = 0) -> torch.Tensor:
    return runner.cached_output(node_id, slot)["samples"].float().cpu()


def _final_matches(runner, trace_path: str, sampler_node: str) -> float:
    """Largest difference between a trace's final latent and the sampler's LATENT (model space)."""
    trace = _trace(trace_path)
    latent = _latent(runner, sampler_node)
    scale = float(trace.meta["latent_scale_factor"])
    return float((trace.final_latent - latent * scale).abs().max())


def _tapped_run(tap_node, model, clip, unique_id: str, seed: int, steps: int, cfg: float = 5.0):
    """Tap ``model``, sample PROMPT with KSampler (euler, cfg 5 by default, 4×4 latent); return the
    conditionings, the LATENT and the run's trace."""
    import nodes as comfy_nodes

    tapped, handle = tap_node.tap(model, clip=clip, prompt=PROMPT, unique_id=unique_id)
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    (out,) = comfy_nodes.common_ksampler(tapped, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return positive, negative, out, handle


# ---------------------------------------------------------------------------- scenarios
def txt2img_workflow(runner, nodes_module, work) -> dict:
    """The shipped txt2img example, every explanation node, on the tiny checkpoint."""
    workflow = load_workflow("txt2img_explain.json")
    prompt = workflow_to_prompt(nodes_module, workflow, TEST_OVERRIDES)
    result = runner.run(prompt)
    facts = {"result": result, "class_types": {k: v["class_type"] for k, v in prompt.items()}}
    if not result["ok"]:
        return facts
    by_type = {v["class_type"]: k for k, v in prompt.items()}
    facts["outputs_by_type"] = {t: result["outputs"].get(k) for t, k in by_type.items()}
    path = _saved(result, by_type["DiffusionExplainSaveTrace"])
    facts["trace"] = _trace_facts(path)
    facts["final_latent_diff"] = _final_matches(runner, path, by_type["KSampler"])
    heat = runner.cached_output(by_type["DiffusionExplainWordHeatmaps"], 1)
    facts["heatmap_masks_shape"] = list(heat.shape)
    facts["heatmap_masks_range"] = [float(heat.min()), float(heat.max())]
    facts["rise_aucs"] = [runner.cached_output(by_type["DiffusionExplainRise"], 2), runner.cached_output(by_type["DiffusionExplainRise"], 3)]
    facts["rise_mask_shape"] = list(runner.cached_output(by_type["DiffusionExplainRise"], 1).shape)
    cam_mask = runner.cached_output(by_type["DiffusionExplainCam"], 1)
    facts["cam_mask_shape"] = list(cam_mask.shape)
    facts["cam_mask_max"] = float(cam_mask.max())
    facts["x0_previews_shape"] = list(runner.cached_output(by_type["DiffusionExplainStepPreviews"], 0).shape)
    loaded = runner.cached_output(by_type["CheckpointLoaderSimple"], 0)
    options = loaded.model_options.get("transformer_options", {})
    facts["loaded_model_attn2_patches"] = len(options.get("patches_replace", {}).get("attn2", {}))
    facts["loaded_model_wrappers"] = {k: list(v) for k, v in loaded.wrappers.items() if v}
    tapped = runner.cached_output(by_type["DiffusionExplainTap"], 0)
    facts["tapped_model_attn2_patches"] = len(tapped.model_options["transformer_options"]["patches_replace"]["attn2"])
    return facts


def sampler_custom_workflow(runner, nodes_module, work) -> dict:
    """The shipped SamplerCustom + exponential sigmas example."""
    workflow = load_workflow("sampler_custom_exponential_sigmas.json")
    prompt = workflow_to_prompt(nodes_module, workflow, TEST_OVERRIDES)
    result = runner.run(prompt)
    facts = {"result": result}
    if not result["ok"]:
        return facts
    by_type = {v["class_type"]: k for k, v in prompt.items()}
    path = _saved(result, by_type["DiffusionExplainSaveTrace"])
    facts["trace"] = _trace_facts(path)
    sigmas = runner.cached_output(by_type["DiffusionExplainExponentialSigmas"], 0)
    facts["sigmas_node"] = [float(s) for s in sigmas]
    from explain import schedules

    loaded = runner.cached_output(by_type["CheckpointLoaderSimple"], 0)
    ac = 1.0 / (1.0 + loaded.model.model_sampling.sigmas.double() ** 2)
    facts["sigmas_expected"] = [float(s) for s in schedules.exponential_sigmas(4, "early", 2, alphas_cumprod=ac, warn=False)]
    facts["final_latent_diff"] = _final_matches(runner, path, by_type["SamplerCustom"])
    return facts


def heun(runner, nodes_module, work) -> dict:
    return _run(runner, basic_prompt(sampler="heun", steps=3, prefix="explain-test/heun"))


def dpm_2(runner, nodes_module, work) -> dict:
    return _run(runner, basic_prompt(sampler="dpm_2", steps=3, prefix="explain-test/dpm2"))


def cfg_one(runner, nodes_module, work) -> dict:
    return _run(runner, basic_prompt(cfg=1.0, prefix="explain-test/cfg1"))


def batch_nonsquare(runner, nodes_module, work) -> dict:
    facts = _run(runner, basic_prompt(batch=2, width=32, height=48, prefix="explain-test/batch"))
    if facts["result"]["ok"]:
        facts["final_latent_diff"] = _final_matches(runner, facts["trace"]["path"], "6")
    return facts


def same_output_as_untapped(runner, nodes_module, work) -> dict:
    """A tapped and an untapped KSampler with the same seed return the same latent."""
    prompt = basic_prompt(steps=3, prefix="explain-test/same")
    prompt["8"] = copy.deepcopy(prompt["6"])
    prompt["8"]["inputs"]["model"] = ["1", 0]
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "explain-test/untapped"}}
    result = runner.run(prompt)
    facts = {"result": result}
    if result["ok"]:
        tapped, plain = _latent(runner, "6"), _latent(runner, "8")
        facts["max_abs_diff"] = float((tapped - plain).abs().max())
        facts["scale"] = float(plain.abs().max())
    return facts


def ksampler_advanced(runner, nodes_module, work) -> dict:
    """KSamplerAdvanced running steps 1..3 of a 4-step schedule records 2 steps."""
    prompt = basic_prompt(prefix="explain-test/advanced")
    prompt["6"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "start_at_step": 1, "end_at_step": 3, "return_with_leftover_noise": "disable",
        },
    }  # fmt: skip
    return _run(runner, prompt)


def sampler_custom_advanced(runner, nodes_module, work) -> dict:
    prompt = basic_prompt(prefix="explain-test/custom-advanced")
    del prompt["6"]
    prompt.update(
        {
            "10": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.0}},
            "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
            "13": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}},
            "6": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["11", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]},
            },
        }
    )
    facts = _run(runner, prompt)
    if facts["result"]["ok"]:
        facts["final_latent_diff"] = _final_matches(runner, facts["trace"]["path"], "6")
        # the denoised_output of SamplerCustom(Advanced) is accepted too
        prompt["14"] = {
            "class_type": "DiffusionExplainSaveTrace",
            "inputs": {"trace": ["4", 1], "latent": ["6", 1], "filename_prefix": "explain-test/denoised"},
        }
        again = runner.run(prompt)
        facts["denoised_output_result"] = again
    return facts


def caching(runner, nodes_module, work) -> dict:
    """Cached samplers, evicted runs and re-runs: never a stale or empty trace."""
    runs = pack_module("nodes.runs")
    facts = {}
    first = basic_prompt(seed=11, prefix="explain-test/cache-a")
    facts["first"] = _run(runner, first)
    # 1. only the Save node changes: ComfyUI keeps the sampler cached, the held run is found
    second = copy.deepcopy(first)
    second["7"]["inputs"]["filename_prefix"] = "explain-test/cache-b"
    facts["second"] = _run(runner, second)
    # 2. the held runs are gone (restart, eviction) but the sampler is still cached: clear error
    runs.REGISTRY.clear()
    third = copy.deepcopy(first)
    third["7"]["inputs"]["filename_prefix"] = "explain-test/cache-c"
    facts["evicted"] = _run(runner, third)
    # 3. a new seed re-runs the sampler: the trace is the new run's
    fourth = copy.deepcopy(third)
    fourth["6"]["inputs"]["seed"] = 12
    facts["reseeded"] = _run(runner, fourth)
    if facts["reseeded"]["result"]["ok"]:
        facts["reseeded_final_latent_diff"] = _final_matches(runner, facts["reseeded"]["trace"]["path"], "6")
    # 4. the Tap re-executes (new prompt text), the sampler with it: a fresh run, new words
    fifth = copy.deepcopy(fourth)
    fifth["2"]["inputs"]["text"] = fifth["4"]["inputs"]["prompt"] = "a green triangle"
    facts["new_prompt"] = _run(runner, fifth)
    return facts


def two_runs_one_tap(runner, nodes_module, work) -> dict:
    """Two samplers share one tapped model: each explanation gets its own sampler's run, and a
    latent from an untapped sampler gets a clear error."""
    prompt = basic_prompt(seed=21, prefix="explain-test/run-a")
    prompt["8"] = copy.deepcopy(prompt["6"])
    prompt["8"]["inputs"]["seed"] = 22
    prompt["8"]["inputs"]["steps"] = 2
    prompt["9"] = {"class_type": "DiffusionExplainSaveTrace", "inputs": {"trace": ["4", 1], "latent": ["8", 0], "filename_prefix": "explain-test/run-b"}}
    result = runner.run(prompt)
    facts = {"result": result}
    if result["ok"]:
        a, b = _saved(result, "7"), _saved(result, "9")
        facts["steps"] = [_trace(a).num_steps, _trace(b).num_steps]
        facts["final_latent_diff"] = [_final_matches(runner, a, "6"), _final_matches(runner, b, "8")]
    untapped = basic_prompt(seed=23, prefix="explain-test/untapped")
    untapped["6"]["inputs"]["model"] = ["1", 0]
    facts["untapped"] = runner.run(untapped)
    return facts


def chained_patch(runner, nodes_module, work) -> dict:
    """Another pack's attn2 replace stays in charge of the output; the Tap chains to it."""
    import comfy.sample
    import comfy.samplers
    import latent_preview  # noqa: F401
    import nodes as comfy_nodes

    taps = pack_module("nodes.taps")
    tap_node = pack_module("nodes.tap_node")
    runs = pack_module("nodes.runs")
    calls = {"n": 0}
    with torch.inference_mode():
        model, clip, _vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]

        def other_pack(q, k, v, extra_options):
            from comfy.ldm.modules.attention import optimized_attention

            calls["n"] += 1
            return optimized_attention(q, k, v, extra_options["n_heads"])

        other = model.clone()
        other.set_model_attn2_replace(other_pack, "input", 1, 0)
        _positive, _negative, out, handle = _tapped_run(tap_node, other, clip, "chain", seed=3, steps=2)
        trace = handle.resolve(out)
    return {
        "other_pack_calls": calls["n"],
        "steps": trace.num_steps,
        "chained": trace.meta.get("chained_attention_patches"),
        "loaded_attn2_patches": len(model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})),
        "other_attn2_patches": len(other.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})),
        "other_patch_kept": other.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)] is other_pack,
        "registry_runs": len(runs.REGISTRY),
        "taps_module": taps.__name__,
    }


def _probe_against_sampler(patched, plain, clip, unique_id: str, cfg: float = 5.0) -> dict:
    """Sample with ``patched`` (tapped) at ``cfg``; at step 1, the unmasked DF-RISE probe of ``patched`` and
    of ``plain`` against the sampler's own x0 there, the probes' item estimate against ComfyUI's
    memory_required, and DF-CAM's note for each."""
    import latent_preview  # noqa: F401

    from explain.denoiser import NoiseLevel

    explain_nodes = pack_module("nodes.explain_nodes")
    comfy_denoiser = importlib.import_module(".comfy_denoiser", explain_nodes.__package__)  # loaded on first use
    tap_node = pack_module("nodes.tap_node")
    positive, negative, out, handle = _tapped_run(tap_node, patched, clip, unique_id, seed=5, steps=3, cfg=cfg)
    trace = handle.resolve(out)
    step = 1
    level = NoiseLevel.from_trace(trace, step)
    recorded = trace.x0[step].float()
    x = trace.x_t[step].float()

    def probe(denoiser):
        return denoiser.predict(x, level, "x0").cpu(), denoiser.guide_fn is not None, denoiser.item_bytes(x[:1])

    facts = {"scale": float(recorded.abs().max()), "found": comfy_denoiser.custom_guidance(patched.model_options)}
    for name, m in (("patched", patched), ("plain", plain)):
        x0, hosted, item_bytes = comfy_denoiser.run_with_denoiser(m, positive, negative, trace, step, cfg, probe)
        cam_json = explain_nodes.ExplainCam.execute(handle, out, m, positive, negative, step, "paper", "sum", "epsilon", 0.0, 0).result[2]
        facts[name] = {
            "max_abs_diff": float((x0 - recorded).abs().max()), "hosted": hosted, "cam_note": json.loads(cam_json).get("note"),
            "item_bytes": item_bytes, "comfy_item_bytes": m.model.memory_required([1, *x.shape[1:]]),
        }  # fmt: skip
    return facts


def custom_guidance(runner, nodes_module, work) -> dict:
    """A RescaleCFG-patched model: DF-RISE's probes go through ComfyUI's cfg_function, so the
    unmasked probe at a step reproduces the sampler's own x0 there; plain CFG would not."""
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import RescaleCFG

    with torch.inference_mode():
        model, clip, _vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        facts = _probe_against_sampler(RescaleCFG().patch(model, 1.0)[0], model, clip, "rescale")
    return {"rescaled": facts["patched"], "plain": facts["plain"], "scale": facts["scale"], "found": facts["found"]}


def guidance_map_node(runner, nodes_module, work) -> dict:
    """The Guidance Map node after a tapped KSampler run, and the same map checked through
    ComfyUI's own cfg path: at cfg w the guided x0 minus the cfg-1 (conditional only) x0 is
    (w - 1) × (conditional - unconditional)."""
    import nodes as comfy_nodes

    from explain.denoiser import NoiseLevel
    from explain.methods.guidance import difference_map, guidance_map

    explain_nodes = pack_module("nodes.explain_nodes")
    comfy_denoiser = importlib.import_module(".comfy_denoiser", explain_nodes.__package__)
    tap_node = pack_module("nodes.tap_node")
    cfg, step = 5.0, 1
    with torch.inference_mode():
        model, clip, _vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        positive, negative, out, handle = _tapped_run(tap_node, model, clip, "guidance-map", seed=3, steps=3, cfg=cfg)
        overlay, mask, text = explain_nodes.ExplainGuidanceMap.execute(handle, out, model, positive, negative, step, 0.0, 0).result
        trace = handle.resolve(out)
        level = NoiseLevel.from_trace(trace, step)
        x = trace.x_t[step, :1].float()
        mapped = comfy_denoiser.run_with_denoiser(model, positive, negative, trace, step, cfg, lambda d: guidance_map(d, trace, step).latent)
        guided = comfy_denoiser.run_with_denoiser(model, positive, negative, trace, step, cfg, lambda d: d.predict(x, level, "x0").cpu())
        cond = comfy_denoiser.run_with_denoiser(model, positive, negative, trace, step, 1.0, lambda d: d.predict(x, level, "x0").cpu())
        explicit = difference_map(guided, cond) / (cfg - 1.0)
        try:
            explain_nodes.ExplainGuidanceMap.execute(handle, out, model, positive, negative, step, 1.0, 0)
            refused = None
        except ValueError as exc:
            refused = str(exc)
    return {
        "overlay_shape": list(overlay.shape), "mask_shape": list(mask.shape), "mask_max": float(mask.max()), "info": json.loads(text),
        "max_diff": float((mapped - explicit).abs().max()), "scale": float(explicit.abs().max()), "refused": refused,
    }  # fmt: skip


def concept_onset_node(runner, nodes_module, work) -> dict:
    """The Concept Onset node after a tapped KSampler run: the edited prompts re-encoded like
    CLIPTextEncode, each word's effect per step, in the latent and decoded with the VAE."""
    import nodes as comfy_nodes

    explain_nodes = pack_module("nodes.explain_nodes")
    tap_node = pack_module("nodes.tap_node")
    with torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        positive, negative, out, handle = _tapped_run(tap_node, model, clip, "concept-onset", seed=4, steps=3)
        latent_json = explain_nodes.ExplainConceptOnset.execute(handle, out, model, positive, negative, clip, "red, square, above", 0.0, 0).result[1]
        plot, decoded_json = explain_nodes.ExplainConceptOnset.execute(handle, out, model, positive, negative, clip, "red", 0.0, 0, vae).result
        ours = explain_nodes.encode_like(clip, "a cyan circle above a blue square", positive)
        stock = comfy_nodes.CLIPTextEncode().encode(clip, "a cyan circle above a blue square")[0]
    return {
        "latent": json.loads(latent_json), "decoded": json.loads(decoded_json), "plot_shape": list(plot.shape),
        "encode_matches_clip_text_encode": bool(torch.equal(ours[0][0], stock[0][0])),
    }


def branch_patches(runner, nodes_module, work) -> dict:
    """Patches that act before cfg_function in ComfyUI's sampling_function: a pre-CFG function
    (as APG, TCFG) and a calc_cond_batch replacement (as SkipLayerGuidance); and a post-CFG one
    that keeps both branches at cfg 1 (as SAG). The probes apply them as the sampler did."""
    import comfy.samplers
    import nodes as comfy_nodes

    def uncond_towards_input(args):
        cond, uncond = args["conds_out"][:2]
        return [cond, 0.5 * (uncond + args["input"])] + list(args["conds_out"][2:])

    def damped_input(args):
        x = args["input"] * 0.8
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], x, args["sigma"], args["model_options"])

    def away_from_uncond(args):
        return args["denoised"] + 0.5 * (args["cond_denoised"] - args["uncond_denoised"])

    facts = {}
    with torch.inference_mode():
        model, clip, _vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        pre_cfg = model.clone()
        pre_cfg.set_model_sampler_pre_cfg_function(uncond_towards_input)
        replaced = model.clone()
        replaced.set_model_sampler_calc_cond_batch_function(damped_input)
        post_cfg = model.clone()
        post_cfg.set_model_sampler_post_cfg_function(away_from_uncond, disable_cfg1_optimization=True)
        for name, patched, cfg in (("pre_cfg", pre_cfg, 5.0), ("calc_cond_batch", replaced, 5.0), ("cfg_one_post_cfg", post_cfg, 1.0)):
            facts[name] = _probe_against_sampler(patched, model, clip, name, cfg)
    return facts


def unet_families(runner, nodes_module, work) -> dict:
    """SDXL- and SD2.x-shaped UNets (ComfyUI's own model classes at a tiny width; SD2 as
    v-prediction): the Tap patches every block, records batch 2 non-square runs, and sampling
    equals the untapped model's."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    import nodes as comfy_nodes
    from comfyui_harness import _randomize

    tap_node = pack_module("nodes.tap_node")
    taps = pack_module("nodes.taps")
    base = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 2], "transformer_depth_output": [1, 1, 2, 2], "transformer_depth_middle": 2,
        "use_linear_in_transformer": True, "use_temporal_resblock": False, "use_temporal_attention": False,
    }  # fmt: skip
    cases = {
        "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL, {"context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential"}, 2048, "EPS"),
        "sd2": (comfy.supported_models.SD20, comfy.model_base.BaseModel, {"context_dim": 1024, "adm_in_channels": None}, 1024, "V_PREDICTION"),
    }
    facts = {}
    gen = torch.Generator().manual_seed(0)
    for name, (config_class, model_class, extra, context, kind) in cases.items():
        with torch.inference_mode():
            config = config_class({**base, **extra})
            model = model_class(config, model_type=getattr(comfy.model_base.ModelType, kind), device=torch.device("cpu"))
            _randomize(model.diffusion_model, gen)
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
            extras = {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 32, "height": 48} if name == "sdxl" else {}
            positive = [[torch.randn(1, 77, context, generator=gen), dict(extras)]]
            negative = [[torch.randn(1, 77, context, generator=gen), dict(extras)]]
            latent = {"samples": torch.zeros(2, 4, 6, 4)}
            tapped, handle = tap_node.tap(patcher, unique_id=name)
            (out,) = comfy_nodes.common_ksampler(tapped, 7, 3, 4.0, "euler", "normal", positive, negative, latent)
            (plain,) = comfy_nodes.common_ksampler(patcher, 7, 3, 4.0, "euler", "normal", positive, negative, latent)
            trace = handle.resolve(out)
        facts[name] = {
            "blocks": len(taps.cross_attention_blocks(model.diffusion_model)),
            "patched": len(tapped.model_options["transformer_options"]["patches_replace"]["attn2"]),
            "steps": trace.num_steps,
            "attention_shape": list(trace.attention.shape),
            "attention_negative_shape": list(trace.attention_negative.shape),
            "prediction_type": trace.meta["prediction_type"],
            "model": trace.meta["model"],
            "max_abs_diff": float((out["samples"] - plain["samples"]).abs().max()),
            "scale": float(plain["samples"].abs().max()),
        }
    return facts


# ---------------------------------------------------------------------------- newer ComfyUI
class NewerCallingConvention:
    """TEST SHIM (not ComfyUI code): makes the checkout under test call OUTER_SAMPLE wrappers
    the way ComfyUI does since late October 2025, where ``CFGGuider.sample`` passes an extra
    keyword, ``latent_shapes=[latent.shape]``, and ``CFGGuider.outer_sample`` takes it (packs
    with a fixed wrapper signature then fail with "unexpected keyword argument 'latent_shapes'",
    ComfyUI issue #10562). The only full checkout we can fetch (a125cd84) predates the change.

    Inside the ``with`` block the first executor of an OUTER_SAMPLE chain gets the keyword, and
    ``outer_sample`` records what reached it, so a wrapper that drops the keyword is caught too."""

    def __init__(self):
        self.received: list = []  # latent_shapes as each outer_sample call got it

    def __enter__(self):
        import comfy.patcher_extension
        import comfy.samplers

        self._executor = comfy.patcher_extension.WrapperExecutor
        self._guider = comfy.samplers.CFGGuider
        self._execute, self._outer = self._executor.execute, self._guider.outer_sample
        shim, original_outer, original_execute = self, self._outer, self._execute

        def outer_sample(guider, *args, latent_shapes=None, **kwargs):
            shim.received.append(None if latent_shapes is None else [list(s) for s in latent_shapes])
            return original_outer(guider, *args, **kwargs)

        def execute(executor, *args, **kwargs):
            starts_outer_sample = executor.idx == 0 and getattr(executor.original, "__func__", None) is outer_sample
            if starts_outer_sample and "latent_shapes" not in kwargs:
                latent_image = args[1] if len(args) > 1 else kwargs["latent_image"]
                kwargs["latent_shapes"] = [latent_image.shape]
            return original_execute(executor, *args, **kwargs)

        self._guider.outer_sample = outer_sample
        self._executor.execute = execute
        return self

    def __exit__(self, *exc):
        self._guider.outer_sample = self._outer
        self._executor.execute = self._execute
        return False


def newer_calling_convention(runner, nodes_module, work) -> dict:
    """The example workflows and more samplers under newer ComfyUI's OUTER_SAMPLE calling
    convention (the shim above); new seeds so that nothing comes from the cache."""
    facts = {}
    overrides = {**TEST_OVERRIDES, "KSampler": {"steps": 4, "seed": 1234}, "SamplerCustom": {"noise_seed": 1234}}
    with NewerCallingConvention() as shim:
        for name, file in (("txt2img", "txt2img_explain.json"), ("sampler_custom", "sampler_custom_exponential_sigmas.json")):
            prompt = workflow_to_prompt(nodes_module, load_workflow(file), overrides)
            result = runner.run(prompt)
            facts[name] = {"result": result}
            if result["ok"]:
                by_type = {v["class_type"]: k for k, v in prompt.items()}
                facts[name]["trace"] = _trace_facts(_saved(result, by_type["DiffusionExplainSaveTrace"]))
        facts["heun"] = _run(runner, basic_prompt(sampler="heun", seed=1235, prefix="explain-test/newer-heun"))
        advanced = basic_prompt(seed=1236, prefix="explain-test/newer-advanced")
        advanced["6"] = {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {"noise": ["11", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]},
        }
        advanced.update(
            {
                "10": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.0}},
                "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1236}},
                "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
                "13": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}},
            }
        )
        facts["custom_advanced"] = _run(runner, advanced)
    facts["latent_shapes_received"] = shim.received
    return facts


# ---------------------------------------------------------------------------- V3 schemas, workflow files
def _v1_view(cls) -> dict:
    """A node as ComfyUI's /object_info serves it (its V1 view), for a V3 or a V1 class."""
    info = cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else None
    if info is None:
        return {"v3": False}
    inputs = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            kind, options = info["input"][section][name][0], dict(info["input"][section][name][1])
            inputs.append({"name": name, "section": section, "type": "COMBO" if isinstance(kind, list) else str(kind), **options})
    return {
        "v3": True,
        "display_name": info["display_name"],
        "description": info["description"],
        "inputs": inputs,
        "hidden": sorted(str(v[0]) for v in info["input"].get("hidden", {}).values()),
        "outputs": [{"name": n, "type": str(t)} for n, t in zip(info["output_name"], info["output"])],
        "output_tooltips": list(info["output_tooltips"]),
        "output_node": bool(info["output_node"]),
    }


def node_schemas(runner, nodes_module, work) -> dict:
    """Every node of the pack as ComfyUI registered it (through comfy_entrypoint) and serves it."""
    from comfy_api.internal import _ComfyNodeInternal

    pack = pack_module("nodes.pack")
    facts = {"nodes": {}, "registered_by_entrypoint": all(issubclass(c, _ComfyNodeInternal) for c in pack.NODES)}
    for node_id in pack.NODES_BY_ID:
        cls = nodes_module.NODE_CLASS_MAPPINGS.get(node_id)
        facts["nodes"][node_id] = None if cls is None else {**_v1_view(cls), "same_class": cls is pack.NODES_BY_ID[node_id]}
    return facts


def _api_prompt(name: str, overrides: dict) -> dict:
    prompt = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "api" / name).read_text())
    for entry in prompt.values():
        entry["inputs"].update(overrides.get(entry["class_type"], {}))
    return prompt


async def _validate(prompt: dict):
    import execution

    return await execution.validate_prompt("validate-only", copy.deepcopy(prompt), None)


def workflow_files(runner, nodes_module, work) -> dict:
    """The example workflows in API format (what /prompt takes) validate and run; both formats
    regenerated here, with ComfyUI's own V3 API, equal the shipped files; the workflows saved
    with the pack's V1 nodes still map onto its nodes and validate."""
    import asyncio
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    facts = {"api": {}, "saved_v1": {}}
    overrides = {**TEST_OVERRIDES, "KSampler": {"steps": 4, "seed": 77}, "SamplerCustom": {"noise_seed": 77}}
    for name in ("txt2img_explain.json", "sampler_custom_exponential_sigmas.json"):
        valid = asyncio.run(_validate(_api_prompt(name, overrides)))
        facts["api"][name] = {"valid": bool(valid[0]), "error": valid[1], "node_errors": _jsonable_errors(valid[3])}
    facts["api_run"] = _run(runner, _api_prompt("sampler_custom_exponential_sigmas.json", overrides), save_node=_save_node(_api_prompt("sampler_custom_exponential_sigmas.json", {})))
    for path in sorted((repo / "tests" / "nodes" / "data" / "saved_workflows").glob("*.json")):
        prompt = workflow_to_prompt(nodes_module, json.loads(path.read_text()), TEST_OVERRIDES)
        valid = asyncio.run(_validate(prompt))
        facts["saved_v1"][path.name] = {"valid": bool(valid[0]), "error": valid[1], "node_errors": _jsonable_errors(valid[3])}
    spec = importlib.util.spec_from_file_location("make_example_workflows_in_comfyui", repo / "scripts" / "make_example_workflows.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.PACK_NODES = pack_module("nodes.pack").NODES_BY_ID
    facts["regenerated_equal"] = {str(rel): json.loads((repo / rel).read_text()) == content for rel, content in maker.outputs().items()}
    return facts


def _save_node(prompt: dict) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == "DiffusionExplainSaveTrace")


def _jsonable_errors(node_errors) -> dict:
    out = {}
    for node_id, entry in (node_errors or {}).items():
        out[str(node_id)] = {
            "class_type": entry.get("class_type"),
            "messages": [f"{e.get('message')}: {e.get('details')}" for e in entry.get("errors", [])],
        }
    return out


def missing_requirement(runner, nodes_module, work) -> dict:
    """A pack installed without its requirements (matplotlib missing, simulated): prompt validation
    flags the nodes that need it, with the install command, before anything runs."""
    import asyncio

    environment = pack_module("nodes.environment")
    real = environment.module_available
    environment.module_available = lambda module: False if module.split(".")[0] == "matplotlib" else real(module)
    try:
        prompt = _api_prompt("txt2img_explain.json", {**TEST_OVERRIDES, "KSampler": {"steps": 4, "seed": 99}})
        valid = asyncio.run(_validate(prompt))
    finally:
        environment.module_available = real
    return {
        "valid": bool(valid[0]),
        "good_outputs": sorted(prompt[o]["class_type"] for o in valid[2]),
        "node_errors": _jsonable_errors(valid[3]),
    }


SCENARIOS = {
    "txt2img_workflow": txt2img_workflow,
    "sampler_custom_workflow": sampler_custom_workflow,
    "heun": heun,
    "dpm_2": dpm_2,
    "cfg_one": cfg_one,
    "batch_nonsquare": batch_nonsquare,
    "same_output_as_untapped": same_output_as_untapped,
    "ksampler_advanced": ksampler_advanced,
    "sampler_custom_advanced": sampler_custom_advanced,
    "caching": caching,
    "two_runs_one_tap": two_runs_one_tap,
    "chained_patch": chained_patch,
    "unet_families": unet_families,
    "custom_guidance": custom_guidance,
    "branch_patches": branch_patches,
    "guidance_map_node": guidance_map_node,
    "concept_onset_node": concept_onset_node,
    "newer_calling_convention": newer_calling_convention,
    "node_schemas": node_schemas,
    "workflow_files": workflow_files,
    "missing_requirement": missing_requirement,
}
