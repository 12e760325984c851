import math

import pytest
import torch

from explain.adapters.diffusers import from_pipeline, vae_decoder
from explain.denoiser import GuidedDenoiser
from explain.methods.faithfulness import (
    auc,
    game_latents,
    game_points,
    gaussian_blur,
    insertion_deletion,
    model_randomization_check,
    normalized_auc,
    paper_auc,
    play,
    random_saliency,
    randomized_copy,
    saliency_order,
    spearman,
)
from explain.testing import tiny_sd_pipeline
from explain.trace import Trace
from tests.explain.generation import assert_same_state, run_and_trace, scheduler_state


def test_blur_is_the_papers_kernel_with_reflect_padding():
    x = torch.zeros(1, 4, 21, 21)
    x[..., 10, 10] = 1.0
    y = gaussian_blur(x)
    # a delta becomes the 11×11, σ = 5 kernel: separable, normalised, centred
    coords = torch.arange(11.0) - 5
    k = torch.exp(-(coords**2) / 50)
    k = k / k.sum()
    assert torch.allclose(y[0, 0, 5:16, 5:16], k[:, None] * k[None, :], atol=1e-6)
    assert float(y[0, 0, :5].abs().max()) == 0.0
    # reflect padding keeps a constant latent constant (zero padding darkened the borders)
    ones = torch.ones(4, 16, 16)
    assert torch.allclose(gaussian_blur(ones), ones, atol=1e-6)
    assert torch.isfinite(gaussian_blur(torch.randn(4, 3, 3))).all()  # too small to reflect
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(ones, kernel_size=10)


def test_order_follows_saliency_and_breaks_ties_by_seed():
    s = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert saliency_order(s, (2, 2)).tolist() == [1, 2, 3, 0]
    flat = torch.zeros(4, 4)
    flat[0, 0] = 1.0
    a, b = saliency_order(flat, (4, 4), seed=0), saliency_order(flat, (4, 4), seed=1)
    assert a[0] == 0 and b[0] == 0 and not torch.equal(a, b)
    big = torch.zeros(8, 8)
    big[:4, :4] = 1.0  # an image-size map is resized to the latent grid
    assert saliency_order(big, (2, 2))[0] == 0
    with pytest.raises(ValueError, match="NaN"):
        saliency_order(torch.full((2, 2), float("nan")), (2, 2))


def test_game_latents_move_stride_positions_per_point():
    x = torch.arange(1.0, 17.0).view(1, 4, 4)
    order = torch.arange(16).flip(0)
    seq = game_latents(x, order, "deletion", stride=4)
    assert seq.shape == (game_points(16, 4), 1, 4, 4) == (5, 1, 4, 4)
    assert torch.equal(seq[0], x) and torch.equal(seq[-1], torch.zeros_like(x))
    assert torch.equal(seq[1, 0, 3], torch.zeros(4)) and torch.equal(seq[1, 0, :3], x[0, :3])
    ins = game_latents(x, order, "insertion", stride=5)  # 16 positions, stride 5: 0,5,10,15,16
    assert ins.shape[0] == 5
    assert torch.equal(ins[0], gaussian_blur(x)) and torch.equal(ins[-1], x)


def test_auc_conventions():
    assert auc(torch.tensor([1.0, 0.0])) == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert normalized_auc(torch.tensor([10.0, 0.0, 0.0])) == pytest.approx(0.25)
    # the paper: mean over prompts first, then min-max, then trapezoid
    curves = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([4.0, 0.0, 0.0])]
    assert paper_auc(curves) == pytest.approx(normalized_auc(torch.tensor([3.0, 0.5, 0.0])))
    with pytest.raises(ValueError, match="two"):
        auc(torch.tensor([1.0]))


def region_model():
    """x0 prediction that depends only on the latent inside a 4×4 region."""
    g = torch.Generator().manual_seed(0)
    P = torch.randn(4, 12, 12, generator=g)

    def predict_x0(x):
        r = x[:, :, 2:6, 6:10]
        return P * r.mean((1, 2, 3)).view(-1, 1, 1, 1) + 0.1 * r.std((1, 2, 3)).view(-1, 1, 1, 1)

    x = torch.randn(4, 12, 12, generator=g) + 1.0
    perfect = torch.zeros(12, 12)
    perfect[2:6, 6:10] = 1.0
    return predict_x0, x, perfect


def test_a_perfect_map_beats_random_maps_on_a_toy_model():
    predict_x0, x, perfect = region_model()
    good_ins = play(predict_x0, x, perfect, mode="insertion", stride=4)
    good_del = play(predict_x0, x, perfect, mode="deletion", stride=4)
    for seed in range(5):
        rnd = random_saliency((12, 12), seed)
        assert good_ins.latent_auc < play(predict_x0, x, rnd, mode="insertion", stride=4).latent_auc
        assert good_del.latent_auc > play(predict_x0, x, rnd, mode="deletion", stride=4).latent_auc
    # insertion ends on the untouched latent: distance 0; deletion starts there
    assert float(good_ins.latent_curve[-1]) == 0.0 and float(good_del.latent_curve[0]) == 0.0
    assert good_ins.latent_curve.shape == (game_points(144, 4),)
    assert float(good_ins.fractions[-1]) == 1.0


def test_batching_does_not_change_the_curve():
    predict_x0, x, perfect = region_model()
    a = play(predict_x0, x, perfect, batch_size=1)
    b = play(predict_x0, x, perfect, batch_size=64)
    assert torch.allclose(a.latent_curve, b.latent_curve)
    assert a.stride == 12 and a.latent_curve.shape == (13,)  # the paper's default: stride = side


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_sd_pipeline("dpm++")
    trace = run_and_trace(pipe, "a red circle", steps=3)
    return pipe, trace, from_pipeline(pipe, trace)


def test_games_on_a_pipeline_in_latent_and_image_space(tiny):
    pipe, trace, denoiser = tiny
    before = scheduler_state(pipe.scheduler)
    saliency = random_saliency(trace.latent_size, 3)
    games = insertion_deletion(denoiser, trace, 1, saliency, decode=vae_decoder(pipe.vae), stride=64, batch_size=3)
    assert set(games) == {"insertion", "deletion"}
    ins, dele = games["insertion"], games["deletion"]
    assert ins.latent_curve.shape == ins.image_curve.shape == (5,)
    assert float(ins.latent_curve[-1]) < 1e-8 and float(dele.latent_curve[0]) < 1e-8
    assert float(ins.image_curve[-1]) < 1e-8 and math.isfinite(ins.image_auc)
    assert_same_state(before, scheduler_state(pipe.scheduler))
    with pytest.raises(ValueError, match="stride"):
        insertion_deletion(denoiser, trace, 1, saliency, stride=0)
    with pytest.raises(ValueError, match="mode"):
        insertion_deletion(denoiser, trace, 1, saliency, modes="swap")
    with pytest.raises(IndexError, match="outside the trace"):
        insertion_deletion(denoiser, trace, 9, saliency)


def test_spearman():
    a = torch.arange(10.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([0.0, 0, 1, 2]), torch.tensor([0.0, 0, 1, 2])) == pytest.approx(1.0)
    assert math.isnan(spearman(torch.ones(4), a[:4]))
    with pytest.raises(ValueError, match="differ"):
        spearman(a, a[:3])


def test_randomized_copy_changes_every_weight_and_not_the_original(tiny):
    pipe, _, _ = tiny
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rng = torch.get_rng_state()
    clone = randomized_copy(pipe.unet, seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in pipe.unet.state_dict().items())
    changed = [not torch.equal(state[k], v) for k, v in clone.state_dict().items() if v.numel() > 1 and state[k].std() > 0]
    assert sum(changed) > 0.9 * len(changed)


def test_randomized_copy_is_reproducible_for_a_seed_and_leaves_cuda_seeds_alone(tiny, monkeypatch):
    pipe, _, _ = tiny
    reseeded = []  # torch.manual_seed reseeds every CUDA device (lazily, even before CUDA starts)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    a, b, c = (randomized_copy(pipe.unet, seed=s).state_dict() for s in (4, 4, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert reseeded == []


def test_image_decoder_upcasts_a_force_upcast_vae_and_applies_its_shift(tiny):
    import copy

    pipe, _, _ = tiny
    vae32 = copy.deepcopy(pipe.vae).float()
    vae32.register_to_config(force_upcast=True, shift_factor=0.1)
    vae16 = copy.deepcopy(vae32).half()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = vae_decoder(vae16)(z)
    assert next(vae16.parameters()).dtype == torch.float16  # handed back as it came
    with torch.no_grad():
        expected = copy.deepcopy(vae16).float().decode(z / vae32.config.scaling_factor + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-5)


def test_randomization_check_separates_a_model_dependent_map():
    from explain.methods.rise import df_rise

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 4, 12, 12, generator=g) + 1.0
    trace = Trace(["p"], [["p"]], [[]], torch.tensor([1.0]), torch.tensor([1.0]), x, x)
    pattern = torch.randn(4, 12, 12, generator=g)

    def denoiser_for(rows, cols):
        def fn(xb, level):
            r = xb[:, :, rows, cols].mean((1, 2, 3)).view(-1, 1, 1, 1)
            return None, pattern * r + 1.0

        return GuidedDenoiser(fn, "sample", 1.0)

    trained = denoiser_for(slice(2, 6), slice(6, 10))
    randomized = denoiser_for(slice(8, 12), slice(0, 4))  # "re-initialised": depends on another region

    def explain(d):
        return df_rise(d, trace, 0, n_masks=200, similarity="neg_mse", centered=True, batch_size=100).saliency

    assert model_randomization_check(explain, trained, trained).spearman == pytest.approx(1.0)
    assert model_randomization_check(explain, trained, randomized).spearman < 0.3


def test_context_score_measures_only_untouched_positions():
    predict_x0, x, perfect = region_model()
    # deletion: at point j the measured positions are those not yet removed, so the first point
    # (nothing removed) is 0, and removing the region first moves every untouched prediction
    good = play(predict_x0, x, perfect, mode="deletion", stride=4, score="context")
    bad = play(predict_x0, x, 1 - perfect, mode="deletion", stride=4, score="context")
    assert float(good.latent_curve[0]) == 0.0 and good.latent_auc > bad.latent_auc
    assert torch.isfinite(good.latent_curve).all()  # the last point (nothing untouched) takes its neighbour's value
    ins = play(predict_x0, x, perfect, mode="insertion", stride=4, score="context")
    assert float(ins.latent_curve[-1]) == 0.0 and torch.isfinite(ins.latent_curve).all()
    with pytest.raises(ValueError, match="game score"):
        play(predict_x0, x, perfect, score="some")


def test_noise_removal_games_share_their_draws_and_average_them(tiny):
    _, trace, denoiser = tiny
    s = random_saliency(trace.latent_size, 3)
    a = insertion_deletion(denoiser, trace, 1, s, removal="noise", noise_draws=2, stride=64, seed=1)
    b = insertion_deletion(denoiser, trace, 1, s, removal="noise", noise_draws=2, stride=64, seed=1)
    c = insertion_deletion(denoiser, trace, 1, s, removal="noise", noise_draws=2, stride=64, seed=2)
    assert torch.equal(a["insertion"].latent_curve, b["insertion"].latent_curve)
    assert not torch.equal(a["insertion"].latent_curve, c["insertion"].latent_curve)
    with pytest.raises(ValueError, match="removal"):
        insertion_deletion(denoiser, trace, 1, s, removal="erase")
    with pytest.raises(ValueError, match="noise_draws"):
        insertion_deletion(denoiser, trace, 1, s, noise_draws=0)


def test_final_score_runs_the_sampler_to_the_end_and_scores_every_position():
    from explain.methods.timing import resample
    from tests.explain.methods.test_timing import toy_denoiser, toy_trace

    den = toy_denoiser()
    trace = toy_trace(den)
    step, x = 3, trace.x_t[3, 0].float()
    s = random_saliency(trace.latent_size, 0)
    final = insertion_deletion(den, trace, step, s, modes="deletion", removal="blur", score="final", stride=32)["deletion"]
    one_step = insertion_deletion(den, trace, step, s, modes="deletion", removal="blur", score="all", stride=32)["deletion"]
    # nothing removed: the re-run reproduces the traced final latent, so the distance is 0
    assert float(final.latent_curve[0]) == pytest.approx(0.0, abs=1e-10)
    # everything removed: the distance of the re-run from the blurred latent to the end, over every position
    blurred = resample(den, trace, [step], latents=gaussian_blur(x).unsqueeze(0))[0]
    expected = float((blurred - trace.final_latent[0]).pow(2).mean())
    assert float(final.latent_curve[-1]) == pytest.approx(expected, rel=1e-5)
    assert float(final.latent_curve[-1]) != pytest.approx(float(one_step.latent_curve[-1]), rel=1e-2)
