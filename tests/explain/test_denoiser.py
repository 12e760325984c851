import copy

import pytest
import torch

from explain.denoiser import GuidedDenoiser, NoiseLevel, from_pipeline, latent_space_of
from explain.noise import model_output_from_x0
from explain.testing import make_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline
from tests.explain.generation import run_and_trace


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


@pytest.mark.parametrize(
    "scheduler,prediction_type,space",
    [("dpm++", "epsilon", "vp"), ("ddim", "v_prediction", "vp"), ("euler", "epsilon", "sigma")],
)
def test_reproduces_the_samplers_x0_at_every_step(scheduler, prediction_type, space):
    pipe = tiny_sd_pipeline(scheduler, prediction_type)
    trace = run_and_trace(pipe, "a red circle", steps=3, guidance_scale=4.0, negative_prompt="blue")
    denoiser = from_pipeline(pipe, trace)
    assert denoiser.latent_space == space
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        scale = float(trace.x0[step].abs().max())
        assert float((x0 - trace.x0[step]).abs().max()) < 1e-4 * max(scale, 1.0), step


def test_sdxl_added_conditioning():
    pipe = tiny_sdxl_pipeline()
    trace = run_and_trace(pipe, "a blue square", steps=2, guidance_scale=3.0)
    denoiser = from_pipeline(pipe, trace)
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        assert torch.allclose(x0, trace.x0[step], rtol=1e-3, atol=1e-3 * float(trace.x0[step].abs().max()))


def test_probes_leave_the_scheduler_alone():
    pipe = tiny_sd_pipeline("dpm++")
    trace = run_and_trace(pipe, "a red circle", steps=3)
    pipe.scheduler.set_timesteps(3)
    before = scheduler_state(pipe.scheduler)
    denoiser = from_pipeline(pipe, trace)
    denoiser.predict(trace.x_t[1].expand(3, -1, -1, -1), NoiseLevel.from_trace(trace, 1), "epsilon")
    assert_same_state(before, scheduler_state(pipe.scheduler))


def _toy(prediction_type="sample", space="vp", guidance=3.0):
    g = torch.Generator().manual_seed(0)
    u_out, c_out = torch.randn(2, 1, 4, 5, 5, generator=g)

    def model_fn(x, level):
        n = x.shape[0]
        return u_out.expand(n, -1, -1, -1), c_out.expand(n, -1, -1, -1)

    return GuidedDenoiser(model_fn, prediction_type, guidance, latent_space=space), u_out, c_out


def test_guidance_combines_like_a_sampler():
    denoiser, u, c = _toy()
    x = torch.randn(2, 4, 5, 5)
    level = NoiseLevel(timestep=500, sigma=1.5)
    assert torch.allclose(denoiser.predict(x, level), (u + 3.0 * (c - u)).expand(2, -1, -1, -1))


def test_a_host_guidance_function_replaces_the_linear_combination():
    """ComfyUI's RescaleCFG-style guidance is nonlinear: it must act on the raw outputs, before
    the conversion to the requested quantity, in plain and per-token predictions alike."""
    x0_u, x0_c = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    seen = []

    def host_guidance(x, level, uncond, cond):
        seen.append((x.shape[0], level.sigma))
        return torch.tanh(uncond + 2.0 * (cond - uncond))  # anything but u + w (c - u)

    def branches(x, lv, keep=None):
        return x0_u.expand(x.shape[0], -1, -1, -1), x0_c.expand(x.shape[0], -1, -1, -1)

    plain = GuidedDenoiser(branches, "sample", 2.0, latent_space="sigma", token_model_fn=branches)
    hosted = GuidedDenoiser(branches, "sample", 2.0, latent_space="sigma", token_model_fn=branches, guide_fn=host_guidance)
    level = NoiseLevel(timestep=500, sigma=1.5)
    x = torch.randn(3, 4, 5, 5)
    expected = torch.tanh(x0_u + 2.0 * (x0_c - x0_u)).expand(3, -1, -1, -1)
    assert torch.allclose(hosted.predict(x, level, "x0"), expected)
    assert torch.allclose(hosted.predict_tokens(x, level, torch.ones(3, 7), "x0"), expected)
    assert not torch.allclose(plain.predict(x, level, "x0"), expected)
    # epsilon is derived from the guided x0, not guided itself
    assert torch.allclose(hosted.predict(x, level, "epsilon"), (x - expected) / 1.5, atol=1e-5)
    assert seen[0] == (3, 1.5)
    # DF-CAM's branches stay the model's own, combined linearly
    u, c = hosted.branches(x, level, "x0")
    assert torch.allclose(hosted.combine(u, c), plain.predict(x, level, "x0"))


def test_epsilon_from_x0_in_both_latent_spaces():
    level = NoiseLevel(timestep=500, sigma=2.0)
    x0_true = torch.randn(1, 4, 5, 5)
    eps_true = torch.randn(1, 4, 5, 5)
    for space, x in (("sigma", x0_true + 2.0 * eps_true), ("vp", (x0_true + 2.0 * eps_true) / (1 + 4.0) ** 0.5)):
        denoiser = GuidedDenoiser(lambda x, lv: (None, x0_true.expand(x.shape[0], -1, -1, -1)), "sample", 1.0, latent_space=space)
        assert torch.allclose(denoiser.predict(x, level, "epsilon"), eps_true, atol=1e-5)
        assert torch.allclose(denoiser.predict(x, level, "x0"), x0_true)


def test_v_prediction_converts_through_explain_noise():
    level = NoiseLevel(timestep=300, sigma=0.7)
    x0 = torch.randn(1, 4, 3, 3)
    x = torch.randn(1, 4, 3, 3)
    v = model_output_from_x0(x, x0, level.alpha_bar, "v_prediction")
    denoiser = GuidedDenoiser(lambda xx, lv: (None, v), "v_prediction", 1.0)
    assert torch.allclose(denoiser.predict(x, level), x0, atol=1e-5)


def test_chunked_prediction_equals_one_batch():
    pipe = tiny_sd_pipeline()
    trace = run_and_trace(pipe, "a red circle", steps=2)
    denoiser = from_pipeline(pipe, trace)
    x = trace.x_t[0].expand(5, -1, -1, -1) * torch.linspace(0.5, 1.0, 5).view(5, 1, 1, 1)
    level = NoiseLevel.from_trace(trace, 0)
    # equal up to float32 rounding (matrix kernels block differently for other batch sizes)
    assert torch.allclose(denoiser.predict(x, level, batch_size=2), denoiser.predict(x, level), rtol=1e-4, atol=1e-4)


def test_clear_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        GuidedDenoiser(lambda x, lv: (None, x), "flow", 1.0)
    with pytest.raises(ValueError, match="latent_space"):
        GuidedDenoiser(lambda x, lv: (None, x), "epsilon", 1.0, latent_space="karras")
    denoiser = GuidedDenoiser(lambda x, lv: (None, x), "epsilon", 5.0)
    with pytest.raises(ValueError, match="unconditional"):
        denoiser.predict(torch.zeros(1, 4, 2, 2), NoiseLevel(1, 1))
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        denoiser.predict(torch.zeros(4, 2, 2), NoiseLevel(1, 1))
    with pytest.raises(ValueError, match="quantity"):
        denoiser.convert(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), NoiseLevel(1, 1), "v")
    pipe = tiny_sd_pipeline()
    trace = run_and_trace(pipe, "a red circle", steps=2)
    del trace.meta["guidance_scale"]
    with pytest.raises(ValueError, match="guidance_scale"):
        from_pipeline(pipe, trace)
    with pytest.raises(IndexError, match="item 3"):
        from_pipeline(pipe, trace, item=3, guidance_scale=2.0)


def test_batch_size_follows_the_memory_budget():
    pipe = tiny_sd_pipeline()
    trace = run_and_trace(pipe, "a red circle", steps=2)
    denoiser = from_pipeline(pipe, trace)
    x = trace.x_t[0, 0]
    assert denoiser.batch_size_for(x, memory_budget=1) == 1
    one = denoiser.item_bytes(x.unsqueeze(0))
    assert denoiser.batch_size_for(x, memory_budget=5 * one) == 5
    assert denoiser.batch_size_for(x, memory_budget=10**15, limit=7) == 7
    with pytest.raises(ValueError, match="memory_budget"):
        denoiser.batch_size_for(x, memory_budget=0)


def test_latent_space_detection():
    assert latent_space_of(make_scheduler("euler_a")) == "sigma"
    assert latent_space_of(make_scheduler("heun")) == "sigma"
    assert latent_space_of(make_scheduler("pndm")) == "vp"
    assert latent_space_of(make_scheduler("ddpm")) == "vp"


@pytest.mark.parametrize("scheduler", ["dpm++", "euler_a"])
def test_agrees_with_the_diffusers_tap(scheduler):
    from explain.taps.diffusers import generate

    pipe = tiny_sd_pipeline(scheduler)
    trace, _ = generate(pipe, "a red circle", negative_prompt="blue", steps=3, guidance=4.0, seed=1, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, trace)
    assert denoiser.latent_space == trace.meta["latent_space"] == ("sigma" if scheduler == "euler_a" else "vp")
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        scale = max(float(trace.x0[step].abs().max()), 1.0)
        assert float((x0 - trace.x0[step]).abs().max()) < 1e-3 * scale, step


def test_guidance_rescale_is_read_from_the_trace_and_applied_like_diffusers():
    from explain.taps.diffusers import generate

    pipe = tiny_sd_pipeline("ddim", "v_prediction")
    trace, _ = generate(pipe, "a red circle", steps=3, guidance=6.0, seed=2, previews=False, output_type="latent", guidance_rescale=0.7)
    assert trace.meta["guidance_rescale"] == 0.7
    rescaled, plain = from_pipeline(pipe, trace), from_pipeline(pipe, trace, guidance_rescale=0.0)
    for step in range(trace.num_steps):
        level = NoiseLevel.from_trace(trace, step)
        scale = max(float(trace.x0[step].abs().max()), 1.0)
        assert float((rescaled.predict(trace.x_t[step], level) - trace.x0[step]).abs().max()) < 1e-3 * scale, step
    # plain CFG does not reproduce that sampler's x0 (so the check above can fail)
    assert float((plain.predict(trace.x_t[0], NoiseLevel.from_trace(trace, 0)) - trace.x0[0]).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="guidance_rescale must be between 0 and 1"):
        from_pipeline(pipe, trace, guidance_rescale=1.5)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_a_scale_of_one_or_less_means_no_guidance_as_in_diffusers(scale):
    from explain.taps.diffusers import generate

    pipe = tiny_sd_pipeline("dpm++")
    trace, _ = generate(pipe, "a red circle", steps=2, guidance=scale, seed=1, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, trace)
    assert not denoiser.guided
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        assert float((x0 - trace.x0[step]).abs().max()) < 1e-3 * max(float(trace.x0[step].abs().max()), 1.0), step
