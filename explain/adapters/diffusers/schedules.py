"""diffusers schedulers: which latent space they keep, and the paper's time steps as pipeline arguments.

Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``, SD3 and Flux) keep
x = (1-σ)·x0 + σ·ε and take custom schedules as ``sigmas=``. The paper's exponential timesteps
t_k (integers in 0..T-1, T = 1000) map to σ_k = (t_k + 1) / T: the paper's first step, 999,
becomes pure noise σ = 1 as the pipelines' own schedule starts, and the spacing is the
paper's. Those σ_k replace the pipeline's own ``linspace(1, 1/N, N)`` *before* the scheduler's
shift (SD3's fixed ``shift``, Flux's resolution-dependent one), which then bends them toward high
noise exactly as it bends the uniform schedule: "early" stays dense at high noise and "latter"
at low noise, at the noise levels the model was trained to expect.
"""

from __future__ import annotations

import inspect

from explain.schedules import TRAIN_TIMESTEPS, exponential_timesteps, normalize_schedule


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` keeps flow-matching latents (1-σ)·x0 + σ·ε (diffusers' FlowMatch* schedulers)."""
    name = type(scheduler).__name__
    return name.startswith("FlowMatch") or (hasattr(scheduler, "scale_noise") and not hasattr(scheduler, "alphas_cumprod"))


def latent_space_of(scheduler) -> str:
    """``"flow"`` for flow-matching schedulers, ``"sigma"`` for diffusers schedulers that keep
    latents as x0 + σε (Euler, Heun, LMS, ...), else ``"vp"``. Read from the class and
    ``init_noise_sigma`` so that nothing in the scheduler is touched."""
    if is_flow_matching(scheduler):
        return "flow"
    try:
        init = float(scheduler.init_noise_sigma)
    except Exception:  # noqa: BLE001 - a scheduler without the attribute is a VP one
        return "vp"
    return "sigma" if init > 1.0 + 1e-4 else "vp"


def prediction_type_of(scheduler) -> str:
    """What the model's output is: ``"flow"`` (velocity ε - x0) under a flow-matching scheduler,
    else the scheduler's ``prediction_type`` (ε by default)."""
    if is_flow_matching(scheduler):
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon")


def flow_sigmas(timesteps: list[int], train_timesteps: int = TRAIN_TIMESTEPS) -> list[float]:
    """The paper's integer timesteps as unshifted flow-matching σ: (t + 1) / T (see the module doc)."""
    sigmas = [(int(t) + 1) / train_timesteps for t in timesteps]
    if any(not 0.0 < s <= 1.0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"flow-matching σ must fall strictly within (0, 1], got {sigmas}")
    return sigmas


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
    "uniform", ``{"timesteps": [...]}`` otherwise (after checking the scheduler accepts them);
    flow-matching schedulers get ``{"sigmas": [...]}`` (`flow_sigmas`)."""
    train = int(getattr(scheduler.config, "num_train_timesteps", TRAIN_TIMESTEPS))
    timesteps = exponential_timesteps(steps, schedule, lam, train)
    if timesteps is None:
        return {"num_inference_steps": steps}
    if is_flow_matching(scheduler):
        if not scheduler_accepts(scheduler, "sigmas"):
            raise ValueError(f"{type(scheduler).__name__} takes no custom sigmas, so the 'early'/'latter' schedules cannot run on it; use schedule='uniform'")
        return {"sigmas": flow_sigmas(timesteps, train), "num_inference_steps": steps}
    check_scheduler_accepts_timesteps(scheduler)
    return {"timesteps": timesteps}
