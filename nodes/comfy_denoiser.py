"""A core `GuidedDenoiser` backed by a ComfyUI MODEL, for DF-RISE, DF-CAM and the faithfulness
games.

ComfyUI only loads a model, prepares the conditionings (``process_conds``) and applies its
patches inside a sampling run, so `run_with_denoiser` starts a real one through a
``CFGGuider`` whose "sampler" is our explanation: ComfyUI loads everything exactly as for
sampling, hands us the prepared guider, and cleans up afterwards (also after an exception).
Inside, a probe runs the branches as ComfyUI's ``sampling_function`` does and returns denoised
x0 per branch (``prediction_type="sample"``) for latents in the model's own space, the space the
Tap records ``x_t`` in: x = x0 + σε (``latent_space="sigma"``), or x = (1-σ)·x0 + σ·ε for
flow-matching models (SD3, Flux: ``"flow"``). Model patches that change how the branches are run or
combined (SkipLayerGuidance, APG, TCFG, RescaleCFG, SAG, CFG++...) shape the probes as they
shaped the sampling; DF-CAM keeps the paper's linear u + w (c - u) of the two plain branches'
activations and gradients (the node says so when such a patch is present).

Batches are sized with ComfyUI's own estimate of a forward pass (``BaseModel.memory_required``)
against the memory its manager counts as free.

Probes run inside `nodes.taps.probing`, so a tapped MODEL records nothing while it is probed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from explain.denoiser import CUDA_BUDGET_FRACTION, GuidedDenoiser, NoiseLevel
from explain.trace import Trace

from .taps import probing

MEMORY_SAFETY = 1.5  # ComfyUI's own factor on memory_required when it batches conds


def _sigma_batch(level: NoiseLevel, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(level.sigma), device=x.device, dtype=torch.float32)


def make_denoiser(guider, model_options: dict, guidance_scale: float, separate_branches: bool = False, latent_space: str = "sigma") -> GuidedDenoiser:
    """A `GuidedDenoiser` over a guider that ComfyUI has prepared for sampling.

    Probes run the branches as ComfyUI's ``sampling_function`` does: through the model's
    ``calc_cond_batch`` replacement (SkipLayerGuidance) and its pre-CFG functions (APG, TCFG...),
    then ``cfg_function``. ``separate_branches`` (DF-CAM) runs the plain unconditional forward,
    then the plain conditional one, as two passes, the order DF-CAM needs its activations in."""
    import comfy.samplers

    inner = guider.inner_model
    conds = guider.conds
    positive = conds.get("positive")
    negative = conds.get("negative")
    scale = float(guidance_scale)
    guided = not math.isclose(scale, 1.0)
    if guided and not negative:
        raise ValueError("cfg is not 1 but no negative conditioning was given; connect the sampler's negative input")
    # as sampling_function: no unconditional branch at cfg 1 unless a patch asks for it (SAG)
    uncond = negative if guided or model_options.get("disable_cfg1_optimization", False) else None
    device = guider.model_patcher.load_device

    def sampled(x: torch.Tensor, sigma: torch.Tensor) -> list:
        """``[cond, uncond]`` outputs exactly as sampling_function hands them to cfg_function."""
        args = {"conds": [positive, uncond], "input": x, "sigma": sigma, "model": inner, "model_options": model_options}
        if "sampler_calc_cond_batch_function" in model_options:
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(inner, args["conds"], x, sigma, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({**args, "conds_out": out, "cond_scale": scale, "timestep": sigma})
        return out

    def cfg(x: torch.Tensor, sigma: torch.Tensor, uncond_out: torch.Tensor, cond_out: torch.Tensor) -> torch.Tensor:
        return comfy.samplers.cfg_function(inner, cond_out, uncond_out, scale, x, sigma, model_options, cond=positive, uncond=uncond)

    def model_fn(x: torch.Tensor, level: NoiseLevel):
        x = x.to(device)
        sigma = _sigma_batch(level, x)
        if separate_branches:
            u = comfy.samplers.calc_cond_batch(inner, [negative], x, sigma, model_options)[0] if guided else None
            (c,) = comfy.samplers.calc_cond_batch(inner, [positive], x, sigma, model_options)
            return u, c
        cond_out, uncond_out = sampled(x, sigma)[:2]
        if guided:
            return uncond_out, cond_out
        if uncond is not None:  # cfg 1 with both branches: the sampler's own result
            return None, cfg(x, sigma, uncond_out, cond_out)
        return None, cond_out

    def guide_fn(x: torch.Tensor, level: NoiseLevel, uncond_out: torch.Tensor, cond_out: torch.Tensor) -> torch.Tensor:
        x = x.to(cond_out.device)
        return cfg(x, _sigma_batch(level, x), uncond_out, cond_out)

    modules = dict(inner.diffusion_model.named_modules())
    return GuidedDenoiser(
        model_fn=model_fn,
        prediction_type="sample",
        guidance_scale=scale,
        latent_space=latent_space,
        modules=modules,
        device=torch.device(device),
        estimate_item_bytes=item_bytes_estimate(inner, 2 if uncond is not None else 1),
        guide_fn=guide_fn if custom_guidance(model_options) else None,
    )


def item_bytes_estimate(inner, branches: int):
    """Bytes one latent costs in a probe: ComfyUI's estimate for the model (``memory_required``
    of a batch of one) per branch, with ComfyUI's safety factor."""

    def estimate(x: torch.Tensor) -> int:
        return int(inner.memory_required([1, *x.shape[1:]]) * branches * MEMORY_SAFETY) + 1

    return estimate


def memory_budget(device) -> int | None:
    """The bytes probes may take on ``device``: a share of what ComfyUI counts as free there (it
    also counts memory torch holds unused); None on a CPU (the denoiser's own default)."""
    if device is None or torch.device(device).type == "cpu":
        return None
    import comfy.model_management

    return int(comfy.model_management.get_free_memory(device) * CUDA_BUDGET_FRACTION)


def make_room_for_weight_clones(denoiser: GuidedDenoiser, keep=()) -> int:
    """A backward pass under inference mode clones the model's inference-tensor weights
    (`explain.methods.cam.autograd_ready`), behind ComfyUI's memory manager. On a GPU, ask it to free
    that much first, plus its reserve for a forward pass, unloading models other than ``keep``
    (ModelPatchers in use). Returns the bytes of the clones on the device."""
    device = denoiser.device
    if device is None or device.type == "cpu":
        return 0
    import comfy.model_management as mm

    tensors = {id(t): t for m in denoiser.modules.values() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    needed = sum(t.numel() * t.element_size() for t in tensors.values() if t.is_inference() and t.device.type == device.type)
    if needed:
        keep_loaded = [loaded for loaded in mm.current_loaded_models if any(loaded.model is k for k in keep)]
        mm.free_memory(needed + mm.minimum_inference_memory(), device, keep_loaded=keep_loaded)
    return needed


GUIDANCE_KEYS = ("sampler_calc_cond_batch_function", "sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")


def custom_guidance(model_options: dict) -> list[str]:
    """The model patches that change how ComfyUI runs or combines the two branches (empty when
    there are none), in the order sampling_function applies them."""
    return [key for key in GUIDANCE_KEYS if model_options.get(key)]


def run_with_denoiser(
    model,
    positive,
    negative,
    trace: Trace,
    step: int,
    guidance_scale: float,
    explain: Callable[[GuidedDenoiser], Any],
    separate_branches: bool = False,
    backward: bool = False,
):
    """Load ``model`` as ComfyUI does for sampling ``trace`` at ``step`` and return
    ``explain(denoiser)``. ``backward``: the explanation takes gradients through the model (DF-CAM),
    so ComfyUI first makes room for the weight clones that needs."""
    import comfy.samplers

    from .taps import sampling_space

    space = sampling_space(model.get_model_object("model_sampling"))  # with a ModelSampling* node's patch
    recorded = trace.meta.get("latent_space", "sigma")
    if recorded != space:
        given = {"vp": "x = √ᾱ·x0 + √(1-ᾱ)·ε (a diffusers DDIM/DPM scheduler)", "sigma": "x = x0 + σ·ε", "flow": "x = (1-σ)·x0 + σ·ε (flow matching)"}
        raise ValueError(
            f"this trace's latents are in the {recorded!r} space, {given.get(recorded, recorded)}, but this MODEL samples in the "
            f"{space!r} space, {given[space]}: connect the MODEL the trace was sampled with (or explain a diffusers trace "
            "in the Gradio app or the CLI)"
        )
    step = trace.check_step(step)
    result: dict[str, Any] = {}

    class ExplanationSampler(comfy.samplers.Sampler):
        # ComfyUI calls sample(model_wrap, sigmas, extra_args, callback, noise, latent_image,
        # denoise_mask, disable_pbar); whatever it adds later is accepted and unused.
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
            denoiser = make_denoiser(model_wrap, extra_args["model_options"], guidance_scale, separate_branches, latent_space=space)
            if backward:
                patcher = model_wrap.model_patcher
                make_room_for_weight_clones(denoiser, [patcher, *patcher.model_patches_models(), *model_wrap.loaded_models])
            result["value"] = explain(denoiser)
            return noise

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else [])
    guider.set_cfg(guidance_scale)
    c = trace.x_t.shape[2]
    h, w = trace.latent_size
    zeros = torch.zeros(1, c, h, w)
    sigmas = torch.tensor([float(trace.sigmas[step]), 0.0])
    with probing():
        guider.sample(zeros, zeros.clone(), ExplanationSampler(), sigmas, denoise_mask=None, callback=None, disable_pbar=True, seed=0)
    return result["value"]


def guidance_of(trace: Trace, cfg: float) -> float:
    """``cfg`` if positive, else the guidance the trace was sampled with."""
    if cfg and cfg > 0:
        return float(cfg)
    recorded = trace.meta.get("guidance_scale")
    if recorded is None:
        raise ValueError("the trace does not say which cfg it was sampled with; set cfg on this node")
    return float(recorded)
