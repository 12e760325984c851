"""Flux (double- and single-stream blocks, packed latents, RoPE) through the diffusers adapter,
on tiny random-weight pipelines: true CFG and guidance-distilled."""

import copy

import numpy as np
import pytest
import torch

from explain.adapters.diffusers import from_pipeline, generate, trace
from explain.adapters.diffusers.families.flux import pack_latents, unpack_latents
from explain.denoiser import NoiseLevel
from explain.testing import tiny_flux_pipeline
from tests.explain.adapters.diffusers.joint_reference import JointReference, euler_flow_residual

torch.set_num_threads(1)

PROMPT = "a red circle above a blue square"


def _run(pipe, prompt=PROMPT, steps=3, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("max_sequence_length", 16)
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def distilled():
    return tiny_flux_pipeline(guidance_embeds=True, seed=1)


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 12, 16)
    packed = FluxPipeline._pack_latents(x, 2, 4, 12, 16)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, (6, 8)), FluxPipeline._unpack_latents(packed, 24, 32, 2))
    with pytest.raises(ValueError, match="even sides"):
        pack_latents(torch.zeros(1, 4, 5, 4))


@pytest.mark.parametrize("options", [{}, {"maps": "output"}, {"joint_rows": "raw"}, {"concepts": ["circle", "zebra"], "maps": "output"}])
def test_tapped_images_equal_untapped_ones_bit_for_bit(pipe, options):
    kwargs = dict(negative_prompt="green", true_cfg_scale=4.0)
    plain = _run(pipe, **kwargs)
    with trace(pipe, previews=False, **options) as tr:
        tapped = _run(pipe, **kwargs)
    assert np.array_equal(plain, tapped)
    assert tr.trace.meta["family"] == "flux"
    assert type(pipe.transformer.single_transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"


@pytest.mark.parametrize("joint_rows", ["renormalized", "raw"])
def test_maps_equal_an_explicit_softmax_of_the_rotated_queries_and_keys(pipe, joint_rows):
    renormalize = joint_rows == "renormalized"
    with trace(pipe, previews=False, joint_rows=joint_rows, keep_layers=True, layer_dtype=torch.float32) as tr, \
            JointReference(pipe, "flux", renormalize=renormalize) as ref, \
            JointReference(pipe, "flux", renormalize=renormalize, rotate_keys=False) as unrotated:
        _run(pipe, negative_prompt="green", true_cfg_scale=4.0)
    t = tr.trace
    positions = t.meta["text_positions"]
    assert positions == list(range(8))
    # two batch-1 calls per step, the conditional one first
    assert len(ref.calls) == 2 * t.num_steps and t.meta["model_calls"] == 2 * t.num_steps
    for step in range(t.num_steps):
        expected = ref.step_map(2 * step, t.latent_size, positions)
        assert torch.allclose(t.attention[step], expected, atol=1e-5), step
        negative = ref.step_map(2 * step + 1, t.latent_size, range(t.attention_negative.shape[2]))
        assert torch.allclose(t.attention_negative[step], negative, atol=1e-5), step
    # single-stream blocks are traced with the text length from the transformer's input
    assert {"transformer_blocks.1.attn", "single_transformer_blocks.1.attn"} <= set(t.attention_layers)
    own = ref.calls[0]["single_transformer_blocks.1.attn"][:, :, positions]
    layer = t.attention_layers["single_transformer_blocks.1.attn"][0]
    assert torch.allclose(layer, own.transpose(1, 2).reshape(1, 8, 8, 8).float(), atol=1e-5)
    # the rotation matters: maps from unrotated queries and keys are measurably different
    plain = unrotated.step_map(0, t.latent_size, positions)
    assert float((plain - t.attention[0]).abs().sum() / t.attention[0].abs().sum()) > 0.01


def test_true_cfg_branches_scales_and_negative_tokens(pipe):
    with trace(pipe, previews=False) as tr:
        _run(pipe, negative_prompt="green triangle", true_cfg_scale=3.5)
    t = tr.trace
    assert t.meta["guided"] and t.meta["guidance_scale"] == 3.5 and t.meta["true_cfg_scale"] == 3.5
    assert "embedded_guidance" not in t.meta
    assert t.negative_prompts == ["green triangle"] and t.negative_tokens[0] == ["\u2581green", "\u2581triangle", "</s>"]
    # the conditional maps equal an unguided run's, the negative ones an unguided run of the negative prompt
    with trace(pipe, previews=False) as cond:
        _run(pipe)
    with trace(pipe, previews=False) as neg:
        _run(pipe, "green triangle")
    assert not cond.trace.meta["guided"] and cond.trace.meta["guidance_scale"] == 1.0
    assert torch.allclose(t.attention[0], cond.trace.attention[0], atol=1e-6)
    assert torch.allclose(t.attention_negative[0], neg.trace.attention[0], atol=1e-6)
    assert not torch.allclose(t.attention[0, :, :2], t.attention_negative[0, :, :2], atol=1e-3)


def test_x0_unpacked_and_the_flow_prediction_the_scheduler_steps_with(pipe):
    with trace(pipe, previews=True) as tr:
        images = _run(pipe, steps=4, height=24, width=32, negative_prompt="green", true_cfg_scale=2.0)
    t = tr.trace
    assert t.x_t.shape == t.x0.shape == (4, 1, 4, 12, 16) and t.attention.shape[-2:] == (12, 16)
    assert t.meta["height"] == 24 and t.meta["width"] == 32 and t.images.shape == (1, 24, 32, 3)
    assert t.meta["latent_space"] == "flow" and t.meta["prediction_type"] == "flow"
    assert euler_flow_residual(t) < 1e-5
    assert torch.equal(t.x0[-1], t.final_latent)
    # the final latent unpacked as the pipeline unpacks it, and the image it decodes to
    packed = pack_latents(t.final_latent)
    assert torch.equal(unpack_latents(packed, (6, 8)), t.final_latent)
    assert np.array_equal((images[0] * 255).round().astype(np.uint8), t.images[0].numpy())


def test_batch_of_two(pipe):
    prompts = ["a red circle", "a blue square above a green triangle"]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with trace(pipe, previews=False) as tr:
        _run(pipe, prompts, generator=gens, negative_prompt=["green", "red"], true_cfg_scale=3.0)
    t = tr.trace
    assert t.x_t.shape[1] == 2 and t.prompts == prompts and t.negative_prompts == ["green", "red"]
    for item, prompt in enumerate(prompts):
        with trace(pipe, previews=False) as single:
            _run(pipe, prompt, generator=torch.Generator().manual_seed(item + 1), negative_prompt=["green", "red"][item], true_cfg_scale=3.0)
        n = single.trace.attention.shape[2]
        assert torch.allclose(t.attention[0, item, :n], single.trace.attention[0, 0], atol=1e-5)


def test_guidance_distilled_flux_has_one_branch_and_probes_with_its_guidance(distilled):
    result, _ = generate(distilled, PROMPT, steps=3, guidance=3.5, height=32, width=32, previews=False, output_type="latent")
    assert not result.meta["guided"] and result.meta["guidance_scale"] == 1.0
    assert result.meta["embedded_guidance"] == 3.5 and result.attention_negative is None
    assert result.meta["model_calls"] == 3
    denoiser = from_pipeline(distilled, result)
    assert not denoiser.guided
    for step in range(result.num_steps):
        level = NoiseLevel.from_trace(result, step)
        x0 = denoiser.predict(result.x_t[step], level)
        assert float((x0 - result.x0[step]).abs().max()) < 1e-4 * max(1.0, float(result.x0[step].abs().max())), step
    # another embedded guidance is another prediction (so the check above can fail)
    changed = copy.copy(result)
    changed.meta = dict(result.meta, embedded_guidance=1.0)
    other = from_pipeline(distilled, changed)
    level = NoiseLevel.from_trace(result, 1)
    assert float((other.predict(result.x_t[1], level) - result.x0[1]).abs().max()) > 1e-4


def test_generate_maps_guidance_to_true_cfg_and_keeps_t5_short(pipe):
    result, _ = generate(pipe, PROMPT, steps=2, guidance=4.0, height=32, width=32, previews=False, output_type="latent")
    assert result.meta["guided"] and result.meta["guidance_scale"] == 4.0 and result.negative_prompts == [""]
    assert result.meta["max_sequence_length"] == 8  # the prompt's 8 T5 tokens, not 512 pads
    unguided, _ = generate(pipe, PROMPT, steps=2, guidance=1.0, height=32, width=32, previews=False, output_type="latent")
    assert not unguided.meta["guided"] and unguided.meta["model_calls"] == 2


def test_probes_reproduce_true_cfg_x0_and_token_masks(pipe):
    result, _ = generate(pipe, PROMPT, negative_prompt="green", steps=3, guidance=3.0, height=24, width=32, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, result)
    assert denoiser.guided and denoiser.guidance_scale == 3.0
    for step in range(result.num_steps):
        level = NoiseLevel.from_trace(result, step)
        x0 = denoiser.predict(result.x_t[step], level)
        assert float((x0 - result.x0[step]).abs().max()) < 1e-4 * max(1.0, float(result.x0[step].abs().max())), step
    level = NoiseLevel.from_trace(result, 1)
    keep = torch.ones(1, result.attention.shape[2])
    assert torch.allclose(denoiser.predict_tokens(result.x_t[1], level, keep), denoiser.predict(result.x_t[1], level), atol=1e-5)


def test_df_rise_df_cam_and_games_run_on_flux(pipe):
    from explain.methods.cam import all_layers, df_cam
    from explain.methods.faithfulness import insertion_deletion
    from explain.methods.rise import df_rise, df_rise_tokens

    result, _ = generate(pipe, PROMPT, steps=3, guidance=3.0, height=32, width=32, previews=False, output_type="latent")
    denoiser = from_pipeline(pipe, result)
    names = all_layers(denoiser.modules)
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    cam = df_cam(denoiser, result, step=1, layers="all")
    for name in names:
        alone = df_cam(denoiser, result, step=1, layers=[name])
        assert cam.layers[name].shape == (8, 8) and torch.allclose(alone.layers[name], cam.layers[name], atol=1e-6), name
    rise = df_rise(denoiser, result, step=1, n_masks=4, batch_size=4)
    assert rise.saliency.shape == (16, 16) and torch.isfinite(rise.saliency).all()
    assert torch.allclose(df_rise(denoiser, result, step=1, n_masks=4, batch_size=1).saliency, rise.saliency, atol=1e-4)
    tokens = df_rise_tokens(denoiser, result, step=1, n_masks=4, batch_size=4)
    assert tokens.maps.shape == (result.attention.shape[2], 16, 16)
    games = insertion_deletion(denoiser, result, 1, cam.latent, stride=64)
    assert set(games) == {"insertion", "deletion"} and games["insertion"].latent_curve.shape == (5,)


def test_exponential_schedules_pass_flow_sigmas_through_fluxs_resolution_shift(pipe):
    import numpy as np_

    from explain.adapters.diffusers.schedules import flow_sigmas
    from explain.schedules import exponential_timesteps

    result, _ = generate(pipe, PROMPT, steps=5, guidance=1.0, height=32, width=32, previews=False, output_type="latent",
                         schedule="early", lam=10)
    wanted = np_.array(flow_sigmas(exponential_timesteps(5, "early", 10)))
    scheduler = pipe.scheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(64, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    expected = scheduler.time_shift(mu, 1.0, wanted)
    assert np_.allclose(result.sigmas.numpy(), expected, atol=1e-6)
