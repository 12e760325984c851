"""The exponential sigmas node: the paper's schedules on the model's own noise table."""

from __future__ import annotations

import types

import pytest
import torch

from explain import schedules
from explain.noise import sigma_from_alpha_bar
from nodes.sigmas import ExplainExponentialSigmas, model_alphas_cumprod


def fake_model(alphas_cumprod: torch.Tensor):
    sampling = types.SimpleNamespace(sigmas=sigma_from_alpha_bar(alphas_cumprod).float())
    return types.SimpleNamespace(model=types.SimpleNamespace(model_sampling=sampling))


def test_alphas_cumprod_round_trips_through_comfyuis_sigma_table():
    ac = schedules.sd_alphas_cumprod()
    torch.testing.assert_close(model_alphas_cumprod(fake_model(ac)), ac, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["early", "latter", "uniform"])
def test_node_gives_the_papers_schedule(schedule):
    ac = schedules.sd_alphas_cumprod()
    (sigmas,) = ExplainExponentialSigmas.execute(fake_model(ac), 20, schedule, 10).result
    expected = schedules.exponential_sigmas(20, schedule, 10, alphas_cumprod=ac)
    assert sigmas.shape == (21,) and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas, expected, rtol=1e-4, atol=1e-5)
    assert bool((sigmas[:-1] > sigmas[1:]).all())


def test_early_crowds_high_noise_and_latter_low_noise():
    model = fake_model(schedules.sd_alphas_cumprod())
    early = ExplainExponentialSigmas.execute(model, 20, "early", 10).result[0]
    latter = ExplainExponentialSigmas.execute(model, 20, "latter", 10).result[0]
    assert float(early[1:-1].median()) > float(latter[1:-1].median())


def test_swapped_schedules_are_logged_not_raised(caplog):
    model = fake_model(schedules.sd_alphas_cumprod())
    ExplainExponentialSigmas.execute(model, 4, "early", 200)
    assert "no longer describe" in caplog.text


def test_models_without_a_discrete_schedule_are_refused():
    flow = types.SimpleNamespace(model=types.SimpleNamespace(model_sampling=types.SimpleNamespace()))
    with pytest.raises(ValueError, match="discrete noise schedule"):
        ExplainExponentialSigmas.execute(flow, 20, "early", 60)
