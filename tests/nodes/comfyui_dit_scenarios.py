"""Joint-attention (DiT) scenarios for the ComfyUI harness: tiny SD3 / SD3.5 / Flux / Chroma
models (``comfyui_dit_models``) through ComfyUI's validation and PromptExecutor. Imported only
inside the harness (ComfyUI loaded); test_comfyui_dit.py asserts on what they report.

The reference maps here are computed independently of the pack: a test-only "speed pack"
override (`SpeedPackOverride`) sits on the model *before* the Tap, counts its calls, keeps the q
and k every joint attention gets, and returns ComfyUI's own function's output; the reference is
the explicit float64 softmax over the full joint key set of those q and k, image rows × text
columns, each row renormalised over the text, heads and blocks averaged."""

from __future__ import annotations

from pathlib import Path

import torch
from comfyui_harness import pack_module

import comfyui_dit_models as dit_models

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry"
FAMILIES = ("sd3", "sd35", "flux-schnell", "flux-dev", "chroma")
FULL_GRAPH = FAMILIES  # every explanation node on every family
LATENT = (48, 32)  # pixels (height, width): a 6×4 latent, a 3×2 token grid (non-square on purpose)
STEPS = 3


# ---------------------------------------------------------------------------- a test-only speed pack
class SpeedPackOverride:
    """TEST DOUBLE of a Sage/Flash-attention pack: an ``optimized_attention_override`` that counts
    its calls, keeps copies of the q and k of every call (with the call's layout facts) and returns
    ComfyUI's own function's output, like a speed pack that picked the same kernel."""

    def __init__(self):
        self.calls = 0
        self.records: list[dict] = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        options = kwargs.get("transformer_options") or {}
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        self.records.append(
            {
                "q": args[0].detach().double().cpu().clone(), "k": args[1].detach().double().cpu().clone(),
                "heads": int(heads), "skip_reshape": bool(kwargs.get("skip_reshape", False)),
                "cond_or_uncond": list(options.get("cond_or_uncond") or [0]),
                # called through another override (the Tap's) or as the model's own
                "behind": options.get("optimized_attention_override") is not self,
            }
        )  # fmt: skip
        return func(*args, **kwargs)


SPEED_PACKS: dict[str, SpeedPackOverride] = {}


class SpeedPackNode:
    """TEST NODE: MODEL in, a clone with a `SpeedPackOverride` (kept under ``tag``) out."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "speed"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag):
        override = SPEED_PACKS[tag] = SpeedPackOverride()
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        return (patched,)


def register(nodes_module) -> None:
    dit_models.register(nodes_module)
    nodes_module.NODE_CLASS_MAPPINGS["ExplainTestSpeedPack"] = SpeedPackNode
    nodes_module.NODE_DISPLAY_NAME_MAPPINGS["ExplainTestSpeedPack"] = "TEST: speed-pack attention override"


# ---------------------------------------------------------------------------- reference maps
def reference_maps(records: list[dict], latent: tuple[int, int], blocks: int, calls: int, patch: int = 2) -> dict:
    """Per model call and branch, the mean over the ``blocks`` joint blocks of the head-averaged,
    text-renormalised image × text slice of softmax(q kᵀ/√d) over all S keys, at the token grid,
    for the first ``calls`` model calls of each branch: ``{branch: [B, T, gh, gw] per call}``. A
    joint call is one whose S exceeds the image tokens; its text is what is left ([text, image]
    order, as in ComfyUI's SD3 / Flux / Chroma blocks)."""
    gh, gw = -(-latent[0] // patch), -(-latent[1] // patch)
    n = gh * gw
    model_calls: list[dict] = []
    for rec in records:
        q, k = rec["q"], rec["k"]
        if not rec["skip_reshape"]:
            b, s, inner = q.shape
            q = q.view(b, s, rec["heads"], inner // rec["heads"]).transpose(1, 2)
            k = k.view(b, s, rec["heads"], inner // rec["heads"]).transpose(1, 2)
        s = q.shape[2]
        if s <= n:
            continue  # SD3.5's image-only self-attention
        t = s - n
        probs = torch.softmax((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, S, S] over the joint keys
        part = probs[:, :, t : t + n, :t]
        part = part / part.sum(-1, keepdim=True)
        maps = part.mean(1).transpose(1, 2).reshape(q.shape[0], t, gh, gw)  # [B, T, gh, gw]
        if not model_calls or len(model_calls[-1]["maps"]) == blocks:
            model_calls.append({"key": tuple(rec["cond_or_uncond"]), "maps": []})
        model_calls[-1]["maps"].append(maps)
    out: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for call in model_calls:
        mean = torch.stack(call["maps"]).mean(0)
        per = mean.shape[0] // len(call["key"])
        for i, branch in enumerate(call["key"]):
            if len(out[branch]) < calls:
                out[branch].append(mean[i * per : (i + 1) * per])
    return out


def joint_blocks(model) -> int:
    dm = model.model.diffusion_model
    return len(getattr(dm, "joint_blocks", [])) + len(getattr(dm, "double_blocks", [])) + len(getattr(dm, "single_blocks", []))


# ---------------------------------------------------------------------------- prompts
def node(nodes_module, class_type: str, **inputs) -> dict:
    """An API-prompt node with every widget ``inputs`` does not name at its default."""
    spec = nodes_module.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    full = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if name in inputs:
                full[name] = inputs[name]
            elif isinstance(entry[0], (list, tuple)):
                full[name] = options.get("default", entry[0][0])
            elif "default" in options and section == "required":
                full[name] = options["default"]
    return {"class_type": class_type, "inputs": full}


def dit_prompt(nodes_module, family: str, seed: int = 1, explain: bool = False, speed_pack: str | None = None, prefix: str = "explain-test/dit") -> dict:
    """Tiny ``family`` model → (test speed pack) → Tap → KSampler, and an untapped KSampler with
    the same seed; with ``explain`` every explanation node on the tapped run."""
    flux_dev = family == "flux-dev"
    cfg = 1.0 if flux_dev else 3.0  # guidance-distilled Flux dev runs at cfg 1 with a FluxGuidance
    n = lambda class_type, **kw: node(nodes_module, class_type, **kw)  # noqa: E731
    prompt = {
        "1": n("ExplainTestTinyDiT", family=family, with_t5=True),
        "2": n("CLIPTextEncode", text=PROMPT, clip=["1", 1]),
        "3": n("CLIPTextEncode", text=NEGATIVE, clip=["1", 1]),
        "5": n("EmptySD3LatentImage", width=LATENT[1], height=LATENT[0], batch_size=1),
    }
    model = ["1", 0]
    if speed_pack:
        prompt["20"] = n("ExplainTestSpeedPack", model=model, tag=speed_pack)
        model = ["20", 0]
    positive = ["2", 0]
    if flux_dev:
        prompt["21"] = n("FluxGuidance", conditioning=positive, guidance=3.5)
        positive = ["21", 0]
    prompt["4"] = n(
        "DiffusionExplainTap", model=model, clip=["1", 1], prompt=PROMPT, negative_prompt=NEGATIVE, record_negative=True, per_resolution_maps=True
    )
    sampler = dict(seed=seed, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="simple", positive=positive, negative=["3", 0], latent_image=["5", 0], denoise=1.0)
    prompt["6"] = n("KSampler", model=["4", 0], **sampler)
    prompt["14"] = n("KSampler", model=model, **sampler)  # untapped (but with the speed pack, if any)
    prompt["16"] = n("SaveLatent", samples=["14", 0], filename_prefix=f"{prefix}-untapped")
    prompt["7"] = n("DiffusionExplainSaveTrace", trace=["4", 1], latent=["6", 0], filename_prefix=f"{prefix}-{family}")
    if explain:
        t, lat = ["4", 1], ["6", 0]
        prompt.update(
            {
                "8": n("DiffusionExplainWordHeatmaps", trace=t, latent=lat, words="", steps="", item=0, negative=False),
                "9": n("DiffusionExplainStepPreviews", trace=t, latent=lat, vae=["1", 2], steps="", count=3, item=0),
                "10": n("DiffusionExplainConceptScores", trace=t, latent=lat, words="", steps="", item=0, negative=False),
                "11": n("DiffusionExplainRise", trace=t, latent=lat, model=["4", 0], positive=positive, negative=["3", 0], step=1, n_masks=8),
                "12": n("DiffusionExplainCam", trace=t, latent=lat, model=["4", 0], positive=positive, negative=["3", 0], step=1),
                "13": n("DiffusionExplainRecovery", trace=t, latent=lat, count=3, item=0, vae=["1", 2]),
                "15": n("VAEDecode", samples=["6", 0], vae=["1", 2]),
            }
        )
        prompt["18"] = n("DiffusionExplainConceptOnset", trace=t, latent=lat, model=["4", 0], positive=positive, negative=["3", 0], clip=["1", 1], words="red, square", vae=["1", 2])
        if cfg > 1:  # the guidance map compares the two branches: a cfg-1 graph has one
            prompt["17"] = n("DiffusionExplainGuidanceMap", trace=t, latent=lat, model=["4", 0], positive=positive, negative=["3", 0], step=1)
    return prompt


def _saved_trace(result: dict, node_id: str):
    import folder_paths

    from explain.trace import Trace

    paths = result.get("outputs", {}).get(str(node_id), {}).get("text", [])
    return (Trace.load(str(Path(folder_paths.get_output_directory()) / paths[0])), paths[0]) if paths else (None, None)


def _trace_facts(trace) -> dict:
    return {
        "steps": trace.num_steps,
        "batch": trace.batch_size,
        "latent_size": list(trace.latent_size),
        "image_size": list(trace.image_size),
        "tokens": trace.tokens[0],
        "words": [[w.text, w.token_indices] for w in trace.words[0]],
        "negative_words": [w.text for w in trace.negative_words[0]] if trace.negative_words else [],
        "attention_shape": list(trace.attention.shape),
        "attention_negative_shape": list(trace.attention_negative.shape) if trace.attention_negative is not None else None,
        "layers": {k: list(v.shape) for k, v in trace.attention_layers.items()},
        "row_sums": [float(trace.attention.sum(2).min()), float(trace.attention.sum(2).max())],
        "sigmas": trace.sigmas.tolist(),
        "meta": trace.meta,
    }


# ---------------------------------------------------------------------------- scenarios
def _supported() -> bool:
    return pack_module("nodes.joint_taps").override_supported()


def _family_run(runner, nodes_module, family: str, seed: int, explain: bool, tag: str) -> dict:
    prompt = dit_prompt(nodes_module, family, seed=seed, explain=explain, speed_pack=tag, prefix=f"explain-test/{tag}")
    result = runner.run(prompt)
    facts: dict = {"result": result}
    if not result["ok"]:
        return facts
    saved, path = _saved_trace(result, "7")
    trace = runner.cached_output("4", 1).resolve(runner.cached_output("6"))  # in memory, float32 (the file keeps float16 maps)
    facts["trace"] = _trace_facts(trace)
    facts["saved_attention_max_abs_diff"] = float((saved.attention - trace.attention).abs().max())
    tapped, plain = runner.cached_output("6")["samples"].float(), runner.cached_output("14")["samples"].float()
    facts["bit_identical"] = bool(torch.equal(tapped, plain))
    facts["max_abs_diff"] = float((tapped - plain).abs().max())
    pack = SPEED_PACKS[tag]
    facts["speed_pack_calls"] = pack.calls
    facts["speed_pack_calls_behind_the_tap"] = sum(r["behind"] for r in pack.records)
    # the tapped sampling is the first run through the Tap (DF-RISE / DF-CAM probe later)
    reference = reference_maps([r for r in pack.records if r["behind"]], trace.latent_size, joint_blocks(runner.cached_output("1", 0)), STEPS)
    grid_key = next(iter(trace.attention_layers))
    recorded = trace.attention_layers[grid_key]  # [S, B, T_kept, gh, gw], the mean over blocks at the token grid
    diffs = {}
    for branch, recorded_branch, kept_key in ((0, recorded, "text_positions"), (1, trace.attention_negative, "negative_text_positions")):
        ref = reference.get(branch) or []
        facts[f"reference_calls_{branch}"] = len(ref)
        if not ref or recorded_branch is None:
            continue
        ref = torch.stack(ref)[:, :, trace.meta[kept_key]]
        if branch == 1:  # the negative branch is kept at the latent grid: resize the reference as maps are resized
            s, b, t = ref.shape[:3]
            ref = torch.nn.functional.interpolate(ref.flatten(0, 1), size=trace.latent_size, mode="bilinear", align_corners=False).view(s, b, t, *trace.latent_size)
        same = ref.shape == recorded_branch.shape
        diffs[branch] = float((recorded_branch.double() - ref.double()).abs().max()) if same else f"shapes {list(ref.shape)} vs {list(recorded_branch.shape)}"
    facts["reference_max_abs_diff"] = diffs
    resized = torch.nn.functional.interpolate(recorded.flatten(0, 1), size=trace.latent_size, mode="bilinear", align_corners=False)
    facts["latent_grid_max_abs_diff"] = float((resized.view_as(trace.attention) - trace.attention).abs().max())
    loaded = runner.cached_output("1", 0)
    options = loaded.model_options.get("transformer_options", {})
    facts["loaded_model_untouched"] = "optimized_attention_override" not in options and not options.get("patches_replace")
    with_pack = runner.cached_output("20", 0)
    facts["speed_pack_model_kept"] = with_pack.model_options["transformer_options"]["optimized_attention_override"] is pack
    tapped_model = runner.cached_output("4", 0)
    tapped_options = tapped_model.model_options["transformer_options"]
    facts["tapped_override"] = type(tapped_options["optimized_attention_override"]).__name__
    facts["tapped_chains_to_speed_pack"] = getattr(tapped_options["optimized_attention_override"], "previous", None) is pack
    facts["dit_wrappers"] = sorted(f"{k[0]} {k[1]}" for k in tapped_options.get("patches_replace", {}).get("dit", {}))
    if explain:
        by_id = result["outputs"]
        facts["previews"] = {k: bool(by_id.get(k, {}).get("images")) for k in ("8", "9", "10", "11", "12", "13", "17", "18") if k in prompt}
        import json as _json

        facts["onset_json"] = _json.loads(runner.cached_output("18", 1))
        if "17" in prompt:
            import json

            guidance_mask = runner.cached_output("17", 1)
            facts["guidance_mask_shape"], facts["guidance_mask_max"] = list(guidance_mask.shape), float(guidance_mask.max())
            facts["guidance_json"] = json.loads(runner.cached_output("17", 2))
        facts["heatmap_masks_shape"] = list(runner.cached_output("8", 1).shape)
        facts["rise_aucs"] = [runner.cached_output("11", 2), runner.cached_output("11", 3)]
        cam_mask = runner.cached_output("12", 1)
        facts["cam_mask_shape"], facts["cam_mask_max"] = list(cam_mask.shape), float(cam_mask.max())
        import json

        facts["cam_json"] = json.loads(runner.cached_output("12", 2))
        facts["x0_previews_shape"] = list(runner.cached_output("9", 0).shape)
        facts["recovery_mask_shape"] = list(runner.cached_output("13", 2).shape)
        facts["trace_path"] = path
        facts["dit_wrappers_after_cam"] = sorted(f"{k[0]} {k[1]}" for k in runner.cached_output("4", 0).model_options["transformer_options"]["patches_replace"]["dit"])
    return facts


def dit_families(runner, nodes_module, work) -> dict:
    """Every family: Tap after a test speed pack, tapped vs untapped sampling, the trace's maps
    against the independent reference; SD3 and Flux schnell with every explanation node."""
    facts = {"supported": _supported()}
    for i, family in enumerate(FAMILIES):
        if not facts["supported"]:
            result = runner.run(dit_prompt(nodes_module, family, seed=40 + i, speed_pack=f"old-{family}"))
            facts[family] = {"result": result}
            continue
        facts[family] = _family_run(runner, nodes_module, family, seed=40 + i, explain=family in FULL_GRAPH, tag=f"pack-{family}")
    return facts


def dit_without_speed_pack(runner, nodes_module, work) -> dict:
    """The Tap alone (no override before it) on SD3 and Flux: the same latents and maps as behind
    the speed pack (same seed), and the override it sets has nothing to chain to."""
    if not _supported():
        return {"supported": False}
    facts = {"supported": True}
    for family, seed in (("sd3", 40), ("flux-schnell", 42)):
        prompt = dit_prompt(nodes_module, family, seed=seed, prefix="explain-test/alone")
        prompt_with = dit_prompt(nodes_module, family, seed=seed, speed_pack=f"again-{family}", prefix="explain-test/again")
        alone, with_pack = runner.run(prompt), None
        entry = {"result": alone}
        if alone["ok"]:
            trace, _ = _saved_trace(alone, "7")
            latent = runner.cached_output("6")["samples"].float()
            tapped = runner.cached_output("4", 0).model_options["transformer_options"]["optimized_attention_override"]
            entry["previous"] = None if tapped.previous is None else type(tapped.previous).__name__
            with_pack = runner.run(prompt_with)
            entry["with_pack_result"] = with_pack
            if with_pack["ok"]:
                other, _ = _saved_trace(with_pack, "7")
                entry["same_latent"] = bool(torch.equal(latent, runner.cached_output("6")["samples"].float()))
                entry["same_maps"] = bool(torch.equal(trace.attention, other.attention))
        facts[family] = entry
    return facts


def dit_probes_match_the_sampler(runner, nodes_module, work) -> dict:
    """In the flow space: DF-RISE's unmasked probe of the tapped SD3 / Flux model at a step
    reproduces the sampler's own x0 there (latents x = (1-σ)·x0 + σ·ε, denoised out)."""
    if not _supported():
        return {"supported": False}
    import nodes as comfy_nodes

    from explain.denoiser import NoiseLevel

    explain_nodes = pack_module("nodes.explain_nodes")
    import importlib

    comfy_denoiser = importlib.import_module(".comfy_denoiser", explain_nodes.__package__)
    tap_node = pack_module("nodes.tap_node")
    facts = {"supported": True}
    for family in ("sd3", "flux-schnell"):
        with torch.inference_mode():
            model, clip, _vae = dit_models.tiny_dit(family)
            positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
            negative = comfy_nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
            tapped, handle = tap_node.tap(model, clip=clip, prompt=PROMPT, unique_id=f"probe-{family}")
            latent = {"samples": torch.zeros(1, 16, LATENT[0] // 8, LATENT[1] // 8)}
            (out,) = comfy_nodes.common_ksampler(tapped, 9, STEPS, 3.0, "euler", "simple", positive, negative, latent)
            trace = handle.resolve(out)
            step = 1
            level = NoiseLevel.from_trace(trace, step)
            x = trace.x_t[step].float()

            def probe(denoiser):
                return denoiser.predict(x, level, "x0").cpu(), denoiser.latent_space

            x0, space = comfy_denoiser.run_with_denoiser(tapped, positive, negative, trace, step, 3.0, probe)
            eps = comfy_denoiser.run_with_denoiser(tapped, positive, negative, trace, step, 3.0, lambda d: d.predict(x, level, "epsilon").cpu())
        sigma = float(trace.sigmas[step])
        facts[family] = {
            "latent_space": space,
            "sigma": sigma,
            "x0_max_abs_diff": float((x0 - trace.x0[step]).abs().max()),
            "scale": float(trace.x0[step].abs().max()),
            # x = (1-σ)·x0 + σ·ε must hold for the probe's ε and x0
            "flow_identity_max_abs_diff": float((x - ((1 - sigma) * x0 + sigma * eps)).abs().max()),
        }
    return facts


def dit_batch_of_two(runner, nodes_module, work) -> dict:
    """A batch of two non-square latents on SD3 and Flux: one map per item, matching the untapped
    sampling, the items' maps differ (their noise does)."""
    if not _supported():
        return {"supported": False}
    import nodes as comfy_nodes

    tap_node = pack_module("nodes.tap_node")
    facts = {"supported": True}
    for family in ("sd3", "flux-schnell"):
        with torch.inference_mode():
            model, clip, _vae = dit_models.tiny_dit(family)
            positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
            negative = comfy_nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
            tapped, handle = tap_node.tap(model, clip=clip, prompt=PROMPT, negative_prompt=NEGATIVE, unique_id=f"batch-{family}")
            latent = {"samples": torch.zeros(2, 16, 6, 4)}
            (out,) = comfy_nodes.common_ksampler(tapped, 12, 2, 3.0, "euler", "simple", positive, negative, latent)
            (plain,) = comfy_nodes.common_ksampler(model, 12, 2, 3.0, "euler", "simple", positive, negative, latent)
            trace = handle.resolve(out)
        facts[family] = {
            "attention_shape": list(trace.attention.shape),
            "attention_negative_shape": list(trace.attention_negative.shape),
            "items_differ": bool((trace.attention[:, 0] - trace.attention[:, 1]).abs().max() > 1e-6),
            "bit_identical": bool(torch.equal(out["samples"], plain["samples"])),
        }
    return facts


def dit_trace_roundtrip(runner, nodes_module, work) -> dict:
    """Save Trace writes an SD3 run's trace; the file loads back equal (attention as float16) and
    Explain Load Trace → Word Heatmaps works on it without a model."""
    if not _supported():
        return {"supported": False}
    trace_io = pack_module("nodes.trace_io")
    explain_nodes = pack_module("nodes.explain_nodes")
    prompt = dit_prompt(nodes_module, "sd3", seed=61, prefix="explain-test/roundtrip")
    first = runner.run(prompt)
    facts = {"supported": True, "first": first}
    if not first["ok"]:
        return facts
    loaded, path = _saved_trace(first, "7")
    held = runner.cached_output("4", 1).resolve(runner.cached_output("6"))  # the run the Tap filed in memory
    facts["attention_max_abs_diff"] = float((loaded.attention - held.attention).abs().max())
    facts["same_tokens_words_meta"] = loaded.tokens == held.tokens and loaded.words == held.words and loaded.meta == held.meta
    facts["same_latents"] = bool(torch.equal(loaded.x_t, held.x_t) and torch.equal(loaded.x0, held.x0))
    handle = trace_io.ExplainLoadTrace.execute(path).result[0]
    heat = explain_nodes.ExplainWordHeatmaps.execute(handle, None, "red, square", "", 0, False, "paper").result
    facts["masks_shape"] = list(heat[1].shape)
    facts["words"] = heat[3]
    return facts


def dit_newer_calling_convention(runner, nodes_module, work) -> dict:
    """SD3 and Flux graphs (every explanation node) under newer ComfyUI's OUTER_SAMPLE calling
    convention (the harness's marked shim)."""
    if not _supported():
        return {"supported": False}
    from comfyui_scenarios import NewerCallingConvention

    facts = {"supported": True}
    with NewerCallingConvention() as shim:
        for family in FULL_GRAPH:
            facts[family] = _family_run(runner, nodes_module, family, seed=90, explain=True, tag=f"newer-{family}")
    facts["latent_shapes_received"] = shim.received
    return facts


def dit_old_comfyui(runner, nodes_module, work) -> dict:
    """On a ComfyUI without optimized_attention_override (before 0.3.60) the Tap on a DiT model
    says what it needs; here it is simulated on the newer checkout by hiding ``wrap_attn``."""
    import comfy.ldm.modules.attention as attention

    joint_taps = pack_module("nodes.joint_taps")
    tap_node = pack_module("nodes.tap_node")
    model, clip, _vae = dit_models.tiny_dit("flux-schnell")
    hidden = getattr(attention, "wrap_attn", None)
    if hidden is not None:
        del attention.wrap_attn
    try:
        tap_node.tap(model, unique_id="old")
        message = None
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        message = f"{type(exc).__name__}: {exc}"
    finally:
        if hidden is not None:
            attention.wrap_attn = hidden
    return {"message": message, "supported_after": joint_taps.override_supported(), "model_untouched": not model.model_options.get("transformer_options")}


SCENARIOS = {
    "dit_families": dit_families,
    "dit_without_speed_pack": dit_without_speed_pack,
    "dit_probes_match_the_sampler": dit_probes_match_the_sampler,
    "dit_batch_of_two": dit_batch_of_two,
    "dit_trace_roundtrip": dit_trace_roundtrip,
    "dit_newer_calling_convention": dit_newer_calling_convention,
    "dit_old_comfyui": dit_old_comfyui,
}
