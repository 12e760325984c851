"""SD3 (MMDiT joint attention) through the diffusers adapter, on tiny random-weight pipelines."""

import numpy as np
import pytest
import torch

from explain.adapters.diffusers import from_pipeline, generate, trace, vae_decoder
from explain.denoiser import NoiseLevel
from explain.testing import tiny_sd3_pipeline
from tests.explain.adapters.diffusers.joint_reference import JointReference, euler_flow_residual

torch.set_num_threads(1)

PROMPT = "a red circle above a blue square"
T5_LENGTH = 16


def _run(pipe, prompt=PROMPT, steps=3, guidance=5.0, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("max_sequence_length", T5_LENGTH)
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


@pytest.mark.parametrize("options", [{}, {"maps": "output"}, {"joint_rows": "raw", "keep_layers": True}, {"concepts": ["circle", "zebra"]}])
def test_tapped_images_equal_untapped_ones_bit_for_bit(pipe, options):
    plain = _run(pipe, negative_prompt="green")
    with trace(pipe, previews=False, **options) as tr:
        tapped = _run(pipe, negative_prompt="green")
    assert np.array_equal(plain, tapped)
    assert tr.trace.meta["family"] == "sd3" and tr.trace.num_steps == 3
    assert type(pipe.transformer.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"  # restored


def test_sd35_style_qk_norm_is_traced_and_left_identical():
    pipe = tiny_sd3_pipeline(qk_norm="rms_norm", seed=3)
    plain = _run(pipe)
    with trace(pipe, previews=False) as tr, JointReference(pipe, "sd3") as ref:
        tapped = _run(pipe)
    assert np.array_equal(plain, tapped)
    t = tr.trace
    expected = ref.step_map(0, t.latent_size, t.meta["text_positions"], rows=slice(1, 2))
    assert torch.allclose(t.attention[0], expected, atol=1e-5)


@pytest.mark.parametrize("joint_rows", ["renormalized", "raw"])
def test_maps_equal_an_explicit_softmax_over_the_joint_keys(pipe, joint_rows):
    with trace(pipe, previews=False, joint_rows=joint_rows, keep_layers=True, layer_dtype=torch.float32) as tr, JointReference(pipe, "sd3", renormalize=joint_rows == "renormalized") as ref:
        _run(pipe, negative_prompt="green")
    t = tr.trace
    positions = t.meta["text_positions"]
    assert t.meta["joint_rows"] == joint_rows and t.meta["maps"] == "attention"
    for step in range(t.num_steps):
        # model batch [uncond; cond]: the conditional row is the second
        expected = ref.step_map(step, t.latent_size, positions, rows=slice(1, 2))
        assert torch.allclose(t.attention[step], expected, atol=1e-5), step
        negative = ref.step_map(step, t.latent_size, _negative_positions(t), rows=slice(0, 1))
        assert torch.allclose(t.attention_negative[step], negative, atol=1e-5), step
    # per layer, at the 8×8 token grid, and the last (context_pre_only) block is traced too
    layer = t.attention_layers["transformer_blocks.2.attn"]
    assert layer.shape == (3, 1, len(positions), 8, 8)
    own = ref.calls[0]["transformer_blocks.2.attn"][1:2][:, :, positions]
    assert torch.allclose(layer[0], own.transpose(1, 2).reshape(1, len(positions), 8, 8).float(), atol=1e-5)
    # renormalised rows sum to 1 over the whole text context (pads included), raw rows to the text's share
    full = torch.stack(list(ref.calls[0].values())).mean(0).sum(-1)
    if joint_rows == "renormalized":
        assert torch.allclose(full, torch.ones_like(full), atol=1e-6)
    else:
        assert float(full.max()) < 1 and float(full.min()) > 0


def _negative_positions(t):
    """The negative branch's kept context positions: its own CLIP part, then its T5 part from 77."""
    tokens = t.negative_tokens[0]
    clip = next(i for i, tok in enumerate(tokens) if tok.startswith("\u2581") or tok == "</s>")
    return list(range(clip)) + [77 + i for i in range(len(tokens) - clip)]


def test_context_is_clip_then_t5_and_words_cover_both(pipe):
    with trace(pipe, previews=False) as tr:
        _run(pipe, guidance=1.0)
    t = tr.trace
    assert t.meta["text_layout"] == [["clip", 9], ["t5", 8]]
    assert t.meta["text_positions"] == list(range(9)) + list(range(77, 85)) and t.meta["max_sequence_length"] == T5_LENGTH
    assert t.tokens[0][0] == "<|startoftext|>" and t.tokens[0][9] == "\u2581a" and t.tokens[0][-1] == "</s>"
    circle = t.word("circle")
    assert circle.token_indices == [3, 11]
    assert not t.meta["guided"] and t.attention_negative is None


def test_x0_is_the_flow_prediction_the_scheduler_steps_with(pipe):
    with trace(pipe, previews=True) as tr:
        _run(pipe, steps=4)
    t = tr.trace
    assert t.meta["latent_space"] == "flow" and t.meta["prediction_type"] == "flow"
    assert torch.allclose(t.sigmas, pipe.scheduler.sigmas[:-1].double(), atol=1e-7)
    assert torch.allclose(t.timesteps, pipe.scheduler.timesteps.double())
    assert euler_flow_residual(t) < 1e-5
    assert torch.equal(t.x0[-1], t.final_latent)  # the last Euler step goes to σ = 0: it *is* x0
    assert t.x0_previews.shape[:2] == (4, 1) and t.images.shape == (1, 32, 32, 3)


def test_batch_of_two_and_non_square(pipe):
    prompts = ["a red circle", "a blue square above a green triangle"]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with trace(pipe, previews=False) as tr:
        _run(pipe, prompts, generator=gens, height=24, width=32, negative_prompt="green")
    t = tr.trace
    assert t.x_t.shape == (3, 2, 4, 12, 16) and t.attention.shape[-2:] == (12, 16)
    assert t.prompts == prompts and t.word("triangle", item=1).token_indices
    assert t.meta["height"] == 24 and t.meta["width"] == 32
    for item, prompt in enumerate(prompts):
        with trace(pipe, previews=False) as single:
            _run(pipe, prompt, generator=torch.Generator().manual_seed(item + 1), height=24, width=32, negative_prompt="green")
        s = single.trace
        n = s.attention.shape[2]
        clip = s.meta["text_layout"][0][1]
        batch_clip = t.meta["text_layout"][0][1]
        # same positions: the single run's CLIP and T5 parts inside the batch's longer ones
        picks = list(range(clip)) + [batch_clip + i for i in range(n - clip)]
        assert torch.allclose(t.attention[0, item, picks], s.attention[0, 0], atol=1e-5)


def test_skip_layer_guidance_calls_are_not_recorded(pipe):
    with trace(pipe, previews=False) as tr:
        _run(pipe, steps=4, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    t = tr.trace
    assert t.num_steps == 4 and t.meta["model_calls"] > 4
    with trace(pipe, previews=False) as plain:
        _run(pipe, steps=4)
    assert torch.allclose(t.attention[0], plain.trace.attention[0], atol=1e-6)


def test_without_t5_generate_keeps_the_context_to_clip():
    pipe = tiny_sd3_pipeline(t5=False)
    result, _ = generate(pipe, PROMPT, steps=2, guidance=4.0, height=32, width=32, previews=False, output_type="latent")
    assert result.meta["max_sequence_length"] == 0 and result.meta["t5"] is False
    assert result.meta["text_layout"] == [["clip", 9]]
    assert result.attention.shape[2] == 9


def test_probes_reproduce_the_traced_x0(pipe):
    result, _ = generate(pipe, PROMPT, negative_prompt="green", steps=3, guidance=4.0, height=32, width=32, previews=False,
                         output_type="latent", max_sequence_length=T5_LENGTH)
    denoiser = from_pipeline(pipe, result)
    assert denoiser.latent_space == "flow" and denoiser.prediction_type == "flow" and denoiser.guided
    for step in range(result.num_steps):
        level = NoiseLevel.from_trace(result, step)
        x0 = denoiser.predict(result.x_t[step], level)
        assert float((x0 - result.x0[step]).abs().max()) < 1e-4 * max(1.0, float(result.x0[step].abs().max())), step
    level = NoiseLevel.from_trace(result, 1)
    keep = torch.ones(1, result.attention.shape[2])
    assert torch.allclose(denoiser.predict_tokens(result.x_t[1], level, keep), denoiser.predict(result.x_t[1], level), atol=1e-5)
    keep[0, result.word("circle").token_indices] = 0  # the word's CLIP and T5 positions
    assert not torch.allclose(denoiser.predict_tokens(result.x_t[1], level, keep), denoiser.predict(result.x_t[1], level), atol=1e-4)
    # the probe at another guidance does not reproduce it (so the check above can fail)
    other = from_pipeline(pipe, result, guidance_scale=1.0)
    assert float((other.predict(result.x_t[1], level) - result.x0[1]).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def traced(pipe):
    result, _ = generate(pipe, PROMPT, steps=3, guidance=4.0, height=32, width=32, previews=False, output_type="latent",
                         max_sequence_length=T5_LENGTH)
    return result


def test_df_rise_matches_its_per_mask_reference(pipe, traced):
    from explain.methods.rise import MaskSampler, df_rise
    from explain.similarity import get_similarity

    denoiser = from_pipeline(pipe, traced)
    # the published estimator (uncentered, zeroed pixels, per-pixel score), which the loop below writes out
    result = df_rise(denoiser, traced, step=1, n_masks=6, similarity="structure", masks="bernoulli", p=0.5, seed=3, batch_size=4,
                     centered=False, perturbation="zero", score="map", quantity="x0")
    level = NoiseLevel.from_trace(traced, 1)
    x = traced.x_t[1, 0]
    reference = denoiser.predict(x.unsqueeze(0), level)
    masks = MaskSampler((16, 16), "bernoulli", 0.5, 8, 3).masks(0, 6)
    sim = get_similarity("structure")
    total = torch.zeros(16, 16)
    for m in masks:
        pred = denoiser.predict((x * m).unsqueeze(0), level)  # one mask per forward
        total += m * sim(pred, reference)[0]
    assert torch.allclose(result.saliency, total / (6 * 0.5), atol=1e-4)


def test_df_cam_over_transformer_blocks_equals_one_pass_per_block_and_grad_cam_by_hand(pipe, traced):
    from explain.methods.cam import all_layers, df_cam, grad_cam

    denoiser = from_pipeline(pipe, traced)
    names = all_layers(denoiser.modules)
    assert names == [f"transformer_blocks.{i}" for i in range(3)]
    together = df_cam(denoiser, traced, step=1, layers="paper")
    assert together.latent.shape == (16, 16) and set(together.layers) == set(names)
    for name in names:
        alone = df_cam(denoiser, traced, step=1, layers=[name])
        assert torch.allclose(alone.layers[name], together.layers[name], atol=1e-6), name
    # by hand for block 1: image tokens [2, 64, 32] -> [2, 32, 8, 8], gradient of Σ ε̂ over both branches
    block = pipe.transformer.transformer_blocks[1]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    try:
        x = traced.x_t[1, 0:1].clone().requires_grad_(True)
        u, c = denoiser.branches(x, NoiseLevel.from_trace(traced, 1), "epsilon")
        (grad,) = torch.autograd.grad(u.sum() + c.sum(), seen[0])
    finally:
        handle.remove()
    to_grid = lambda t: t.transpose(1, 2).reshape(2, -1, 8, 8)  # noqa: E731
    by_hand = grad_cam(to_grid(seen[0].detach()), to_grid(grad), denoiser.guidance_scale, True)[0]
    assert torch.allclose(together.layers["transformer_blocks.1"], by_hand, atol=1e-5)
    assert not any(p.grad is not None for p in pipe.transformer.parameters())


def test_games_match_their_reference_and_run_in_image_space(pipe, traced):
    from explain.methods.faithfulness import game_latents, insertion_deletion, random_saliency, saliency_order

    denoiser = from_pipeline(pipe, traced)
    saliency = random_saliency((16, 16), seed=1)
    # the paper's game (blurred / zeroed positions, scored everywhere), which the loop below writes out
    games = insertion_deletion(denoiser, traced, 1, saliency, stride=64, decode=vae_decoder(pipe.vae), batch_size=3, removal="paper", score="all")
    level = NoiseLevel.from_trace(traced, 1)
    x = traced.x_t[1, 0]
    reference = denoiser.predict(x.unsqueeze(0), level)
    for mode, game in games.items():
        latents = game_latents(x, saliency_order(saliency, (16, 16), 0), mode, 64)
        expected = torch.stack([((denoiser.predict(z.unsqueeze(0), level) - reference) ** 2).mean() for z in latents])
        assert torch.allclose(game.latent_curve, expected, atol=1e-6), mode
        assert game.image_curve is not None and game.image_curve.shape == expected.shape
    assert float(games["deletion"].latent_curve[0]) < 1e-10  # nothing deleted yet: the reference itself


def test_concept_scores_recovery_and_heatmaps_read_the_trace(traced):
    from explain.methods.concepts import concept_scores
    from explain.methods.heatmaps import attention_maps
    from explain.methods.recovery import trace_recovery

    scores = concept_scores(traced)
    assert scores is not None
    view = trace_recovery(traced)
    assert view.recovered_fraction.shape == (3, 1)
    assert attention_maps(traced).shape[-2:] == (16, 16)


@pytest.mark.parametrize("schedule", ["early", "latter"])
def test_exponential_schedules_run_as_flow_sigmas(pipe, schedule):
    from explain.adapters.diffusers.schedules import flow_sigmas
    from explain.schedules import exponential_timesteps

    result, _ = generate(pipe, PROMPT, steps=5, guidance=3.0, height=32, width=32, previews=False, output_type="latent",
                         schedule=schedule, lam=10, max_sequence_length=T5_LENGTH)
    wanted = torch.tensor(flow_sigmas(exponential_timesteps(5, schedule, 10)), dtype=torch.float64)
    shift = float(pipe.scheduler.config.shift)
    shifted = shift * wanted / (1 + (shift - 1) * wanted)  # the scheduler's own shift, as for its uniform schedule
    assert torch.allclose(result.sigmas, shifted, atol=1e-6)
    assert float(result.sigmas[0]) == pytest.approx(1.0)
    assert result.meta["schedule"] == schedule
