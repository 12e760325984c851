"""Conversions between the quantities a denoiser can predict (epsilon, v, x0) and noise levels.

All functions take ``alpha_bar`` (the cumulative product of the scheduler's alphas at the
timestep) as a tensor or float broadcastable against the latents. They are pure and work
for any variance-preserving schedule (Stable Diffusion 1.x/2.x/XL).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _as_tensor(alpha_bar, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar as a tensor on ``like``'s device; a per-item vector broadcasts over the batch."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=like.device)
    if a.ndim == 1 and like.ndim > 1:
        a = a.view(-1, *([1] * (like.ndim - 1)))
    return a.to(like.dtype)


def sigma_from_alpha_bar(alpha_bar):
    """k-diffusion noise level sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def alpha_bar_from_sigma(sigma):
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + s * s)


def x0_from_model_output(sample: torch.Tensor, model_output: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The clean-latent estimate implied by a model output at a noisy ``sample``."""
    a = _as_tensor(alpha_bar, sample)
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def model_output_from_x0(sample: torch.Tensor, x0: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """Inverse of `x0_from_model_output`: the model output that would give ``x0``."""
    a = _as_tensor(alpha_bar, sample)
    eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
