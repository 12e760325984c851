import pytest
import torch

from explain.adapters.diffusers import from_pipeline, latent_space_of
from explain.denoiser import GuidedDenoiser, NoiseLevel
from explain.testing import make_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline
from tests.explain.generation import assert_same_state, run_and_trace, scheduler_state


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

def test_latent_space_detection():
    assert latent_space_of(make_scheduler("euler_a")) == "sigma"
    assert latent_space_of(make_scheduler("heun")) == "sigma"
    assert latent_space_of(make_scheduler("pndm")) == "vp"
    assert latent_space_of(make_scheduler("ddpm")) == "vp"

@pytest.mark.parametrize("scheduler", ["dpm++", "euler_a"])
def test_agrees_with_the_diffusers_tap(scheduler):
    from explain.adapters.diffusers import generate

    pipe = tiny_sd_pipeline(scheduler)
    trace, _ = generate(pipe, "a red circle", negative_prompt="blue", steps=3, guidance=4.0, seed=1, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, trace)
    assert denoiser.latent_space == trace.meta["latent_space"] == ("sigma" if scheduler == "euler_a" else "vp")
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        scale = max(float(trace.x0[step].abs().max()), 1.0)
        assert float((x0 - trace.x0[step]).abs().max()) < 1e-3 * scale, step

def test_guidance_rescale_is_read_from_the_trace_and_applied_like_diffusers():
    from explain.adapters.diffusers import generate

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
    from explain.adapters.diffusers import generate

    pipe = tiny_sd_pipeline("dpm++")
    trace, _ = generate(pipe, "a red circle", steps=2, guidance=scale, seed=1, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, trace)
    assert not denoiser.guided
    for step in range(trace.num_steps):
        x0 = denoiser.predict(trace.x_t[step], NoiseLevel.from_trace(trace, step))
        assert float((x0 - trace.x0[step]).abs().max()) < 1e-3 * max(float(trace.x0[step].abs().max()), 1.0), step
