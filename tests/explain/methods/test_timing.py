import math

import pytest
import torch

from explain.adapters.diffusers import from_pipeline, generate
from explain.denoiser import GuidedDenoiser
from explain.methods.timing import (
    concept_onset,
    concept_timing,
    decision_from_correct,
    decision_step,
    onset_step,
    reproduction_error,
    resample,
    sampler_for,
    sampler_step,
)
from explain.testing import tiny_sd_pipeline
from explain.trace import Trace, Word

SIGMAS = [8.0, 5.0, 3.0, 2.0, 1.2, 0.7, 0.4, 0.2]
TOKENS = ["<start>", "early</w>", "late</w>", "<end>"]


def toy_denoiser(early_until_the_end: bool = False):
    """A Bayes-like denoiser in σ space: D(x) = x / (1 + σ²) + σ² / (1 + σ²) · prior, whose prior
    holds pattern A only while σ >= 2.5 (word "early") and pattern B only while σ < 1 (word
    "late"), each only when its token is kept. So "early" is decided in the first three steps
    and carried on by the latent, while "late" acts in the last steps."""
    g = torch.Generator().manual_seed(0)
    base, pa, pb = torch.randn(3, 4, 8, 8, generator=g)

    def x0(x, level, keep):
        s2 = level.sigma**2
        ka = keep[:, 1].view(-1, 1, 1, 1)
        kb = keep[:, 2].view(-1, 1, 1, 1)
        early = 1.0 if early_until_the_end else float(level.sigma >= 2.5)
        prior = base + ka * pa * early + kb * pb * float(level.sigma < 1.0)
        return x / (1 + s2) + s2 / (1 + s2) * prior

    def model_fn(x, level):
        return None, x0(x, level, torch.ones(x.shape[0], len(TOKENS)))

    def token_model_fn(x, level, keep):
        return None, x0(x, level, keep)

    return GuidedDenoiser(model_fn, "sample", 1.0, latent_space="sigma", token_model_fn=token_model_fn)


def toy_trace(den):
    from explain.denoiser import NoiseLevel

    g = torch.Generator().manual_seed(1)
    x = SIGMAS[0] * torch.randn(1, 4, 8, 8, generator=g)
    xs, x0s, old = [], [], None
    sig = SIGMAS + [0.0]
    for j, s in enumerate(SIGMAS):
        xs.append(x.clone())
        pred = den.predict(x, NoiseLevel(float(1000 - 100 * j), s))
        x0s.append(pred.clone())
        x = sampler_step(x, pred, s, sig[j + 1], old_x0=old, sigma_prev=SIGMAS[j - 1] if j else None)
        old = pred
    return Trace(
        prompts=["early late"],
        tokens=[list(TOKENS)],
        words=[[Word("early", [1]), Word("late", [2])]],
        timesteps=torch.tensor([1000.0 - 100 * j for j in range(len(SIGMAS))], dtype=torch.float64),
        sigmas=torch.tensor(SIGMAS, dtype=torch.float64),
        x_t=torch.stack(xs),
        x0=torch.stack(x0s),
        final_latent=x,
        meta={"scheduler": "DPMSolverMultistepScheduler"},
    ).validate()


def test_the_re_run_reproduces_the_toy_run_from_any_step():
    den = toy_denoiser()
    trace = toy_trace(den)
    finals = resample(den, trace, [0, 3, 7])
    assert torch.allclose(finals, trace.final_latent.expand(3, -1, -1, -1), atol=1e-5)
    assert reproduction_error(den, trace)["relative_rms"] < 1e-6
    from explain.methods.timing import rerun_trajectory

    x0s, final = rerun_trajectory(den, trace)
    assert torch.allclose(x0s, trace.x0[:, 0], atol=1e-5) and torch.allclose(final, trace.final_latent[0], atol=1e-5)


@pytest.mark.parametrize("scheduler, sampler", [("dpm++", "dpmpp_2m"), ("euler", "ddim")])
def test_the_re_run_reproduces_a_traced_diffusers_run(scheduler, sampler):
    pipe = tiny_sd_pipeline(scheduler)
    trace, _ = generate(pipe, "a red circle above a blue square", steps=5, guidance=5.0, seed=0, previews=False, output_type="latent")
    den = from_pipeline(pipe, trace)
    assert sampler_for(trace) == sampler
    assert reproduction_error(den, trace)["relative_rms"] < 1e-4
    # the other solver is a different sampler: it does not reproduce the run (so the check can fail)
    other = "ddim" if sampler == "dpmpp_2m" else "dpmpp_2m"
    assert reproduction_error(den, trace, sampler=other)["relative_rms"] > 1e-3


def test_decision_steps_follow_when_each_word_acts():
    den = toy_denoiser()
    trace = toy_trace(den)
    timing = concept_timing(den, trace, mode="from")
    early, late = timing.decision_step
    # "early" acts while σ >= 2.5 (steps 0-2): removing it from step 3 on changes nothing
    assert early <= 3
    assert late >= 5 and early < late
    assert float(timing.effect[0, 3:].abs().max()) < 1e-6 * float(timing.effect[0, 0])
    assert timing.finals.shape == (2, len(SIGMAS), 4, 8, 8)
    at = concept_timing(den, trace, mode="at")
    assert at.peak_step[0] <= 2 and at.peak_step[1] >= 4
    assert set(timing.to_json()) >= {"effect", "decision_step", "definitions"}


def test_counterfactual_denoisers_remove_a_word_like_its_token_mask():
    den = toy_denoiser()
    trace = toy_trace(den)

    def without(position):
        def fn(x, level):
            keep = torch.ones(x.shape[0], len(TOKENS))
            keep[:, position] = 0
            return den.token_model_fn(x, level, keep)

        return GuidedDenoiser(fn, "sample", 1.0, latent_space="sigma")

    masked = concept_timing(den, trace, mode="from")
    swapped = concept_timing(den, trace, mode="from", counterfactuals=[without(1), without(2)])
    assert torch.allclose(masked.effect, swapped.effect, atol=1e-6)
    assert masked.decision_step == swapped.decision_step
    with pytest.raises(ValueError, match="one counterfactual"):
        concept_timing(den, trace, counterfactuals=[without(1)])


def test_decision_helpers():
    assert decision_step(torch.tensor([4.0, 3.0, 1.0, 2.5, 0.0]), [0, 1, 2, 3, 4]) == 4
    assert decision_step(torch.tensor([4.0, 1.0, 1.0, 0.0]), [0, 2, 4, 6]) == 2
    assert decision_step(torch.zeros(3), [0, 1, 2]) == 0
    assert decision_from_correct([False, True, True], [0, 5, 10]) == 5
    assert decision_from_correct([True, True, False], [0, 5, 10]) == 11  # never settles
    assert decision_from_correct([True, True], [3, 4]) == 3


def test_timing_needs_a_token_mask_and_a_known_mode():
    den = toy_denoiser()
    trace = toy_trace(den)
    with pytest.raises(ValueError, match="mode"):
        concept_timing(den, trace, mode="until")
    plain = GuidedDenoiser(den.model_fn, "sample", 1.0, latent_space="sigma")
    with pytest.raises(ValueError, match="token_model_fn"):
        concept_timing(plain, trace)
    with pytest.raises(ValueError, match="sampler"):
        sampler_step(torch.zeros(1), torch.zeros(1), 1.0, 0.5, sampler="heun")
    assert math.isfinite(float(sampler_step(torch.ones(1), torch.zeros(1), 1.0, 0.5)))


def test_onset_steps_follow_when_each_word_starts_to_shape_the_prediction():
    den = toy_denoiser()
    trace = toy_trace(den)
    onset = concept_onset(den, trace)
    assert onset.labels == ["early", "late"] and onset.space == "latent"
    # "early" shapes x0 while σ >= 2.5 (steps 0-2), "late" from σ < 1 (step 5) on
    assert onset.onset_step == [0, 5]
    assert onset.peak_step == [0, 5]
    assert float(onset.effect[0, 3:].max()) < 1e-10 and float(onset.effect[1, :5].max()) < 1e-10
    doubled = concept_onset(den, trace, decode=lambda z: 2 * z)
    assert doubled.space == "decoded" and doubled.onset_step == onset.onset_step
    assert torch.allclose(doubled.effect, 4 * onset.effect)
    assert set(onset.to_json()) >= {"effect", "onset_step", "definitions"}


def test_a_word_read_to_the_end_has_an_early_onset_but_a_late_lock_in():
    # the embedded model's colour words: visible in x0 from the first step, still steering the
    # result late; lock-in (mode "from") moves from step <= 3 (read only early) to half-way,
    # the onset stays at step 0
    den = toy_denoiser(early_until_the_end=True)
    trace = toy_trace(den)
    assert concept_onset(den, trace).onset_step[0] == 0
    assert concept_timing(den, trace, mode="from").decision_step[0] >= len(SIGMAS) // 2


def test_onset_of_a_model_that_ignores_its_prompt_is_no_evidence_of_order():
    den = toy_denoiser()
    trace = toy_trace(den)
    deaf = GuidedDenoiser(den.model_fn, "sample", 1.0, latent_space="sigma", token_model_fn=lambda x, level, keep: den.model_fn(x, level))
    onset = concept_onset(deaf, trace)
    assert float(onset.effect.abs().max()) == 0.0
    assert onset.onset_step[0] == onset.onset_step[1]  # a tie: no order to agree with anything


def test_onset_with_counterfactual_prompts_on_a_diffusers_pipeline():
    from explain.adapters.diffusers import vae_decoder

    pipe = tiny_sd_pipeline("dpm++")
    trace, _ = generate(pipe, "a red circle above a blue square", steps=4, guidance=5.0, seed=0, previews=False, output_type="latent")
    den = from_pipeline(pipe, trace)
    swapped = [from_pipeline(pipe, trace, prompt=p) for p in ("a green circle above a blue square", "a red circle below a blue square")]
    onset = concept_onset(den, trace, ["red", "above"], counterfactuals=swapped, decode=vae_decoder(pipe.vae))
    assert onset.effect.shape == (2, 4) and bool((onset.effect > 0).all())
    assert all(0 <= s < 4 for s in onset.onset_step + onset.peak_step)
    same = concept_onset(den, trace, ["red"], counterfactuals=[from_pipeline(pipe, trace)])
    assert float(same.effect.abs().max()) < 1e-8
    with pytest.raises(ValueError, match="one counterfactual"):
        concept_onset(den, trace, ["red", "above"], counterfactuals=swapped[:1])


def test_onset_helpers_and_arguments():
    assert onset_step(torch.tensor([0.1, 0.6, 1.0, 0.2])) == 1
    assert onset_step(torch.tensor([0.1, 0.6, 1.0, 0.2]), threshold=0.9) == 2
    assert onset_step(torch.zeros(4)) == 0
    den = toy_denoiser()
    trace = toy_trace(den)
    with pytest.raises(ValueError, match="threshold"):
        concept_onset(den, trace, threshold=0)
    plain = GuidedDenoiser(den.model_fn, "sample", 1.0, latent_space="sigma")
    with pytest.raises(ValueError, match="token_model_fn"):
        concept_onset(plain, trace)
    with pytest.raises(IndexError):
        concept_onset(den, trace, item=3)
