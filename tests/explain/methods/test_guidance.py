import pytest
import torch

from explain.adapters.diffusers import from_pipeline, generate
from explain.denoiser import GuidedDenoiser, NoiseLevel
from explain.methods.guidance import difference_map, guidance_map
from explain.methods.sanity import is_constant, null_denoiser
from explain.testing import tiny_sd_pipeline
from explain.trace import Trace, Word

TOKENS = ["<start>", "red</w>", "blue</w>", "<end>"]
SIGMAS = [6.0, 3.0, 1.0]
GUIDANCE = 3.0


def patterns():
    """Two patterns that live in disjoint corners of an 8x8 latent: "red" top-left, "blue" bottom-right."""
    g = torch.Generator().manual_seed(0)
    red, blue = torch.zeros(2, 4, 8, 8)
    red[:, :3, :3] = torch.randn(4, 3, 3, generator=g)
    blue[:, 5:, 5:] = torch.randn(4, 3, 3, generator=g)
    return red, blue


def toy_denoiser(red_at=(0, 0)):
    """Guided, in σ space: the unconditional x0 is x / (1 + σ²) (pure identity path); the
    conditional one adds each kept word's pattern (red's rolled to ``red_at``)."""
    red, blue = patterns()
    red = torch.roll(red, shifts=red_at, dims=(1, 2))

    def x0(x, level, keep):
        s2 = level.sigma**2
        out = x / (1 + s2)
        return out + keep[:, 1].view(-1, 1, 1, 1) * red + keep[:, 2].view(-1, 1, 1, 1) * blue

    def uncond(x, level):
        return x / (1 + level.sigma**2)

    def model_fn(x, level):
        return uncond(x, level), x0(x, level, torch.ones(x.shape[0], len(TOKENS)))

    def token_model_fn(x, level, keep):
        return uncond(x, level), x0(x, level, keep)

    return GuidedDenoiser(model_fn, "sample", GUIDANCE, latent_space="sigma", token_model_fn=token_model_fn)


def toy_trace():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(SIGMAS), 1, 4, 8, 8, generator=g) * torch.tensor(SIGMAS).view(-1, 1, 1, 1, 1)
    x[:, :, :, 3:5, :] += 50.0  # a bright stripe in x_t, where no word acts: the identity path would point at it
    return Trace(
        prompts=["red blue"],
        tokens=[list(TOKENS)],
        words=[[Word("red", [1]), Word("blue", [2])]],
        timesteps=torch.tensor([900.0, 500.0, 100.0], dtype=torch.float64),
        sigmas=torch.tensor(SIGMAS, dtype=torch.float64),
        x_t=x,
        x0=x.clone(),
        final_latent=x[-1],
        meta={},
    ).validate()


def test_the_prompt_map_is_where_the_conditioning_acts_not_where_x_t_is_bright():
    red, blue = patterns()
    m = guidance_map(toy_denoiser(), toy_trace(), 1)
    assert m.against == "unconditional" and m.latent.shape == (8, 8)
    assert torch.allclose(m.latent, (red + blue).pow(2).sum(0).sqrt(), atol=1e-5)
    # the stripe rows 3-4 of x_t (50 sigma bright) leave no trace: both branches see the same x_t
    assert float(m.latent[3:5].abs().max()) < 1e-4
    assert float(m.display().max()) == 1.0 and float(m.display().min()) == 0.0


def test_a_word_map_is_that_words_region_only():
    red, blue = patterns()
    m = guidance_map(toy_denoiser(), toy_trace(), 2, words="red")
    assert m.against == "without red"
    # guided minus guided-with-red-masked = guidance × red's pattern
    assert torch.allclose(m.latent, GUIDANCE * red.pow(2).sum(0).sqrt(), atol=1e-4)
    assert float(m.latent[5:, 5:].abs().max()) < 1e-5


def test_a_counterfactual_map_covers_where_the_word_was_and_where_it_went():
    m = guidance_map(toy_denoiser(), toy_trace(), 0, counterfactual=toy_denoiser(red_at=(4, 0)))
    assert m.against == "counterfactual"
    assert float(m.latent[:3, :3].min()) > 0 and float(m.latent[4:7, :3].max()) > 0
    assert float(m.latent[:, 4:].abs().max()) < 1e-5  # blue did not move


def test_a_model_that_ignores_its_conditioning_gives_a_constant_map():
    den, trace = toy_denoiser(), toy_trace()
    level = NoiseLevel.from_trace(trace, 1)
    null = null_denoiser(den, trace.x_t[1, 0], level, "x0")
    assert is_constant(guidance_map(null, trace, 1, words=["red", "blue"]).latent)
    # the null model has no unconditional branch: the prompt map says what to pass instead
    with pytest.raises(ValueError, match="no unconditional branch"):
        guidance_map(null, trace, 1)


def test_bad_arguments_say_what_to_change():
    den, trace = toy_denoiser(), toy_trace()
    with pytest.raises(ValueError, match="either words"):
        guidance_map(den, trace, 0, words="red", counterfactual=den)
    with pytest.raises(IndexError, match="outside the trace's batch"):
        guidance_map(den, trace, 0, item=1)
    with pytest.raises(ValueError, match="token_model_fn"):
        guidance_map(GuidedDenoiser(den.model_fn, "sample", GUIDANCE, latent_space="sigma"), trace, 0, words="red")
    with pytest.raises(ValueError, match="green"):
        guidance_map(den, trace, 0, words="green")


def test_difference_map_is_the_channel_norm():
    a = torch.zeros(1, 2, 3, 3)
    b = torch.zeros(1, 2, 3, 3)
    b[0, 0, 1, 1], b[0, 1, 1, 1] = 3.0, 4.0
    assert difference_map(a, b)[1, 1] == 5.0 and float(difference_map(a, b).sum()) == 5.0


def test_on_a_traced_diffusers_pipeline_every_form_runs_and_leaves_the_model_as_it_was():
    pipe = tiny_sd_pipeline()
    trace, _ = generate(pipe, "a red circle above a blue square", steps=4, guidance=5.0, seed=0, previews=False, output_type="latent")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    den = from_pipeline(pipe, trace)
    h, w = trace.x_t.shape[-2:]
    prompt = guidance_map(den, trace, 2)
    word = guidance_map(den, trace, 2, words="red")
    swapped = guidance_map(den, trace, 2, counterfactual=from_pipeline(pipe, trace, prompt="a green circle above a blue square"))
    for m in (prompt, word, swapped):
        assert m.latent.shape == (h, w) and torch.isfinite(m.latent).all() and not is_constant(m.latent)
    # the same call twice gives the same map: no masks, no seed
    assert torch.equal(guidance_map(den, trace, 2).latent, prompt.latent)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_joint_attention_transformers_the_prompt_and_word_maps_run(family):
    from explain.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    trace, _ = generate(pipe, "a red circle above a blue square", steps=3, guidance=4.0, seed=0, previews=False, output_type="latent")
    den = from_pipeline(pipe, trace)
    h, w = trace.x_t.shape[-2:]
    for m in (guidance_map(den, trace, 1), guidance_map(den, trace, 1, counterfactual=from_pipeline(pipe, trace, prompt="a green circle above a blue square"))):
        assert m.latent.shape == (h, w) and torch.isfinite(m.latent).all() and not is_constant(m.latent)
