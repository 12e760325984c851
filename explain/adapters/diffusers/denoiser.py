"""`from_pipeline`: the model-agnostic `GuidedDenoiser` for a diffusers pipeline and a trace.

The prompt, negative prompt, guidance and image size come from the trace; the model family
(`explain.adapters.diffusers.families`) encodes the prompts once and runs the denoiser.
"""

from __future__ import annotations

import torch

from explain.adapters.diffusers.families import family_of
from explain.adapters.diffusers.schedules import latent_space_of, prediction_type_of
from explain.denoiser import LATENT_SPACES, GuidedDenoiser, NoiseLevel, rescale_guidance

__all__ = ["from_pipeline", "latent_space_of"]


def from_pipeline(
    pipe,
    trace=None,
    item: int = 0,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    model: torch.nn.Module | None = None,
    unet: torch.nn.Module | None = None,
    latent_space: str | None = None,
    image_size: tuple[int, int] | None = None,
    guidance_rescale: float | None = None,
) -> GuidedDenoiser:
    """A `GuidedDenoiser` for any diffusers text-to-image pipeline whose family the adapter knows
    (`explain.adapters.diffusers.families`).

    Prompt, negative prompt, guidance scale (and ``guidance_rescale``, as the pipeline's own
    argument) and image size come from ``trace`` (item ``item``) unless given. A scale of 1 or
    less means no guidance, as in diffusers. ``model`` (or, for UNets, ``unet``) replaces the
    pipeline's denoiser (for the model-randomisation check).
    """
    settings: dict = {}
    if trace is not None:
        settings = dict(trace.meta)
        if not 0 <= item < trace.batch_size:
            raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
        prompt = prompt if prompt is not None else trace.prompts[item]
        if negative_prompt is None:
            negative_prompt = trace.negative_prompts[item] if len(trace.negative_prompts) > item else trace.meta.get("negative_prompt")
        if guidance_scale is None and "guidance_scale" in trace.meta:
            guidance_scale = float(trace.meta["guidance_scale"])
        if image_size is None:
            image_size = trace.image_size
        if latent_space is None and trace.meta.get("latent_space") in LATENT_SPACES:
            latent_space = trace.meta["latent_space"]
        if guidance_rescale is None:
            guidance_rescale = float(trace.meta.get("guidance_rescale", 0.0))
    if prompt is None:
        raise ValueError("from_pipeline needs a prompt: pass a trace or prompt=...")
    if guidance_scale is None:
        raise ValueError(
            "from_pipeline needs the guidance scale the image was made with: the trace's meta has no "
            "'guidance_scale', so pass guidance_scale=..."
        )
    rescale = float(guidance_rescale or 0.0)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale!r}")
    if isinstance(negative_prompt, (list, tuple)):
        negative_prompt = negative_prompt[item] if negative_prompt else None
    family = family_of(pipe)
    model = model if model is not None else unet if unet is not None else family.denoiser(pipe)
    guided = float(guidance_scale) > 1.0
    space = latent_space or latent_space_of(pipe.scheduler)
    prediction_type = prediction_type_of(pipe.scheduler)
    probes = family.probe_functions(pipe, model, prompt, negative_prompt, guided, image_size, space, settings)

    def rescaled_guidance(x: torch.Tensor, level: NoiseLevel, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return rescale_guidance(uncond + float(guidance_scale) * (cond - uncond), cond, rescale)

    return GuidedDenoiser(
        model_fn=probes.model_fn,
        prediction_type=prediction_type,
        # diffusers runs no unconditional branch at a scale <= 1 (SD-Turbo's 0.0, say)
        guidance_scale=float(guidance_scale) if guided else 1.0,
        latent_space=space,
        modules=dict(model.named_modules()),
        estimate_item_bytes=probes.estimate_item_bytes,
        device=next(model.parameters()).device,
        token_model_fn=probes.token_model_fn,
        guide_fn=rescaled_guidance if guided and rescale > 0 else None,
    )
