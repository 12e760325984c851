"""Exponential time-step sampling (the paper's early / latter / uniform schedules) as SIGMAS."""

from __future__ import annotations

import logging
import warnings

import torch

from explain import schedules

from .tap_node import CATEGORY

log = logging.getLogger("diffusion-explain")


def model_alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t of a ComfyUI MODEL's discrete noise schedule, float64 ``[T]``."""
    sampling = getattr(getattr(model, "model", None), "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            "this MODEL has no discrete noise schedule (a table of training sigmas); exponential time steps need "
            "an SD1.x/SD2.x/SDXL-style (DDPM-trained) model"
        )
    s = sigmas.detach().double().cpu()
    return 1.0 / (1.0 + s * s)


def exponential_sigmas_for(model, steps: int, schedule: str, lam: int) -> torch.Tensor:
    """SIGMAS ``[steps + 1]`` (ending in 0) for ``model``; schedule warnings go to the log."""
    ac = model_alphas_cumprod(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigmas = schedules.exponential_sigmas(int(steps), schedule, int(lam), alphas_cumprod=ac)
    for w in caught:
        log.warning("diffusion-explain: %s", w.message)
    return sigmas


class ExplainExponentialSigmas:
    DESCRIPTION = (
        "The paper's exponential time-step sampling for SamplerCustom: 'early' crowds the steps at high "
        "noise (where layout forms), 'latter' at low noise (where detail forms), 'uniform' spaces them evenly. "
        "λ shifts how strongly they crowd (the paper uses 60)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sigmas"
    RETURN_TYPES = ("SIGMAS",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "steps": ("INT", {"default": 20, "min": 1, "max": 999}),
                "schedule": (list(schedules.SCHEDULES), {"default": "early"}),
                "lam": ("INT", {"default": 60, "min": 0, "max": 10000, "tooltip": "λ, the paper's shift (60)."}),
            }
        }

    def sigmas(self, model, steps, schedule, lam):
        return (exponential_sigmas_for(model, steps, schedule, lam),)
