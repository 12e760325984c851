"""Conversions between the quantities a denoiser can predict (epsilon, v, x0, flow velocity) and noise levels.

Two families of latent spaces:

* **variance-preserving** (Stable Diffusion 1.x/2.x/XL): x_t = √ᾱ·x0 + √(1-ᾱ)·ε. The functions
  take ``alpha_bar`` (the cumulative product of the scheduler's alphas at the timestep) as a
  tensor or float broadcastable against the latents (`x0_from_model_output`,
  `model_output_from_x0`). The k-diffusion space x0 + σ·ε is this one scaled by √(1+σ²).
* **flow matching / rectified flow** (SD3, Flux; diffusers' ``FlowMatchEulerDiscreteScheduler``):
  x_t = (1-σ)·x0 + σ·ε with σ in [0, 1] (σ = timestep / 1000 after the scheduler's shift), and
  the model predicts the velocity v = ε - x0, so x0 = x_t - σ·v and ε = x_t + (1-σ)·v
  (`flow_sample`, `x0_from_flow_output`, `flow_output_from_x0`). A host that returns denoised
  x0 (ComfyUI) uses ``prediction_type="sample"`` in the same space.

All functions are pure.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # model outputs in a variance-preserving space
FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")  # model outputs in a flow-matching space ("flow" = v = ε - x0)


def _as_tensor(alpha_bar, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar (or a flow σ) as a tensor on ``like``'s device; a per-item vector broadcasts over the batch."""
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
    raise _unknown(prediction_type)


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
    raise _unknown(prediction_type)


def _unknown(prediction_type: str) -> ValueError:
    if prediction_type == "flow":
        return ValueError(
            "prediction_type 'flow' (a flow-matching velocity) has no variance-preserving form (expected one of "
            f"{PREDICTION_TYPES}); convert it with x0_from_flow_output / flow_output_from_x0"
        )
    return ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# ---------------------------------------------------------------------------- flow matching
def flow_sample(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching latent at noise level σ: (1-σ)·x0 + σ·ε."""
    s = _as_tensor(sigma, x0)
    return (1 - s) * x0 + s * noise


def x0_from_flow_output(sample: torch.Tensor, model_output: torch.Tensor, sigma, prediction_type: str = "flow") -> torch.Tensor:
    """The clean-latent estimate implied by a model output at a flow-matching ``sample`` x_t."""
    s = _as_tensor(sigma, sample)
    if prediction_type == "flow":
        return sample - s * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "epsilon":
        # undefined at σ = 1 (pure noise carries no x0): the caller asked for it
        return (sample - s * model_output) / (1 - s)
    raise ValueError(f"unknown flow-matching prediction_type {prediction_type!r}; expected one of {FLOW_PREDICTION_TYPES}")


def flow_output_from_x0(sample: torch.Tensor, x0: torch.Tensor, sigma, prediction_type: str = "flow") -> torch.Tensor:
    """Inverse of `x0_from_flow_output`: the model output (velocity, ε or x0) that gives ``x0`` at x_t."""
    s = _as_tensor(sigma, sample)
    if prediction_type == "flow":
        return (sample - x0) / s
    if prediction_type == "epsilon":
        return (sample - (1 - s) * x0) / s
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown flow-matching prediction_type {prediction_type!r}; expected one of {FLOW_PREDICTION_TYPES}")
