"""Decoding a trace's latents with a ComfyUI VAE (step previews, final images)."""

from __future__ import annotations

import torch

from explain.trace import Trace


def vae_space(trace: Trace, latents: torch.Tensor, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Latents recorded in the model's space (``[N, C, h, w]``) → what ``VAE.decode`` reads.

    ``sigmas`` (one per latent) first scales noisy latents x0 + σε of a ComfyUI ("sigma" space)
    trace back to unit variance, so an x_t preview shows the noisy image rather than a blown-out
    one (the diffusers tap does the same)."""
    x = latents.float()
    if sigmas is not None and trace.meta.get("latent_space") == "sigma":
        x = x * (1.0 + sigmas.double() ** 2).rsqrt().float().view(-1, 1, 1, 1)
    scale = float(trace.meta.get("latent_scale_factor", 1.0))
    shift = float(trace.meta.get("latent_shift_factor", 0.0))
    return x / scale + shift


def decode(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """ComfyUI ``VAE.decode`` in chunks → IMAGE ``[N, H, W, 3]`` float in 0..1 on the CPU."""
    parts = []
    for i in range(0, latents.shape[0], chunk):
        img = vae.decode(latents[i : i + chunk])
        if img.ndim == 5:  # video VAEs return [B, T, H, W, 3]
            img = img.reshape(-1, *img.shape[-3:])
        parts.append(img.float().cpu().clamp(0, 1))
    return torch.cat(parts)


def decode_steps(vae, trace: Trace, kind: str, steps: list[int], item: int) -> torch.Tensor:
    """Decoded x0 (``kind="x0"``) or x_t (``"x_t"``) of ``steps`` for batch item ``item``."""
    source = trace.x0 if kind == "x0" else trace.x_t
    latents = source[steps, item]
    sigmas = trace.sigmas[steps] if kind == "x_t" else None
    return decode(vae, vae_space(trace, latents, sigmas))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def add_decoded_images(trace: Trace, vae, previews: bool = True, noisy: bool = True) -> Trace:
    """Fill ``images`` (final) and, with ``previews``, ``x0_previews`` (and, with ``noisy``,
    ``x_t_previews``) by decoding with ``vae``, so viewers without a VAE (the Gradio app) can
    show pictures."""
    s, b = trace.num_steps, trace.batch_size
    final = trace.final_latent if trace.final_latent is not None else trace.x0[-1]
    trace.images = to_uint8(decode(vae, vae_space(trace, final)))
    if previews:
        x0 = decode(vae, vae_space(trace, trace.x0.reshape(s * b, *trace.x0.shape[2:])))
        trace.x0_previews = to_uint8(x0).reshape(s, b, *x0.shape[1:])
    if previews and noisy:
        flat_sigmas = trace.sigmas.repeat_interleave(b)
        xt = decode(vae, vae_space(trace, trace.x_t.reshape(s * b, *trace.x_t.shape[2:]), flat_sigmas))
        trace.x_t_previews = to_uint8(xt).reshape(s, b, *xt.shape[1:])
    return trace
