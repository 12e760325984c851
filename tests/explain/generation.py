"""Traces from real (tiny) diffusers runs, for the tests of the perturbation and gradient tools.

The x0 of every step is read from the scheduler itself (``pred_original_sample``, or DPM-Solver's
``model_outputs[-1]``), so it is an independent reference for `explain.denoiser`.
"""

from __future__ import annotations

import copy

import torch

from explain.noise import sigma_from_alpha_bar
from explain.trace import Trace, Word


def run_and_trace(pipe, prompt: str, steps: int = 4, guidance_scale: float = 5.0, seed: int = 0, negative_prompt: str | None = None) -> Trace:
    scheduler = pipe.scheduler
    original_step = scheduler.step
    x_ts, x0s, timesteps = [], [], []

    def step(model_output, timestep, sample, *args, **kwargs):
        kwargs["return_dict"] = True
        x_ts.append(sample.detach().clone().float())
        timesteps.append(float(timestep))
        out = original_step(model_output, timestep, sample, *args, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = scheduler.model_outputs[-1]
        x0s.append(x0.detach().clone().float())
        return (out.prev_sample,)

    scheduler.step = step
    try:
        with torch.no_grad():
            out = pipe(
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            )
    finally:
        del scheduler.step
    alphas = scheduler.alphas_cumprod
    sigmas = torch.stack([sigma_from_alpha_bar(alphas[int(round(t))]) for t in timesteps]).double()
    words = [Word(w, [i + 1]) for i, w in enumerate(prompt.split())]
    tokens = ["<start>"] + prompt.split() + ["<end>"]
    meta = {"guidance_scale": guidance_scale, "height": pipe.unet.config.sample_size * pipe.vae_scale_factor}
    meta["width"] = meta["height"]
    return Trace(
        prompts=[prompt],
        tokens=[tokens],
        words=[words],
        timesteps=torch.tensor(timesteps, dtype=torch.float64),
        sigmas=sigmas,
        x_t=torch.stack(x_ts),
        x0=torch.stack(x0s),
        negative_prompts=[negative_prompt] if negative_prompt else [],
        final_latent=out.images.detach().float(),
        meta=meta,
    ).validate()


def scheduler_state(scheduler) -> dict:
    """Everything a probe could change in a scheduler, as comparable plain values."""
    state = {}
    for key, value in vars(scheduler).items():
        if isinstance(value, torch.Tensor):
            state[key] = value.clone()
        elif isinstance(value, list):
            state[key] = [v.clone() if isinstance(v, torch.Tensor) else v for v in value]
        else:
            state[key] = copy.copy(value)
    return state

def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        elif isinstance(a, list):
            assert len(a) == len(b), key
            for x, y in zip(a, b):
                assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), key
        else:
            assert a == b or a is b, key
