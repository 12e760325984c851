import numpy as np
import pytest

from explain.methods.schedule_effects import band_energy, compare_schedules


def images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    base = np.stack([0.5 + 0.2 * np.sin(2 * np.pi * xx), 0.5 + 0.2 * np.cos(2 * np.pi * yy), 0.5 * np.ones_like(xx)], -1)

    def disc(cx, cy):
        return ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.04

    ref = base.copy()
    ref[disc(0.3, 0.3)] = (0.9, 0.1, 0.1)
    moved = base.copy()  # "early": the object is elsewhere (a layout change)
    moved[disc(0.7, 0.65)] = (0.9, 0.1, 0.1)
    detail = ref + 0.05 * rng.standard_normal(ref.shape)  # "latter": only fine detail changed
    masks = {"uniform": disc(0.3, 0.3), "early": disc(0.7, 0.65), "latter": disc(0.3, 0.3)}
    return {"uniform": ref, "early": moved, "latter": np.clip(detail, 0, 1)}, masks


def test_a_layout_change_is_low_frequency_and_a_detail_change_high():
    imgs, masks = images()
    out = compare_schedules(imgs, masks=masks)
    early, latter = out.differences["early"], out.differences["latter"]
    assert early.high_share < 0.5 < latter.high_share
    assert early.layout_correlation < 0.9 < latter.layout_correlation
    assert early.mask_iou == 0.0 and latter.mask_iou == 1.0
    assert set(out.to_json()["differences"]) == {"early", "latter"}


def test_band_energy_splits_a_pure_tone():
    yy, xx = np.mgrid[0:32, 0:32]
    slow = np.sin(2 * np.pi * xx / 32)[..., None]
    fast = np.sin(2 * np.pi * xx * 12 / 32)[..., None]
    low, high = band_energy(slow)
    assert high < 1e-6 * low
    low, high = band_energy(fast)
    assert low < 1e-6 * high
    with pytest.raises(ValueError, match="cutoff"):
        band_energy(slow, cutoff=1.5)


def test_the_reference_must_be_there():
    imgs, _ = images()
    with pytest.raises(ValueError, match="reference"):
        compare_schedules({"early": imgs["early"]})
