import pytest
import torch

from explain.noise import (
    alpha_bar_from_sigma,
    model_output_from_x0,
    sigma_from_alpha_bar,
    x0_from_model_output,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    eps = torch.randn(2, 4, 3, 3, generator=g)
    a = torch.tensor([0.3, 0.9])
    ab = a.view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[prediction_type]
    assert torch.allclose(x0_from_model_output(xt, out, a, prediction_type), x0, atol=1e-5)
    assert torch.allclose(model_output_from_x0(xt, x0, a, prediction_type), out, atol=1e-5)


def test_sigma_round_trip_and_unknown_type():
    assert float(alpha_bar_from_sigma(sigma_from_alpha_bar(0.25))) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="epsilon"):
        x0_from_model_output(torch.zeros(1), torch.zeros(1), 0.5, "flow")


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "sample"])
def test_flow_matching_round_trip(prediction_type):
    from explain.noise import flow_output_from_x0, flow_sample, x0_from_flow_output

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    eps = torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.3, 0.85])
    s = sigma.view(-1, 1, 1, 1)
    xt = flow_sample(x0, eps, sigma)
    assert torch.allclose(xt, (1 - s) * x0 + s * eps)
    out = {"flow": eps - x0, "epsilon": eps, "sample": x0}[prediction_type]  # rectified flow: v = ε - x0
    assert torch.allclose(x0_from_flow_output(xt, out, sigma, prediction_type), x0, atol=1e-5)
    assert torch.allclose(flow_output_from_x0(xt, x0, sigma, prediction_type), out, atol=1e-5)


def test_flow_x0_is_one_euler_step_to_sigma_zero_and_unknown_types_are_refused():
    from explain.noise import x0_from_flow_output

    g = torch.Generator().manual_seed(2)
    xt, v = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    # FlowMatchEulerDiscreteScheduler: prev = x_t + (σ_next - σ)·v, so σ_next = 0 lands on x0
    assert torch.equal(x0_from_flow_output(xt, v, 0.6), xt + (0.0 - 0.6) * v)
    with pytest.raises(ValueError, match="flow-matching prediction_type"):
        x0_from_flow_output(xt, v, 0.5, "v_prediction")
    with pytest.raises(ValueError, match="x0_from_flow_output"):
        model_output_from_x0(xt, xt, 0.5, "flow")
