"""Latents to pixels through a diffusers VAE, as the pipelines themselves decode.

One function knows every latent convention diffusers uses (``scaling_factor``, SD3/Flux's
``shift_factor``, SDXL-refiner-style ``latents_mean``/``latents_std``, and fp16 VAEs that must
decode in fp32, ``force_upcast``); the tap's previews, the faithfulness games' image space and
the app all go through it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The model's latents as the VAE's decoder reads them (the inverse of the pipeline's encode scaling)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    x = latents.float()
    if mean is not None and std is not None:
        c = x.shape[1]
        return x * torch.tensor(std, device=x.device).view(1, c, 1, 1) / config.scaling_factor + torch.tensor(mean, device=x.device).view(1, c, 1, 1)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return x / float(getattr(config, "scaling_factor", 1.0)) + shift


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` model latents → ``[N, 3, H, W]`` float images in about [-1, 1] (unclamped)."""
    param = next(vae.parameters())
    dtype = param.dtype  # read now: .to() below changes the parameter in place
    x = unscale_latents(vae, latents.to(param.device))
    # fp16 VAEs that need it (SDXL) decode in float32, as the pipeline does; restored after.
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        return vae.decode(x.to(torch.float32 if upcast else dtype), return_dict=False)[0].float()
    finally:
        if upcast:
            vae.to(dtype)


def vae_decoder(vae, batch_size: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``decode(x0) -> images [N, 3, H, W]`` in [-1, 1] for image-space game curves, in chunks."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([decode_latents(vae, z[i : i + batch_size]).clamp(-1, 1) for i in range(0, z.shape[0], batch_size)])

    return decode


def to_uint8(images: torch.Tensor, max_side: int | None = None) -> torch.Tensor:
    """VAE output [N, 3, H, W] in [-1, 1] → [N, H', W', 3] uint8 on the CPU, the longer side at
    most ``max_side`` (area-averaged)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    if max_side is not None and max(x.shape[-2:]) > max_side:
        h, w = x.shape[-2:]
        f = max_side / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
