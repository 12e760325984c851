"""The diffusers tap on tiny random-weight pipelines (SD-shaped and SDXL-shaped)."""


import numpy as np
import pytest
import torch

from explain.adapters.diffusers import generate, trace
from explain.schedules import exponential_timesteps
from explain.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from explain.tokens import PromptTruncatedWarning
from explain.trace import Trace

torch.set_num_threads(1)

STEPS = 4
PROMPT = "a red circle above a zebrafish"


def _run(pipe, prompt=PROMPT, steps=STEPS, guidance=5.0, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, **kwargs).images


def _spy_scheduler(scheduler):
    """Record the scheduler's own x0 (pred_original_sample, or DPM-Solver's converted output) for
    the calls that start a step. Installed as an instance wrapper, so the tap wraps the spy."""
    original = scheduler.step
    seen = []

    def step(*args, **kwargs):
        first = bool(getattr(scheduler, "state_in_first_order", True))
        return_dict = kwargs.pop("return_dict", True)
        out = original(*args, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None and hasattr(scheduler, "model_outputs"):
            x0 = scheduler.model_outputs[-1]
        if first:
            seen.append(None if x0 is None else x0.clone())
        return out if return_dict else (out.prev_sample,)

    scheduler.step = step
    return seen


@pytest.mark.parametrize(
    "scheduler,prediction_type",
    [
        ("dpm++", "epsilon"),
        ("ddim", "epsilon"),
        ("ddpm", "epsilon"),
        ("euler", "epsilon"),
        ("euler_a", "epsilon"),
        ("pndm", "epsilon"),
        ("heun", "epsilon"),
        ("euler", "v_prediction"),
        ("ddim", "v_prediction"),
        ("dpm++", "v_prediction"),
    ],
)
def test_one_record_per_step_and_x0_matches_the_scheduler(scheduler, prediction_type):
    pipe = tiny_sd_pipeline(scheduler, prediction_type)
    reference = _spy_scheduler(pipe.scheduler)
    with trace(pipe, previews=False) as tr:
        _run(pipe)
    t = tr.trace
    assert t.num_steps == STEPS and t.x0.shape == t.x_t.shape == (STEPS, 1, 4, 16, 16)
    assert t.attention.shape[:2] == (STEPS, 1) and t.attention_negative.shape[:2] == (STEPS, 1)
    assert t.meta["prediction_type"] == prediction_type and t.meta["steps"] == STEPS
    # Timesteps are the scheduler's, once each (Heun lists each twice, PNDM its first one twice).
    listed = [float(x) for x in pipe.scheduler.timesteps]
    assert t.timesteps.tolist() == sorted(set(listed), reverse=True)
    ac = pipe.scheduler.alphas_cumprod.double()
    if scheduler in ("ddim", "ddpm", "pndm"):
        ts = t.timesteps.long()
        assert torch.allclose(t.sigmas, ((1 - ac[ts]) / ac[ts]).sqrt())
    assert torch.all(t.sigmas[:-1] > t.sigmas[1:])
    if scheduler == "heun":
        assert t.meta["model_calls"] == 2 * STEPS - 1
    if scheduler == "pndm":
        assert t.meta["model_calls"] == STEPS + 1
    if scheduler != "pndm":  # PNDM exposes no x0 of its own
        assert len(reference) == STEPS
        for s in range(STEPS):
            assert torch.allclose(t.x0[s], reference[s].float(), atol=1e-4, rtol=1e-4), f"step {s}"
    assert t.meta["latent_space"] == ("sigma" if scheduler in ("euler", "euler_a", "heun") else "vp")


def test_pndm_records_the_call_that_starts_each_step_not_the_correction():
    # PLMS calls the model twice at its second timestep: call 1 runs on the first step's
    # prediction to correct that step, call 2 starts step 1 from the corrected latent. PNDM gives
    # no x0 of its own, so x_t and x0 are tied to the scheduler's real inputs instead.
    pipe = tiny_sd_pipeline("pndm")
    calls = []
    original = pipe.scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        calls.append((model_output.clone(), int(timestep), sample.clone()))
        return original(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = spy
    with trace(pipe, previews=False) as tr:
        _run(pipe)
    t = tr.trace
    assert len(calls) == STEPS + 1 and calls[1][1] == calls[2][1]
    starts = [0] + list(range(2, STEPS + 1))  # call 1 is the correction of step 0
    ac = pipe.scheduler.alphas_cumprod.double()
    for s, k in enumerate(starts):
        eps, timestep, sample = calls[k]
        assert torch.equal(t.x_t[s], sample.float()), f"step {s}"
        a = ac[timestep]
        x0 = (sample.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
        assert torch.allclose(t.x0[s].double(), x0, atol=1e-4), f"step {s}"


def test_guidance_is_recorded_per_call_and_a_truncated_negative_prompt_warns():
    pipe = tiny_sd_pipeline("dpm++")
    with pytest.warns(PromptTruncatedWarning, match="the negative prompt has .*cut off.*blue.*Shorten the negative prompt"):
        with trace(pipe, previews=False) as tr:
            _run(pipe, steps=2, guidance=3.0, negative_prompt="a zebrafish " + "red circle " * 40 + "blue square")
            _run(pipe, steps=2, guidance=6.0)
    first, second = tr.traces
    assert first.meta["guidance_scale"] == 3.0 and second.meta["guidance_scale"] == 6.0


def test_x_t_is_the_latent_entering_each_step_and_final_latent_the_last_output():
    pipe = tiny_sd_pipeline("ddim")
    with trace(pipe, previews=False) as tr:
        latents = _run(pipe, output_type="latent")
    t = tr.trace
    assert torch.allclose(t.final_latent, torch.as_tensor(latents).float())
    # DDIM (eta 0) is deterministic given x0: x_{s+1} = √ᾱ' x0 + √(1-ᾱ') ε with ε implied by x_s.
    ac = pipe.scheduler.alphas_cumprod.double()
    for s in range(STEPS - 1):
        a, a_next = ac[int(t.timesteps[s])], ac[int(t.timesteps[s + 1])]
        eps = (t.x_t[s].double() - a.sqrt() * t.x0[s].double()) / (1 - a).sqrt()
        expected = a_next.sqrt() * t.x0[s].double() + (1 - a_next).sqrt() * eps
        assert torch.allclose(t.x_t[s + 1].double(), expected, atol=1e-4)
    assert t.images is None  # output_type="latent": nothing decoded


def test_taps_leave_the_pipeline_bit_identical():
    pipe = tiny_sd_pipeline("dpm++")
    processors = dict(pipe.unet.attn_processors)
    before = _run(pipe)
    with trace(pipe, keep_layers=True) as tr:
        traced = _run(pipe)
    after = _run(pipe)
    assert np.array_equal(before, after)
    assert np.allclose(before, traced, atol=1e-4)  # explicit softmax vs SDPA: float rounding only
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert "step" not in vars(pipe.scheduler) and "encode_prompt" not in vars(pipe) and "decode" not in vars(pipe.vae)
    assert not pipe.unet._forward_pre_hooks
    # Self-attention kept its own processor during the run; only attn2 layers were captured.
    assert all(".attn2" in name for name in tr.trace.attention_layers)
    assert len(tr.trace.attention_layers) == sum(k.endswith("attn2.processor") for k in processors)


def test_restored_after_an_exception():
    pipe = tiny_sd_pipeline("euler")
    processors = dict(pipe.unet.attn_processors)
    before = _run(pipe)

    def boom(pipe_, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt("stop")
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        with trace(pipe):
            _run(pipe, callback_on_step_end=boom)
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert "step" not in vars(pipe.scheduler) and not pipe.unet._forward_pre_hooks
    assert np.array_equal(before, _run(pipe))
    with trace(pipe, previews=False) as tr:  # a fresh trace works after the failed one
        _run(pipe)
    assert tr.trace.num_steps == STEPS


def test_guidance_one_has_no_unconditional_branch():
    pipe = tiny_sd_pipeline("dpm++")
    with trace(pipe, previews=False) as tr:
        _run(pipe, guidance=1.0, negative_prompt="blue")
    t = tr.trace
    assert t.attention_negative is None and t.negative_words == [] and t.meta["guided"] is False
    assert t.meta["guidance_scale"] == 1.0 and t.meta["model_calls"] == STEPS
    assert t.attention.shape[:2] == (STEPS, 1)


def test_batches_images_per_prompt_and_negative_prompts_line_up():
    pipe = tiny_sd_pipeline("ddim")
    prompts, negatives = ["a red circle", "a big blue square above a green triangle"], ["green", "yellow circle"]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5, 6)]  # noqa: E731
    with trace(pipe, previews=False) as tr:
        _run(pipe, prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=gens())
    t = tr.trace
    assert t.batch_size == 4 and t.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    assert t.negative_prompts == [negatives[0]] * 2 + [negatives[1]] * 2
    assert [w.text for w in t.words[2]] == ["a", "big", "blue", "square", "above", "a", "green", "triangle"]
    assert [w.text for w in t.negative_words[3]] == ["yellow", "circle"]
    assert t.attention.shape[2] == 10 and t.attention_negative.shape[2] == 4  # SOS … EOS of the longest
    assert all(len(tok) == 10 for tok in t.tokens) and t.tokens[0][4] == "<|endoftext|>"
    # Row bookkeeping: item 3 of the batch equals the same prompt, negative and noise run alone.
    with trace(pipe, previews=False) as single:
        _run(pipe, prompts[1], negative_prompt=negatives[1], generator=torch.Generator().manual_seed(6))
    s = single.trace
    assert torch.allclose(t.attention[:, 3], s.attention[:, 0], atol=1e-4)
    assert torch.allclose(t.attention_negative[:, 3, :4], s.attention_negative[:, 0], atol=1e-4)
    assert torch.allclose(t.x0[:, 3], s.x0[:, 0], atol=1e-4)
    assert not torch.allclose(t.attention[:, 2], t.attention[:, 3], atol=1e-4)  # different noise


def test_sdxl_non_square_with_layers_and_both_text_encoders():
    pipe = tiny_sdxl_pipeline("euler")
    before = _run(pipe, ["a red circle", "blue square"], height=32, width=48)
    with trace(pipe, keep_layers=True) as tr:
        _run(pipe, ["a red circle", "blue square"], height=32, width=48, negative_prompt="green")
    t = tr.trace
    assert t.x_t.shape == (STEPS, 2, 4, 16, 24) and t.attention.shape == (STEPS, 2, 5, 16, 24)
    assert t.meta["height"] == 32 and t.meta["width"] == 48 and t.meta["pipeline"] == "StableDiffusionXLPipeline"
    sizes = {tuple(v.shape[-2:]) for v in t.attention_layers.values()}
    assert sizes == {(8, 12)}  # SDXL-style: no cross-attention at full latent resolution, maps upsampled
    assert len(t.attention_layers) == 8
    assert [w.text for w in t.words[1]] == ["blue", "square"] and t.negative_prompts == ["green", "green"]
    assert t.x0_previews.shape == (STEPS, 2, 32, 48, 3) and t.images.shape == (2, 32, 48, 3)
    assert np.array_equal(before, _run(pipe, ["a red circle", "blue square"], height=32, width=48))


@pytest.mark.parametrize("method", ["explicit", "sdpa"])
def test_rows_sum_to_one_over_the_full_context(method):
    pipe = tiny_sd_pipeline("dpm++")
    with trace(pipe, previews=False, full_context=True, method=method) as tr:
        _run(pipe, height=32, width=24)
    t = tr.trace
    assert t.attention.shape[2] == 77 and len(t.tokens[0]) == 77
    assert torch.allclose(t.attention.sum(2), torch.ones(STEPS, 1, 16, 12), atol=1e-4)
    assert torch.allclose(t.attention_negative.sum(2), torch.ones(STEPS, 1, 16, 12), atol=1e-4)


def test_multi_token_words_are_merged_and_truncation_warns():
    pipe = tiny_sd_pipeline("dpm++")
    long_prompt = "a zebrafish " + "red circle " * 40 + "blue square"
    with pytest.warns(PromptTruncatedWarning, match="blue square"):
        with trace(pipe, previews=False) as tr:
            _run(pipe, long_prompt, steps=2)
    t = tr.trace
    zebrafish = t.word("zebrafish")
    assert zebrafish.token_indices == list(range(2, 2 + len("zebrafish")))
    assert t.attention.shape[2] == 77 and t.tokens[0][-1] == "<|endoftext|>"
    assert t.meta["truncated_words"] == ["blue", "circle", "red", "square"]


def test_previews_images_and_save_load_round_trip(tmp_path):
    pipe = tiny_sd_pipeline("euler")
    with trace(pipe, preview_size=16, seed=7) as tr:
        images = _run(pipe)
    t = tr.trace
    assert t.x0_previews.shape == t.x_t_previews.shape == (STEPS, 1, 16, 16, 3)
    assert t.x0_previews.dtype == torch.uint8 and t.images.shape == (1, 32, 32, 3)
    assert np.abs(t.images.numpy().astype(int) - np.round(images * 255).astype(int)).max() <= 1
    assert t.meta["seed"] == 7 and t.meta["scheduler"] == "EulerDiscreteScheduler" and t.meta["source"] == "diffusers"
    loaded = Trace.load(t.save(tmp_path / "t.safetensors"))
    assert torch.allclose(loaded.attention, t.attention, atol=1e-3) and loaded.words == t.words
    assert torch.equal(loaded.x0, t.x0) and loaded.meta == t.meta


def test_prompt_embeddings_without_text_give_unnamed_positions():
    pipe = tiny_sd_pipeline("ddim")
    embeds, negative = pipe.encode_prompt("a red circle", "cpu", 1, True)
    with trace(pipe, previews=False) as tr:
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="latent")
    t = tr.trace
    assert t.words == [[]] and t.tokens[0][0] == "<position 0>" and t.attention.shape[2] == 77


def test_generate_runs_the_papers_schedules():
    pipe = tiny_sd_pipeline("dpm++")
    t, images = generate(pipe, "a red circle", steps=5, guidance=3.0, seed=1, schedule="early", lam=10, previews=False)
    assert t.timesteps.long().tolist() == exponential_timesteps(5, "early", 10)
    assert t.meta["schedule"] == "early" and t.meta["lam"] == 10 and t.meta["seed"] == 1 and len(images) == 1
    again, _ = generate(pipe, "a red circle", steps=5, guidance=3.0, seed=1, schedule="semantic", lam=10, previews=False)
    assert torch.equal(again.x0, t.x0)  # same seed, same result
    with pytest.raises(ValueError, match="cannot run custom time steps"):
        generate(tiny_sd_pipeline("ddim"), "a red circle", steps=5, schedule="latter", lam=10)


def test_misuse_gives_clear_errors():
    pipe = tiny_sd_pipeline("dpm++")
    with trace(pipe) as tr:
        with pytest.raises(RuntimeError, match="already being traced"):
            with trace(pipe):
                pass
    with pytest.raises(RuntimeError, match="nothing was traced"):
        tr.trace
    with pytest.raises(TypeError, match="not a pipeline diffusion-explain can trace; supported families are unet: Stable Diffusion"):
        with trace(object()):
            pass
    with pytest.raises(ValueError, match="keep_layers"):
        with trace(pipe, keep_layers="heads"):
            pass
    assert "step" not in vars(pipe.scheduler)


def test_conditional_and_negative_maps_come_from_the_right_rows():
    # At step 0 every run sees the same latent, so the guided run's conditional maps must equal
    # an unguided run of the prompt, and its negative maps an unguided run of the negative prompt.
    pipe = tiny_sd_pipeline("ddim")
    with trace(pipe, previews=False) as guided:
        _run(pipe, "a red circle", negative_prompt="blue square", steps=2, guidance=5.0)
    with trace(pipe, previews=False) as cond_only:
        _run(pipe, "a red circle", steps=2, guidance=1.0)
    with trace(pipe, previews=False) as neg_only:
        _run(pipe, "blue square", steps=2, guidance=1.0)
    g = guided.trace
    assert torch.allclose(g.attention[0], cond_only.trace.attention[0], atol=1e-5)
    assert torch.allclose(g.attention_negative[0], neg_only.trace.attention[0], atol=1e-5)
    assert not torch.allclose(g.attention[0, :, :4], g.attention_negative[0, :, :4], atol=1e-3)


def test_capture_methods_agree():
    pipe = tiny_sd_pipeline("euler")
    traces = {}
    for method in ("explicit", "sdpa"):
        with trace(pipe, previews=False, keep_layers="resolution", method=method) as tr:
            _run(pipe, steps=2)
        traces[method] = tr.trace
    e, s = traces["explicit"], traces["sdpa"]
    assert torch.allclose(e.attention, s.attention, atol=1e-5) and torch.allclose(e.x0, s.x0, atol=1e-4)
    assert set(e.attention_layers) == {"16x16", "8x8"} and torch.allclose(e.attention_layers["8x8"], s.attention_layers["8x8"], atol=1e-5)
