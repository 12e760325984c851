"""A core `GuidedDenoiser` backed by a ComfyUI MODEL, for DF-RISE, DF-CAM and the faithfulness
games.

ComfyUI only loads a model, prepares the conditionings (``process_conds``) and applies its
patches inside a sampling run, so `run_with_denoiser` starts a real one through a
``CFGGuider`` whose "sampler" is our explanation: ComfyUI loads everything exactly as for
sampling, hands us the prepared guider, and cleans up afterwards (also after an exception).
Inside, one probe is ``comfy.samplers.calc_cond_batch``, which returns denoised x0 per branch
(``prediction_type="sample"``) for latents x = x0 + σε (``latent_space="sigma"``), the space
the Tap records ``x_t`` in. The guided prediction goes through ComfyUI's own
``cfg_function``, so model patches that change guidance (RescaleCFG, SAG, CFG++...) shape the
probes as they shaped the sampling; DF-CAM keeps the paper's linear u + w (c - u) of the two
branches' activations and gradients (the node says so when such a patch is present).

Probes run inside `nodes.taps.probing`, so a tapped MODEL records nothing while it is probed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from explain.denoiser import GuidedDenoiser, NoiseLevel
from explain.trace import Trace

from .taps import probing


def _sigma_batch(level: NoiseLevel, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(level.sigma), device=x.device, dtype=torch.float32)


def make_denoiser(guider, model_options: dict, guidance_scale: float, separate_branches: bool = False) -> GuidedDenoiser:
    """A `GuidedDenoiser` over a guider that ComfyUI has prepared for sampling.

    ``separate_branches`` runs the unconditional branch, then the conditional one, as two
    forward passes (DF-CAM needs its activations in that order); otherwise both go through one
    ``calc_cond_batch`` call, which batches them as memory allows."""
    import comfy.samplers

    inner = guider.inner_model
    conds = guider.conds
    positive = conds.get("positive")
    negative = conds.get("negative")
    guided = not math.isclose(float(guidance_scale), 1.0)
    if guided and not negative:
        raise ValueError("cfg is not 1 but no negative conditioning was given; connect the sampler's negative input")
    device = guider.model_patcher.load_device

    def model_fn(x: torch.Tensor, level: NoiseLevel):
        x = x.to(device)
        sigma = _sigma_batch(level, x)
        if not guided:
            (cond,) = comfy.samplers.calc_cond_batch(inner, [positive], x, sigma, model_options)
            return None, cond
        if separate_branches:
            (uncond,) = comfy.samplers.calc_cond_batch(inner, [negative], x, sigma, model_options)
            (cond,) = comfy.samplers.calc_cond_batch(inner, [positive], x, sigma, model_options)
            return uncond, cond
        cond, uncond = comfy.samplers.calc_cond_batch(inner, [positive, negative], x, sigma, model_options)
        return uncond, cond

    def guide_fn(x: torch.Tensor, level: NoiseLevel, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x.to(cond.device)
        return comfy.samplers.cfg_function(
            inner, cond, uncond, float(guidance_scale), x, _sigma_batch(level, x), model_options, cond=positive, uncond=negative
        )

    modules = dict(inner.diffusion_model.named_modules())
    return GuidedDenoiser(
        model_fn=model_fn,
        prediction_type="sample",
        guidance_scale=float(guidance_scale),
        latent_space="sigma",
        modules=modules,
        device=torch.device(device),
        guide_fn=guide_fn if custom_guidance(model_options) else None,
    )


def custom_guidance(model_options: dict) -> list[str]:
    """The model patches that replace or follow ComfyUI's plain CFG (empty when there are none)."""
    found = []
    if model_options.get("sampler_cfg_function") is not None:
        found.append("sampler_cfg_function")
    if model_options.get("sampler_post_cfg_function"):
        found.append("sampler_post_cfg_function")
    return found


def run_with_denoiser(
    model,
    positive,
    negative,
    trace: Trace,
    step: int,
    guidance_scale: float,
    explain: Callable[[GuidedDenoiser], Any],
    separate_branches: bool = False,
):
    """Load ``model`` as ComfyUI does for sampling ``trace`` at ``step`` and return
    ``explain(denoiser)``."""
    import comfy.samplers

    if trace.meta.get("latent_space", "sigma") != "sigma":
        raise ValueError(
            "this trace was recorded with latents in the 'vp' space (a diffusers DDIM/DPM scheduler); ComfyUI "
            "models need x = x0 + σε. Explain it in the Gradio app or the CLI, or record it in ComfyUI"
        )
    step = trace.check_step(step)
    result: dict[str, Any] = {}

    class ExplanationSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
            denoiser = make_denoiser(model_wrap, extra_args["model_options"], guidance_scale, separate_branches)
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
