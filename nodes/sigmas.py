"""Exponential time-step sampling (the paper's early / latter / uniform schedules) as SIGMAS."""

from __future__ import annotations

import logging
import warnings

import torch

from explain import schedules

from .api import io
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


class ExplainExponentialSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainExponentialSigmas",
            display_name="Explain Exponential Sigmas (early / latter)",
            category=CATEGORY,
            description=(
                "The paper's exponential time-step sampling for SamplerCustom: 'early' crowds the steps at high "
                "noise (where layout forms), 'latter' at low noise (where detail forms), 'uniform' spaces them evenly. "
                "λ shifts how strongly they crowd (the paper uses 60)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample (its training noise schedule sets the time steps)."),
                io.Int.Input("steps", default=20, min=1, max=999, tooltip="Number of sampling steps."),
                io.Combo.Input(
                    "schedule", options=list(schedules.SCHEDULES), default="early",
                    tooltip="'early': steps crowd at high noise; 'latter': at low noise; 'uniform': evenly spaced.",
                ),  # fmt: skip
                io.Int.Input("lam", default=60, min=0, max=10000, tooltip="λ, the paper's shift (60)."),
            ],
            outputs=[io.Sigmas.Output("sigmas", display_name="SIGMAS", tooltip="steps + 1 noise levels ending in 0, for SamplerCustom.")],
        )

    @classmethod
    def execute(cls, model, steps, schedule, lam):
        return io.NodeOutput(exponential_sigmas_for(model, steps, schedule, lam))
