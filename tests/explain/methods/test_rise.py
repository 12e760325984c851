import pytest
import torch

from explain.adapters.diffusers import from_pipeline
from explain.denoiser import GuidedDenoiser
from explain.methods.rise import (
    MASK_CHUNK,
    MaskSampler,
    bernoulli_masks,
    check_mask_count,
    df_rise,
    df_rise_tokens,
    display_map,
    grid_masks,
    rise_map,
)
from explain.testing import tiny_sd_pipeline
from explain.trace import Trace
from tests.explain.generation import assert_same_state, run_and_trace, scheduler_state

REGION = (slice(4, 8), slice(10, 14))


def region_mask(h=16, w=16):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[REGION] = True
    return m


def region_predict():
    """A toy denoiser whose prediction depends only on the latent inside REGION: a fixed pattern
    Q plus a pattern P scaled by the region's mean."""
    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(2, 4, 16, 16, generator=g)

    def predict(x):
        r = x[:, :, REGION[0], REGION[1]].mean((1, 2, 3)).view(-1, 1, 1, 1)
        return Q + P * r

    x = torch.randn(4, 16, 16, generator=g).abs() + 0.5
    return predict, x


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_sd_pipeline("dpm++")
    trace = run_and_trace(pipe, "a red circle above a blue square", steps=3)
    return pipe, trace, from_pipeline(pipe, trace)


def test_bernoulli_masks_keep_a_share_p():
    m = bernoulli_masks(200, (16, 16), p=0.3, generator=torch.Generator().manual_seed(0))
    assert m.shape == (200, 16, 16)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(m.mean()) - 0.3) < 0.02


def test_grid_masks_are_smooth_shifted_grids():
    m = grid_masks(200, (16, 12), cells=4, p=0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (200, 16, 12)
    assert float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.5) < 0.05
    assert ((m > 0.05) & (m < 0.95)).float().mean() > 0.2  # bilinear ramps, not a binary grid
    # the random shift moves cell borders: not every mask has the same pattern of ramps
    assert not torch.equal(m[0] > 0.5, m[1] > 0.5)
    with pytest.raises(ValueError, match="grid cells"):
        grid_masks(1, (8, 8), cells=0)


def test_mask_stream_is_independent_of_batching():
    for kind in ("bernoulli", "grid"):
        sampler = MaskSampler((8, 8), kind, seed=3)
        whole = sampler.masks(0, 2 * MASK_CHUNK + 5)
        parts = torch.cat([MaskSampler((8, 8), kind, seed=3).masks(a, b) for a, b in ((0, 7), (7, 70), (70, 2 * MASK_CHUNK + 5))])
        assert torch.equal(whole, parts)
        assert not torch.equal(whole, MaskSampler((8, 8), kind, seed=4).masks(0, 2 * MASK_CHUNK + 5))
    with pytest.raises(ValueError, match="mask kind"):
        MaskSampler((8, 8), "gaussian")
    with pytest.raises(ValueError, match="between 0 and 1"):
        MaskSampler((8, 8), p=1.0)


@pytest.mark.parametrize("similarity", ["structure", "cosine", "neg_mse", "structure_paper"])
@pytest.mark.parametrize("masks", ["bernoulli", "grid"])
def test_centered_map_peaks_on_the_region_the_output_depends_on(similarity, masks):
    predict, x = region_predict()
    s = rise_map(predict, x, n_masks=300, similarity=similarity, masks=masks, cells=4, batch_size=100, centered=True)
    d = display_map(s)
    inside = region_mask()
    assert float(d[inside].mean()) > 3 * float(d[~inside].mean())


def test_paper_estimator_favours_the_region_too():
    predict, x = region_predict()
    s = rise_map(predict, x, n_masks=2000, similarity="structure", batch_size=500)
    inside = region_mask()
    assert float(s[inside].mean()) > float(s[~inside].mean())


def test_mean_score_is_classic_rise():
    predict, x = region_predict()
    s = rise_map(predict, x, n_masks=300, similarity="neg_mse", score="mean", batch_size=100, centered=True)
    assert bool(region_mask().flatten()[s.argmax()])


def test_masks_are_the_paper_accumulation():
    # a similarity that is 1 everywhere makes S = Σ M_n / (N p): the masks' mean over p
    x = torch.randn(4, 8, 8)
    ones = lambda a, b: torch.ones(a.shape[0], *a.shape[-2:])  # noqa: E731
    s = rise_map(lambda xb: xb, x, n_masks=50, similarity=ones, seed=1, batch_size=7, p=0.25)
    expected = MaskSampler((8, 8), p=0.25, seed=1).masks(0, 50).sum(0) / (50 * 0.25)
    assert torch.allclose(s, expected)


def test_df_rise_batched_equals_unbatched_and_memory_bound(tiny):
    _, trace, denoiser = tiny
    a = df_rise(denoiser, trace, 1, n_masks=12, batch_size=12, seed=5)
    b = df_rise(denoiser, trace, 1, n_masks=12, batch_size=5, seed=5)
    c = df_rise(denoiser, trace, 1, n_masks=12, memory_budget=1, seed=5)  # one mask per batch
    assert a.saliency.shape == trace.latent_size
    assert torch.allclose(a.saliency, b.saliency, atol=1e-4)
    assert torch.allclose(a.saliency, c.saliency, atol=1e-4)
    assert not torch.allclose(a.saliency, df_rise(denoiser, trace, 1, n_masks=12, seed=6).saliency)
    d = a.display()
    assert float(d.min()) == 0.0 and float(d.max()) == 1.0


def test_df_rise_compares_like_quantities(tiny):
    _, trace, denoiser = tiny
    for quantity in ("x0", "epsilon"):
        r = df_rise(denoiser, trace, 2, n_masks=4, quantity=quantity, similarity="cosine")
        assert r.quantity == quantity and torch.isfinite(r.saliency).all()
    # with a zero-masking probability of 0 the probe equals the reference: cosine 1 everywhere
    r = df_rise(denoiser, trace, 2, n_masks=3, p=0.999999, similarity="cosine", centered=False)
    assert torch.allclose(r.saliency, torch.ones_like(r.saliency), atol=1e-3)


def test_df_rise_leaves_the_scheduler_and_model_alone(tiny):
    pipe, trace, denoiser = tiny
    before = scheduler_state(pipe.scheduler)
    params = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    df_rise(denoiser, trace, 0, n_masks=4)
    assert_same_state(before, scheduler_state(pipe.scheduler))
    assert all(torch.equal(params[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_df_rise_clear_errors(tiny):
    _, trace, denoiser = tiny
    with pytest.raises(ValueError, match="at least 1"):
        df_rise(denoiser, trace, 0, n_masks=0)
    with pytest.raises(ValueError, match="more than"):
        df_rise(denoiser, trace, 0, n_masks=10**8)
    with pytest.raises(TypeError, match="whole number"):
        check_mask_count(2.5)
    with pytest.raises(IndexError, match="outside the trace"):
        df_rise(denoiser, trace, 7, n_masks=2)
    with pytest.raises(IndexError, match="item 2"):
        df_rise(denoiser, trace, 0, item=2, n_masks=2)
    with pytest.raises(ValueError, match="similarity"):
        df_rise(denoiser, trace, 0, n_masks=2, similarity="ssim")
    with pytest.raises(ValueError, match="quantity"):
        df_rise(denoiser, trace, 0, n_masks=2, quantity="x_prev")


def _token_trace(tokens: int = 5) -> Trace:
    return Trace(
        prompts=["p"],
        tokens=[[f"t{i}" for i in range(tokens)]],
        words=[[]],
        timesteps=torch.tensor([500.0]),
        sigmas=torch.tensor([1.0]),
        x_t=torch.randn(1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        x0=torch.zeros(1, 1, 4, 16, 16),
        meta={"guidance_scale": 2.0},
    )


def test_per_token_rise_finds_the_token_that_shapes_a_region():
    g = torch.Generator().manual_seed(1)
    base, pattern = torch.randn(2, 1, 4, 16, 16, generator=g)
    region = torch.zeros(1, 1, 16, 16)
    region[..., REGION[0], REGION[1]] = 1

    def token_model_fn(x, level, keep):
        cond = base + pattern * region * keep[:, 2].view(-1, 1, 1, 1)
        return base.expand_as(cond), cond

    denoiser = GuidedDenoiser(lambda x, lv: token_model_fn(x, lv, torch.ones(x.shape[0], 5)), "sample", 2.0, token_model_fn=token_model_fn)
    result = df_rise_tokens(denoiser, _token_trace(), 0, n_masks=200, similarity="neg_mse", batch_size=64)
    assert result.maps.shape == (5, 16, 16)
    inside = region_mask()
    signal = float(result.maps[2][inside].mean())
    assert signal > 0.1
    assert float(result.maps[2][~inside].abs().max()) < 1e-6  # outside the region nothing depends on any token
    for other in (1, 3):  # tokens the model ignores: only sampling noise
        assert float(result.maps[other][inside].abs().mean()) < 0.25 * signal
    assert torch.equal(result.maps[0], torch.zeros(16, 16))  # the start token is always kept


def test_per_token_rise_on_a_pipeline(tiny):
    _, trace, denoiser = tiny
    result = df_rise_tokens(denoiser, trace, 1, n_masks=6, batch_size=3)
    assert result.maps.shape == (len(trace.tokens[0]), *trace.latent_size)
    assert torch.isfinite(result.maps).all()
    no_tokens = GuidedDenoiser(lambda x, lv: (None, x), "sample", 1.0)
    with pytest.raises(ValueError, match="token_model_fn"):
        df_rise_tokens(no_tokens, _token_trace(), 0, n_masks=2)


def test_df_rise_inside_inference_mode(tiny):
    _, trace, denoiser = tiny
    outside = df_rise(denoiser, trace, 1, n_masks=4, batch_size=4)
    with torch.inference_mode():
        inside = df_rise(denoiser, trace, 1, n_masks=4, batch_size=4)
    assert torch.allclose(outside.saliency, inside.saliency, atol=1e-5)


def test_method_paper_runs_the_published_settings_and_warns(tiny):
    from explain.methods import defaults
    from explain.methods.rise import PaperMethodWarning

    _, trace, denoiser = tiny
    with pytest.warns(PaperMethodWarning, match="identity path"):
        r = df_rise(denoiser, trace, 1, method="paper", n_masks=4, batch_size=4)
    assert (r.similarity, r.centered, r.perturbation, r.method) == ("structure", False, "zero", "df_rise:paper")
    with pytest.warns(PaperMethodWarning):  # the same settings given by hand warn too
        df_rise(denoiser, trace, 1, **defaults.PAPER_RISE.with_masks(4).kwargs(), batch_size=4)
    d = df_rise(denoiser, trace, 1, n_masks=4, batch_size=4)
    assert d.method == "df_rise" and d.mask_kind == defaults.RISE.masks
    assert df_rise(denoiser, trace, 1, method="default", batch_size=32).n_masks == defaults.RISE.n_masks
    with pytest.raises(ValueError, match="unknown DF-RISE method"):
        df_rise(denoiser, trace, 1, method="best")


def test_cell_masks_are_binary_shifted_blocks():
    from explain.methods.rise import cell_masks

    m = cell_masks(50, (16, 16), cells=4, generator=torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and abs(float(m.mean()) - 0.5) < 0.1
    # blocks of 4 pixels: a row changes value at most at the block borders (plus the shift)
    changes = (m[:, :, 1:] != m[:, :, :-1]).sum(-1)
    assert int(changes.max()) <= 4
    assert not torch.equal(m[0], m[1])


def test_perturbations_replace_or_add_noise_only_where_masked():
    from explain.methods.rise import perturb

    x = torch.randn(4, 8, 8)
    m = torch.zeros(2, 8, 8)
    m[:, :4] = 1
    z = torch.randn(2, 4, 8, 8)
    zero = perturb(x, m, "zero")
    noisy = perturb(x, m, "noise", noise=z, noise_std=0.5)
    assert torch.equal(zero[:, :, :4], x[None, :, :4].expand(2, -1, -1, -1)) and float(zero[:, :, 4:].abs().max()) == 0
    assert torch.allclose(noisy[:, :, 4:], x[None, :, 4:] + 0.5 * z[:, :, 4:]) and torch.equal(noisy[:, :, :4], zero[:, :, :4])
    with pytest.raises(ValueError, match="perturbation"):
        perturb(x, m, "shuffle")
    with pytest.raises(ValueError, match="binary masks"):
        rise_map(lambda b: b, x, n_masks=4, masks="grid", score="kept")
    with pytest.raises(ValueError, match="noise_std"):
        rise_map(lambda b: b, x, n_masks=4, perturbation="noise")


def test_noise_rise_is_seeded_and_independent_of_batching():
    predict, x = region_predict()
    kw = dict(n_masks=70, masks="cells", cells=4, similarity="neg_mse", perturbation="noise", noise_std=0.7, score="kept", centered=True)
    a = rise_map(predict, x, batch_size=7, **kw)
    b = rise_map(predict, x, batch_size=64, **kw)
    assert torch.allclose(a, b, atol=1e-5)
    assert bool(region_mask().flatten()[rise_map(predict, x, batch_size=64, **{**kw, "n_masks": 400}).argmax()])
