"""A model-agnostic guided denoiser: the one thing DF-RISE, DF-CAM and the faithfulness games
need from a model.

`GuidedDenoiser` wraps a callable ``model_fn(x, level) -> (uncond_out, cond_out)`` that runs the
raw model on a batch of latents at one noise level (``uncond_out`` is ``None`` when there is no
guidance), and turns its outputs into the guided prediction of x0 or of the noise ε, combined
with classifier-free guidance exactly as a sampler does: ``u + w (c - u)``. Because x0 and ε
are both affine in the model output at fixed x, combining in either space gives the same
result, so a ComfyUI adapter may hand back denoised x0 (``prediction_type="sample"``) and a
diffusers adapter raw ε or v.

A probe is a pure function of its input: no scheduler is stepped, so a sampler's state (the
multistep history of DPM-Solver++, say) is never touched (this fixes the official code's B9).

For DF-CAM, `model_fn` must run with gradients when asked (it is called under
``torch.enable_grad()``), and a hooked module must see the branches as ``[uncond; cond]``: one
batch with the unconditional half first, or two calls, the unconditional one first.

Latent scaling: ``latent_space="vp"`` means x = √ᾱ·x0 + √(1-ᾱ)·ε (DDIM, DPM-Solver, PNDM in
diffusers); ``"sigma"`` means x = x0 + σ·ε (k-diffusion, ComfyUI, diffusers' Euler and Heun);
``"flow"`` means x = (1-σ)·x0 + σ·ε with σ in [0, 1] (flow matching: SD3, Flux), where the
model predicts the velocity v = ε - x0 (``prediction_type="flow"``; x0 = x - σ·v) or, from a
host that denoises itself, x0 (``"sample"``). `model_fn` always receives x in the denoiser's
own latent space, unpacked as ``[N, C, h, w]`` (a family that packs latents, as Flux does,
packs them inside its ``model_fn``).

Adapters build one from a framework's model and a trace (diffusers:
`explain.adapters.diffusers.from_pipeline`; ComfyUI: ``nodes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from explain.noise import (
    FLOW_PREDICTION_TYPES,
    PREDICTION_TYPES,
    flow_output_from_x0,
    model_output_from_x0,
    x0_from_flow_output,
    x0_from_model_output,
)

QUANTITIES = ("x0", "epsilon")
LATENT_SPACES = ("vp", "sigma", "flow")

ModelFn = Callable[[torch.Tensor, "NoiseLevel"], tuple]

CPU_MEMORY_BUDGET = 2 * 1024**3
CPU_MAX_BATCH = 32
CUDA_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class NoiseLevel:
    """Where in the denoising a probe runs: the model's timestep and the noise level σ (in a
    flow-matching space the flow σ in [0, 1]; ``alpha_bar`` then has no meaning)."""

    timestep: float
    sigma: float

    @property
    def alpha_bar(self) -> float:
        return 1.0 / (1.0 + self.sigma * self.sigma)

    @classmethod
    def from_trace(cls, trace, step: int) -> "NoiseLevel":
        step = trace.check_step(step)
        return cls(timestep=float(trace.timesteps[step]), sigma=float(trace.sigmas[step]))


@dataclass
class GuidedDenoiser:
    """The guided one-step prediction of a model at any noise level, batched and stateless.

    ``modules`` names the model's sub-modules (for DF-CAM); ``estimate_item_bytes`` (optional)
    says how much memory one latent costs in a forward pass, for batching by a memory budget;
    ``device`` is where the model runs. ``token_model_fn(x, level, keep)`` (optional, for
    per-token DF-RISE) is ``model_fn`` with a ``[N, T]`` 0/1 mask over the prompt's token
    positions: a dropped position of the conditional context is replaced by the unconditional
    context at that position.

    ``guide_fn(x, level, uncond, cond)`` (optional) replaces ``u + w (c - u)`` in the guided
    predictions (`predict`, `predict_tokens`), on the model's raw outputs: a host's own guidance
    (ComfyUI's RescaleCFG, say) then shapes the probes as it shaped the sampling. DF-CAM keeps
    the paper's linear combination of the two branches (`branches`, `combine`).
    """

    model_fn: ModelFn
    prediction_type: str
    guidance_scale: float
    latent_space: str = "vp"
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    estimate_item_bytes: Callable[[torch.Tensor], int] | None = None
    device: torch.device | None = None
    token_model_fn: Callable[[torch.Tensor, "NoiseLevel", torch.Tensor], tuple] | None = None
    guide_fn: Callable[[torch.Tensor, "NoiseLevel", torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space must be one of {LATENT_SPACES}, got {self.latent_space!r}")
        allowed = FLOW_PREDICTION_TYPES if self.latent_space == "flow" else PREDICTION_TYPES
        if self.prediction_type not in allowed:
            hint = " ('flow' velocities need latent_space='flow')" if self.prediction_type == "flow" else ""
            raise ValueError(
                f"prediction_type in the {self.latent_space!r} latent space must be one of {allowed}, got {self.prediction_type!r}{hint}"
            )
        if not math.isfinite(float(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")

    @property
    def guided(self) -> bool:
        return float(self.guidance_scale) != 1.0

    # ------------------------------------------------------------------ conversions
    def _vp(self, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        if self.latent_space == "sigma":
            return x / math.sqrt(1.0 + level.sigma**2)
        return x

    def convert(self, x: torch.Tensor, model_output: torch.Tensor, level: NoiseLevel, quantity: str) -> torch.Tensor:
        """A raw model output at latent ``x`` as the requested quantity (``x0`` or ``epsilon``)."""
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        out = model_output.float()
        if quantity == "epsilon" and self.prediction_type == "epsilon":
            return out
        if quantity == "x0" and self.prediction_type == "sample":
            return out
        if self.latent_space == "flow":
            x0 = x0_from_flow_output(x.float(), out, level.sigma, self.prediction_type)
            return x0 if quantity == "x0" else flow_output_from_x0(x.float(), x0, level.sigma, "epsilon")
        x_vp = self._vp(x.float(), level)
        x0 = x0_from_model_output(x_vp, out, level.alpha_bar, self.prediction_type)
        if quantity == "x0":
            return x0
        return model_output_from_x0(x_vp, x0, level.alpha_bar, "epsilon")

    # ------------------------------------------------------------------ predictions
    def branches(self, x: torch.Tensor, level: NoiseLevel, quantity: str = "x0") -> tuple[torch.Tensor | None, torch.Tensor]:
        """The unconditional (``None`` without guidance) and conditional predictions of ``x``."""
        _check_latents(x)
        uncond, cond = self.model_fn(x, level)
        if self.guided and uncond is None:
            raise ValueError("model_fn returned no unconditional output, but guidance_scale is not 1")
        u = self.convert(x, uncond, level, quantity) if (self.guided and uncond is not None) else None
        c = self.convert(x, cond, level, quantity)
        return u, c

    def combine(self, uncond: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        if uncond is None:
            return cond
        return uncond + float(self.guidance_scale) * (cond - uncond)

    def _guided(self, x: torch.Tensor, level: NoiseLevel, quantity: str, outputs: tuple) -> torch.Tensor:
        """The guided ``quantity`` from the raw ``(uncond, cond)`` outputs of one forward."""
        uncond, cond = outputs
        if not self.guided or uncond is None:
            if self.guided:
                raise ValueError("model_fn returned no unconditional output, but guidance_scale is not 1")
            return self.convert(x, cond, level, quantity)
        if self.guide_fn is not None:
            return self.convert(x, self.guide_fn(x, level, uncond, cond), level, quantity)
        return self.combine(self.convert(x, uncond, level, quantity), self.convert(x, cond, level, quantity))

    def predict(self, x: torch.Tensor, level: NoiseLevel, quantity: str = "x0", batch_size: int | None = None) -> torch.Tensor:
        """The guided prediction ``[N, C, h, w]`` (float32) of a batch of latents, run in chunks of
        ``batch_size`` (all at once by default) without gradients."""
        _check_latents(x)
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        n = x.shape[0]
        size = n if batch_size is None else max(1, int(batch_size))
        with torch.no_grad():
            parts = [self._guided(x[i : i + size], level, quantity, self.model_fn(x[i : i + size], level)) for i in range(0, n, size)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def predict_tokens(self, x: torch.Tensor, level: NoiseLevel, keep: torch.Tensor, quantity: str = "x0") -> torch.Tensor:
        """The guided prediction with the prompt's tokens masked by ``keep`` ``[N, T]``."""
        if self.token_model_fn is None:
            raise ValueError("this denoiser cannot mask prompt tokens (it has no token_model_fn)")
        _check_latents(x)
        return self._guided(x, level, quantity, self.token_model_fn(x, level, keep))

    # ------------------------------------------------------------------ batching
    def batch_size_for(self, x: torch.Tensor, memory_budget: int | None = None, limit: int | None = None) -> int:
        """How many latents like ``x`` (``[C, h, w]`` or ``[1, C, h, w]``) fit one forward pass in
        ``memory_budget`` bytes (by default half the free GPU memory, or 2 GiB on a CPU)."""
        sample = x if x.ndim == 4 else x.unsqueeze(0)
        device = sample.device
        if memory_budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                memory_budget = int(free * CUDA_BUDGET_FRACTION)
            else:
                memory_budget = CPU_MEMORY_BUDGET
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        item = self.item_bytes(sample[:1])
        size = max(1, int(memory_budget // max(item, 1)))
        if device.type != "cuda":
            size = min(size, CPU_MAX_BATCH)  # bigger CPU batches are no faster, only hungrier
        if limit is not None:
            size = min(size, max(1, int(limit)))
        return size

    def item_bytes(self, x: torch.Tensor) -> int:
        """Memory one latent costs in a guided forward pass (estimated, or measured on CUDA)."""
        if self.estimate_item_bytes is not None:
            return int(self.estimate_item_bytes(x))
        branches = 2 if self.guided else 1
        # Without knowledge of the model: a few hundred feature maps of the latent's size.
        return int(branches * 256 * x[0].numel() * 4)


def _check_latents(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"latents must be a [N, C, h, w] tensor, got {shape}")
    if x.shape[0] == 0:
        raise ValueError("latents batch is empty")


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, amount: float) -> torch.Tensor:
    """diffusers' ``guidance_rescale`` (Lin et al. 2024, sec. 3.4) on raw model outputs: the guided
    output rescaled per item to the conditional output's standard deviation, mixed by ``amount``."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1.0 - amount) * guided
