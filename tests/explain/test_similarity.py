import math

import pytest
import torch

from explain.similarity import (
    PAPER_C3,
    SIMILARITIES,
    cosine,
    gaussian_window,
    get_similarity,
    neg_mse,
    ssim_structure,
)


def _pair(seed=0, n=3, c=4, h=12, w=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randn(1, c, h, w, generator=g)


def test_identical_inputs_are_maximally_similar():
    a, _ = _pair()
    assert torch.allclose(ssim_structure(a, a), torch.ones(3, 12, 10), atol=1e-3)
    # the official numerator 2σ_ab makes identical inputs score about 2
    assert torch.allclose(ssim_structure(a, a, paper_compatible=True), torch.full((3, 12, 10), 2.0), atol=2e-2)
    assert torch.allclose(cosine(a, a), torch.ones(3, 12, 10), atol=1e-5)
    assert torch.equal(neg_mse(a, a), torch.zeros(3, 12, 10))


def test_negated_inputs_are_anti_similar():
    a, _ = _pair()
    assert torch.allclose(ssim_structure(a, -a, data_range=1e-3), -torch.ones(3, 12, 10), atol=1e-3)
    assert (ssim_structure(a, -a) < -0.8).all()  # C3 from the data range pulls it a little towards 0
    assert torch.allclose(cosine(a, -a), -torch.ones(3, 12, 10), atol=1e-5)
    assert (neg_mse(a, -a) < 0).all()


def test_structure_ignores_scale_and_offset_but_mse_does_not():
    a, _ = _pair()
    b = 3.0 * a + 1.5
    assert torch.allclose(ssim_structure(b, a, data_range=1e-3), torch.ones(3, 12, 10), atol=1e-3)
    assert (neg_mse(b, a) < -0.1).all()


def test_reference_broadcasts_over_the_batch():
    a, b = _pair()
    for name, fn in SIMILARITIES.items():
        assert torch.allclose(fn(a, b), fn(a, b.expand_as(a))), name
        assert fn(a, b).shape == (3, 12, 10)


def test_paper_structure_matches_a_hand_computation_at_one_pixel():
    a, b = _pair(n=1, h=9, w=9)
    window = gaussian_window(15, 1.5).double()
    # zero padding as ssim.py: the 15×15 window centred on pixel (4, 4) of a 9×9 image
    pa = torch.nn.functional.pad(a.double(), (7, 7, 7, 7))
    pb = torch.nn.functional.pad(b.double(), (7, 7, 7, 7))
    values = []
    for ch in range(4):
        xa, xb = pa[0, ch, 4:19, 4:19], pb[0, ch, 4:19, 4:19]
        mu_a, mu_b = (window * xa).sum(), (window * xb).sum()
        var_a = (window * xa * xa).sum() - mu_a**2
        var_b = (window * xb * xb).sum() - mu_b**2
        cov = (window * xa * xb).sum() - mu_a * mu_b
        values.append((2 * cov + PAPER_C3) / (var_a.sqrt() * var_b.sqrt() + PAPER_C3))
    expected = torch.stack(values).mean()
    got = ssim_structure(a, b, paper_compatible=True)[0, 4, 4]
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


def test_no_nan_from_rounding_negative_variances():
    # huge offsets with tiny variation make E[x²] - E[x]² round below zero in float32
    a = torch.full((2, 4, 8, 8), 3000.0) + 1e-4 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for paper in (False, True):
        out = ssim_structure(a, a[:1], paper_compatible=paper)
        assert torch.isfinite(out).all()
    out = ssim_structure(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))  # constant: C3 keeps it defined
    assert torch.isfinite(out).all()


def test_data_range_sets_the_constant():
    a, b = _pair()
    small = ssim_structure(a, b, data_range=0.01)
    large = ssim_structure(a, b, data_range=1000.0)
    # a huge C3 swamps the statistics and drives the term to 1
    assert (large - 1).abs().max() < (small - 1).abs().max()
    with pytest.raises(ValueError, match="data_range"):
        ssim_structure(a, b, data_range=-1.0)


def test_small_latents_and_bad_shapes():
    a = torch.randn(2, 4, 4, 4)
    assert torch.isfinite(ssim_structure(a, a[:1])).all()  # window larger than the latent
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        cosine(torch.randn(4, 4, 4), torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="b must be"):
        neg_mse(torch.randn(2, 4, 4, 4), torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        ssim_structure(a, a, window_size=4)


def test_lookup_by_name():
    assert get_similarity("cosine") is cosine
    assert get_similarity(neg_mse) is neg_mse
    with pytest.raises(ValueError, match="structure, structure_paper, cosine, neg_mse"):
        get_similarity("ssim")
    assert math.isclose(PAPER_C3, 4.5e-4)
