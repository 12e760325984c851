"""The diffusers adapter: trace any supported pipeline, re-run its denoiser for DF-RISE/DF-CAM.

    from explain.adapters.diffusers import trace, generate, from_pipeline

    with trace(pipe) as tr:
        pipe("a red circle above a blue square")
    den = from_pipeline(pipe, tr.trace)

Role files: `tap` (the trace context manager), `denoiser` (`from_pipeline`), `decode` (VAE),
`schedules` (the paper's time steps as pipeline arguments), `loading` (models by name);
model families, one file each, in `families` (UNets: SD 1.x/2.x/XL; SD3; Flux).
"""

from explain.adapters.diffusers.decode import decode_latents, vae_decoder
from explain.adapters.diffusers.denoiser import from_pipeline
from explain.adapters.diffusers.families import (
    FAMILIES,
    UnsupportedPipelineError,
    family_of,
)
from explain.adapters.diffusers.loading import ModelLoadError, load_model
from explain.adapters.diffusers.schedules import (
    diffusers_timesteps,
    latent_space_of,
    use_paper_scheduler_if_needed,
)
from explain.adapters.diffusers.tap import DiffusersTap, generate, trace

__all__ = [
    "FAMILIES",
    "DiffusersTap",
    "ModelLoadError",
    "UnsupportedPipelineError",
    "decode_latents",
    "diffusers_timesteps",
    "family_of",
    "from_pipeline",
    "generate",
    "latent_space_of",
    "load_model",
    "trace",
    "use_paper_scheduler_if_needed",
    "vae_decoder",
]
