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
