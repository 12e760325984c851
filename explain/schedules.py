"""Exponential time-step sampling (Park, Ju & Lee 2024, §4 of the methods reference).

With ``T`` training timesteps, ``N`` steps and an integer shift ``λ ≥ 0``, let
``α = T ** (1 / (N + λ))`` so that ``α ** (N + λ) = T``. Then

* **early** ("semantic" in the paper's notebooks): ``999, T-⌊α^(λ+1)⌋, …, T-⌊α^(λ+N-1)⌋``,
  dense at high noise, where layout and semantics form;
* **latter** ("delicate"): ``999, ⌊α^(λ+N-1)⌋, …, ⌊α^(λ+1)⌋``, a geometric sequence dense at
  low noise, where detail and texture form;
* **uniform** (also what ``λ = 0`` gives for any schedule): the scheduler's own spacing.

The values reproduce the paper's code exactly, including its use of ``int()`` truncation and
its two floating-point guards (``α^(N+λ)`` is 1000.0000000000017 for N=20, λ=10 and
999.99999… for N=20, λ=60).

**When early and latter swap.** λ sets the band the steps cover, not only how they crowd: as λ
grows both bands shrink toward the middle and eventually cross, so "early" spends its steps at
*lower* noise than "latter" (N=30, λ=290: early is 466…22, latter 978…534). We call the names
valid while the mean timestep visited by "early" (without the shared leading 999) stays above
that of "latter"; past that point `exponential_timesteps` warns with `ScheduleSwapWarning`.
The crossing comes at λ = 35, 69, 102 and 169 for N = 10, 20, 30 and 50, so the paper's λ = 60
with N = 30 (and N = 20) is on the valid side. (Comparing band *centres* instead would already
flag λ = 60 at N = 30, whose steps are nonetheless clearly placed early / late, so we do not use
it.)
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

SCHEDULES = ("uniform", "early", "latter")
ALIASES = {"semantic": "early", "delicate": "latter"}
TRAIN_TIMESTEPS = 1000


class ScheduleSwapWarning(UserWarning):
    """λ is so large that the "early" schedule visits lower noise levels than "latter"."""


def _check(steps: int, lam: int, train_timesteps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(lam, int) or isinstance(lam, bool) or lam < 0:
        raise ValueError(f"lam (λ) must be a non-negative integer, got {lam!r}; the paper uses 60")
    if steps >= train_timesteps:
        raise ValueError(f"steps ({steps}) must be fewer than the {train_timesteps} training timesteps")


def _alpha(steps: int, lam: int, train_timesteps: int) -> float:
    return math.exp(math.log(train_timesteps) / (steps + lam))


def early_timesteps(steps: int, lam: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """999, then T - ⌊α^(λ+j)⌋ for j = 1 … N-1 (dense at high noise)."""
    _check(steps, lam, train_timesteps)
    alpha = _alpha(steps, lam, train_timesteps)
    values = [train_timesteps - int(alpha ** (lam + j)) for j in range(1, steps + 1)]
    # The last value is T - ⌊T⌋ ≈ 0 (or 1 when α^(N+λ) rounds just below T); the paper drops it.
    return [train_timesteps - 1] + values[:-1]


def latter_timesteps(steps: int, lam: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """⌊α^(λ+j)⌋ for j = 1 … N, descending, the top one capped at 999 (dense at low noise)."""
    _check(steps, lam, train_timesteps)
    alpha = _alpha(steps, lam, train_timesteps)
    values = sorted((int(alpha ** (lam + j)) for j in range(1, steps + 1)), reverse=True)
    if values[0] >= train_timesteps:
        values[0] = train_timesteps - 1
    return values


def schedules_swapped(steps: int, lam: int, train_timesteps: int = TRAIN_TIMESTEPS) -> bool:
    """True when "early" visits, on average, lower timesteps than "latter" (see the module doc)."""
    if lam == 0 or steps < 2:
        return False
    early = early_timesteps(steps, lam, train_timesteps)[1:]
    latter = latter_timesteps(steps, lam, train_timesteps)[1:]
    return sum(early) / len(early) <= sum(latter) / len(latter)


def exponential_timesteps(
    steps: int, schedule: str = "uniform", lam: int = 60, train_timesteps: int = TRAIN_TIMESTEPS, warn: bool = True
) -> list[int] | None:
    """The paper's time steps for ``schedule`` ("uniform", "early"/"semantic",
    "latter"/"delicate"), descending; ``None`` for "uniform" or ``lam == 0``, meaning "keep the
    scheduler's own spacing"."""
    name = normalize_schedule(schedule)
    _check(steps, lam, train_timesteps)
    if name == "uniform" or lam == 0:
        return None
    if warn and schedules_swapped(steps, lam, train_timesteps):
        warnings.warn(
            f"with λ={lam} and {steps} steps the 'early' schedule spends its steps at lower noise than "
            f"'latter' (the bands have crossed), so the names no longer describe them; use a smaller λ "
            f"(below {swap_threshold(steps, train_timesteps)} for {steps} steps; the paper uses 60)",
            ScheduleSwapWarning,
            stacklevel=2,
        )
    fn = early_timesteps if name == "early" else latter_timesteps
    values = fn(steps, lam, train_timesteps)
    if len(set(values)) < len(values):
        # ⌊·⌋ maps neighbouring exponents to one timestep when α is close to 1 (small λ, many
        # steps); a repeated timestep is a zero-length step, and DPM-Solver++ divides by it.
        fits = next((k for k in range(lam + 1, 10 * (lam + steps)) if len(set(fn(steps, k, train_timesteps))) == steps), None)
        hint = f"λ={fits} is the smallest larger λ that works" if fits is not None else "use fewer steps"
        raise ValueError(
            f"with λ={lam} and {steps} steps the {name!r} schedule repeats time steps "
            f"({len(values) - len(set(values))} duplicates after the paper's integer rounding); {hint}"
        )
    return values


def swap_threshold(steps: int, train_timesteps: int = TRAIN_TIMESTEPS, max_lam: int = 10_000) -> int:
    """The smallest λ at which `schedules_swapped` is true for ``steps`` steps."""
    for lam in range(1, max_lam):
        if schedules_swapped(steps, lam, train_timesteps):
            return lam
    return max_lam


def normalize_schedule(schedule: str) -> str:
    name = str(schedule).strip().lower()
    name = ALIASES.get(name, name)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} (or semantic/delicate)")
    return name


# ---------------------------------------------------------------------------- k-diffusion / ComfyUI
def sd_alphas_cumprod(
    train_timesteps: int = TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's "scaled linear" noise schedule, float64 ``[T]``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_timesteps(timesteps: Sequence[int], alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """k-diffusion noise levels σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for integer ``timesteps``, with the
    final 0 a k-diffusion / ComfyUI sampler expects (``[N + 1]``, float32, descending)."""
    from explain.noise import sigma_from_alpha_bar

    ac = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("no time steps given")
    if int(t.min()) < 0 or int(t.max()) >= ac.shape[0]:
        raise ValueError(f"time steps must lie in 0..{ac.shape[0] - 1}, got {t.min().item()}..{t.max().item()}")
    sigmas = sigma_from_alpha_bar(ac[t])
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def uniform_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """Evenly spaced integer timesteps from T-1 down to 0 (diffusers' "linspace" spacing)."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    values = torch.linspace(0, train_timesteps - 1, steps, dtype=torch.float64).round().long().flip(0)
    return [int(v) for v in values]


def exponential_sigmas(
    steps: int,
    schedule: str = "early",
    lam: int = 60,
    alphas_cumprod: torch.Tensor | None = None,
    warn: bool = True,
) -> torch.Tensor:
    """The paper's schedule as a k-diffusion / ComfyUI ``SIGMAS`` tensor ``[N + 1]`` (ending in 0).
    ``alphas_cumprod`` defaults to Stable Diffusion's; pass the model's own (ComfyUI:
    ``1 / (1 + model_sampling.sigmas ** 2)``). "uniform" gives linspace-spaced timesteps."""
    ac = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    train = int(ac.shape[0])
    timesteps = exponential_timesteps(steps, schedule, lam, train, warn=warn)
    if timesteps is None:
        timesteps = uniform_timesteps(steps, train)
    return sigmas_from_timesteps(timesteps, ac)
