
import pytest
import torch

from explain.adapters.diffusers import from_pipeline
from explain.denoiser import GuidedDenoiser, NoiseLevel
from explain.noise import model_output_from_x0
from explain.testing import tiny_sd_pipeline
from tests.explain.generation import run_and_trace


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


def test_flow_latent_space_converts_velocities_and_refuses_mismatched_types():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    level = NoiseLevel(timestep=700.0, sigma=0.7)
    x = 0.3 * x0 + 0.7 * eps
    u_v, c_v = eps - x0 + 0.1, eps - x0  # the two branches' velocities
    den = GuidedDenoiser(lambda x_, lv: (u_v, c_v), "flow", 3.0, latent_space="flow")
    guided_v = u_v + 3.0 * (c_v - u_v)
    assert torch.allclose(den.predict(x, level, "x0"), x - 0.7 * guided_v, atol=1e-6)
    assert torch.allclose(den.convert(x, c_v, level, "epsilon"), eps, atol=1e-5)
    assert torch.allclose(den.convert(x, c_v, level, "x0"), x0, atol=1e-5)
    with pytest.raises(ValueError, match="need latent_space='flow'"):
        GuidedDenoiser(lambda x_, lv: (None, x_), "flow", 1.0, latent_space="vp")
    with pytest.raises(ValueError, match="prediction_type in the 'flow' latent space"):
        GuidedDenoiser(lambda x_, lv: (None, x_), "v_prediction", 1.0, latent_space="flow")
