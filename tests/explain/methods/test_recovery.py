import json

import pytest
import torch

from explain.methods.recovery import (
    change_maps,
    first_settled_step,
    recovery_view,
    trace_recovery,
)

from tests.explain.synthetic import synthetic_trace


def test_quadrant_recovered_early_and_the_rest_at_the_end():
    tr = synthetic_trace(steps=6, size=8)
    view = trace_recovery(tr, tol=0.01)  # tight: the linear approach of the rest stays outside until the end
    assert view.change.shape == (5, 1, 8, 8) and view.distance.shape == (6, 1, 8, 8)
    steps = view.recovery_step[0]
    # the synthetic x0 settles its top-left quadrant at step 1 and everything else at step 5
    assert (steps[:4, :4] == 1).all()
    assert (steps[4:, :] == 5).all() and (steps[:, 4:] == 5).all()
    frac = view.recovered_fraction[:, 0]
    assert frac[-1] == 1.0 and frac[1] >= 0.25 and frac[0] < 0.25
    assert frac[1:].diff().min() >= 0  # after step 1, the recovered area never shrinks here
    # step 1 changed the quadrant most; later steps change only the rest
    assert view.change[0, 0, :4, :4].mean() > view.change[0, 0, 4:, 4:].mean()
    assert view.change[2, 0, :4, :4].abs().max() == 0


def test_change_and_distance_definitions():
    x0 = torch.zeros(3, 1, 2, 1, 2)
    x0[1, 0, 0, 0, 0] = 2.0
    x0[2, 0, :, 0, :] = 1.0
    ch = change_maps(x0)
    assert ch.shape == (2, 1, 1, 2)
    assert ch[0, 0, 0].tolist() == [1.0, 0.0]  # channel mean of |2 - 0| and 0
    final = torch.ones(1, 2, 1, 2)
    view = recovery_view(x0, final, tol=0.1)
    assert view.distance[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]  # (|2-1| + |0-1|) / 2 at step 1
    assert (view.recovery_step == 2).all()


def test_first_settled_step_requires_staying():
    r = torch.tensor([[True, False], [False, False], [True, True], [True, True]])
    assert first_settled_step(r).tolist() == [2, 2]
    assert first_settled_step(torch.tensor([[True], [False]])).tolist() == [2]  # never settles


def test_tolerance_scales_with_the_final():
    tr = synthetic_trace()
    a = trace_recovery(tr, tol=0.25)
    tr.x0 = tr.x0 * 10
    tr.final_latent = tr.final_latent * 10
    b = trace_recovery(tr, tol=0.25)
    assert torch.equal(a.recovered, b.recovered)
    assert torch.allclose(b.tolerance, a.tolerance * 10)
    loose = trace_recovery(tr, tol=5.0)
    assert loose.recovered_fraction.mean() > b.recovered_fraction.mean()


def test_preview_space_uses_the_final_image():
    tr = synthetic_trace(steps=4, size=8)
    final = (128 + torch.rand(1, 16, 16, 3) * 127).to(torch.uint8)
    previews = torch.zeros(4, 1, 16, 16, 3, dtype=torch.uint8)
    previews[2:] = final
    previews[1, :, :8] = final[:, :8]
    tr.x0_previews, tr.images = previews, final
    view = trace_recovery(tr, space="preview")
    assert view.space == "preview" and view.distance.shape == (4, 1, 16, 16)
    assert (view.recovery_step[0, :8] == 1).all() and (view.recovery_step[0, 8:] == 2).all()
    data = json.loads(json.dumps(view.to_json()))
    assert data["recovered_fraction"][0] == [pytest.approx(float(v)) for v in view.recovered_fraction[:, 0]]


def test_errors_say_what_to_change():
    tr = synthetic_trace()
    with pytest.raises(ValueError, match="no decoded x0 previews; record it with previews=True"):
        trace_recovery(tr, space="preview")
    with pytest.raises(ValueError, match="unknown space 'pixels'"):
        trace_recovery(tr, space="pixels")
    with pytest.raises(ValueError, match="tol must be positive"):
        trace_recovery(tr, tol=0)


def test_region_recovery_says_which_region_settles_first():
    from explain.methods.recovery import region_recovery, trace_recovery
    from tests.explain.synthetic import synthetic_trace

    trace = synthetic_trace(steps=6, size=8)
    view = trace_recovery(trace, "latent", tol=0.25)
    quadrant = torch.zeros(8, 8, dtype=torch.bool)
    quadrant[:4, :4] = True  # settles at step 1; the rest only at the last step
    first = region_recovery(view, quadrant)
    assert first.lead > 0.3 and first.half_step_inside < first.half_step_outside
    assert first.region_share == 0.25
    rest = region_recovery(view, ~quadrant)
    assert rest.lead == pytest.approx(-first.lead)
    # a saliency map: its top quarter is the quadrant; a 32 x 32 mask is resized to the grid
    saliency = quadrant.float() + 0.01 * torch.rand(8, 8)
    assert region_recovery(view, saliency, top=0.25).lead == pytest.approx(first.lead)
    big = quadrant.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert region_recovery(view, big).lead == pytest.approx(first.lead)
    assert set(first.to_json()) >= {"lead", "half_step_inside", "definitions"}
    with pytest.raises(ValueError, match="none or all"):
        region_recovery(view, torch.ones(8, 8, dtype=torch.bool))
