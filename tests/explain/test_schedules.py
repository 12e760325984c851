import warnings

import pytest
import torch

from explain import schedules
from explain.schedules import (
    ScheduleSwapWarning,
    early_timesteps,
    exponential_sigmas,
    exponential_timesteps,
    latter_timesteps,
    schedules_swapped,
    sigmas_from_timesteps,
    swap_threshold,
)

# Exact vectors from the methods reference §4 (the paper's code, int() truncation).
PAPER = {
    (20, 10): (
        [999, 988, 985, 981, 975, 969, 961, 950, 937, 921, 900, 875, 842, 801, 749, 684, 602, 499, 370, 206],
        [999, 794, 630, 501, 398, 316, 251, 199, 158, 125, 100, 79, 63, 50, 39, 31, 25, 19, 15, 12],
    ),
    (20, 20): (
        [999, 963, 956, 947, 937, 926, 911, 895, 875, 851, 823, 789, 749, 702, 646, 579, 499, 405, 293, 159],
        [999, 841, 707, 595, 501, 421, 354, 298, 251, 211, 177, 149, 125, 105, 89, 74, 63, 53, 44, 37],
    ),
    (20, 60): (
        [999, 807, 789, 770, 749, 727, 702, 675, 646, 614, 579, 541, 499, 454, 405, 351, 293, 229, 159, 83],
        [999, 917, 841, 771, 707, 649, 595, 546, 501, 459, 421, 386, 354, 325, 298, 273, 251, 230, 211, 193],
    ),
    (30, 60): (
        [999, 893, 884, 875, 865, 854, 842, 829, 816, 801, 785, 768, 749, 729, 708, 684, 659, 632, 602, 571,
         536, 499, 459, 416, 370, 319, 265, 206, 143, 74],
        [999, 926, 857, 794, 735, 681, 630, 584, 541, 501, 464, 429, 398, 368, 341, 316, 292, 271, 251, 232,
         215, 199, 184, 171, 158, 146, 135, 125, 116, 107],
    ),
}


@pytest.mark.parametrize("steps,lam", sorted(PAPER))
def test_paper_vectors_exactly(steps, lam):
    early, latter = PAPER[(steps, lam)]
    assert early_timesteps(steps, lam) == early
    assert latter_timesteps(steps, lam) == latter
    assert exponential_timesteps(steps, "semantic", lam) == early
    assert exponential_timesteps(steps, "delicate", lam) == latter


def test_floating_point_edges_are_guarded():
    # α^(N+λ) is 1000.0000000000017 for (20, 10) and 999.999… for (20, 60): both must start at 999,
    # stay strictly decreasing and never reach 1000.
    a10 = schedules._alpha(20, 10, 1000) ** 30
    a60 = schedules._alpha(20, 60, 1000) ** 80
    assert a10 > 1000 and a60 < 1000
    for lam in (10, 60):
        for fn in (early_timesteps, latter_timesteps):
            ts = fn(20, lam)
            assert ts[0] == 999 and len(ts) == 20 and max(ts) < 1000
            assert all(a > b for a, b in zip(ts, ts[1:]))


def test_uniform_and_lambda_zero_keep_scheduler_spacing():
    assert exponential_timesteps(20, "uniform", 60) is None
    assert exponential_timesteps(20, "early", 0) is None


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="choose one of"):
        exponential_timesteps(20, "middle", 60)
    with pytest.raises(ValueError, match="non-negative integer"):
        exponential_timesteps(20, "early", -1)
    with pytest.raises(ValueError, match="positive integer"):
        exponential_timesteps(0, "early", 60)


def test_swap_warning_matches_the_documented_thresholds():
    # λ=290 with N=30 is the reference's example of swapped bands.
    early, latter = early_timesteps(30, 290), latter_timesteps(30, 290)
    assert early[1] == 466 and early[-1] == 22 and latter[1] == 978 and latter[-1] == 534
    assert schedules_swapped(30, 290) and not schedules_swapped(30, 60) and not schedules_swapped(20, 60)
    assert [swap_threshold(n) for n in (10, 20, 30, 50)] == [35, 69, 102, 169]
    with pytest.warns(ScheduleSwapWarning, match="smaller λ"):
        exponential_timesteps(30, "early", 290)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exponential_timesteps(30, "early", 60)


def test_sigmas_follow_alphas_cumprod_and_end_in_zero():
    from explain.testing import make_scheduler

    ac = make_scheduler("euler").alphas_cumprod.double()
    sig = sigmas_from_timesteps([999, 500, 10], ac)
    expected = ((1 - ac[[999, 500, 10]]) / ac[[999, 500, 10]]).sqrt().float()
    assert torch.allclose(sig[:3], expected) and sig[-1] == 0 and sig.shape == (4,)
    s = exponential_sigmas(20, "latter", 60, ac)
    assert s.shape == (21,) and torch.all(s[:-1] > s[1:])
    assert torch.allclose(s[0], expected[0])
    assert exponential_sigmas(10, "uniform").shape == (11,)
    with pytest.raises(ValueError, match="lie in"):
        sigmas_from_timesteps([1000], ac)






def test_a_schedule_that_repeats_time_steps_is_refused_with_a_lambda_that_works():
    # ⌊α^(λ+j)⌋ collides for small λ and many steps: DPM-Solver++ would divide by a zero step
    with pytest.raises(ValueError, match=r"repeats time steps .*λ=\d+ is the smallest larger λ that works") as err:
        exponential_timesteps(50, "latter", 5)
    fixed = int(str(err.value).split("λ=")[-1].split()[0])
    assert len(set(exponential_timesteps(50, "latter", fixed))) == 50
    assert len(set(exponential_timesteps(20, "early", 60))) == 20  # the paper's setting is fine
