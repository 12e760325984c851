"""diffusers schedulers: which latent space they keep, and the paper's time steps as pipeline arguments."""

from __future__ import annotations

import inspect

from explain.schedules import TRAIN_TIMESTEPS, exponential_timesteps, normalize_schedule


def latent_space_of(scheduler) -> str:
    """``"sigma"`` for diffusers schedulers that keep latents as x0 + σε (Euler, Heun, LMS, ...),
    else ``"vp"``. Read from ``init_noise_sigma`` so that nothing in the scheduler is touched."""
    try:
        init = float(scheduler.init_noise_sigma)
    except Exception:  # noqa: BLE001 - a scheduler without the attribute is a VP one
        return "vp"
    return "sigma" if init > 1.0 + 1e-4 else "vp"


def scheduler_accepts(scheduler, argument: str) -> bool:
    return argument in inspect.signature(scheduler.set_timesteps).parameters


def check_scheduler_accepts_timesteps(scheduler) -> None:
    """Raise a clear error if ``scheduler.set_timesteps`` takes no custom ``timesteps=`` list."""
    if not scheduler_accepts(scheduler, "timesteps"):
        name = type(scheduler).__name__
        raise ValueError(
            f"{name} cannot run custom time steps (its set_timesteps has no `timesteps=` argument), so "
            "the 'early'/'latter' schedules cannot be used with it; switch the pipeline to a scheduler "
            "that can, e.g. pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) "
            "(also DDPM, Euler, Heun, LCM, TCD), or use schedule='uniform'"
        )


def use_paper_scheduler_if_needed(pipe, schedule: str) -> str | None:
    """Swap in DPM-Solver++ (the paper's scheduler) when ``schedule`` needs custom time steps that
    the pipeline's scheduler cannot take (SD 1.x ships PNDM, SD 2.x DDIM); returns the replaced
    scheduler's name, or None when nothing changed."""
    if normalize_schedule(schedule) == "uniform" or scheduler_accepts(pipe.scheduler, "timesteps"):
        return None
    from diffusers import DPMSolverMultistepScheduler

    old = type(pipe.scheduler).__name__
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return old


def diffusers_timesteps(scheduler, steps: int, schedule: str = "uniform", lam: int = 60) -> dict:
    """Keyword arguments for a diffusers pipeline call: ``{"num_inference_steps": N}`` for
    "uniform", ``{"timesteps": [...]}`` otherwise (after checking the scheduler accepts them)."""
    train = int(getattr(scheduler.config, "num_train_timesteps", TRAIN_TIMESTEPS))
    timesteps = exponential_timesteps(steps, schedule, lam, train)
    if timesteps is None:
        return {"num_inference_steps": steps}
    check_scheduler_accepts_timesteps(scheduler)
    return {"timesteps": timesteps}
