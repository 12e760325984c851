"""The long library calls report progress when asked, and stay silent by default."""

import pytest
import torch

from explain import progress
from explain.adapters.diffusers import from_pipeline
from explain.methods import cam, faithfulness, rise
from explain.testing import tiny_sd_pipeline
from tests.explain.generation import run_and_trace


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_sd_pipeline("dpm++")
    trace = run_and_trace(pipe, "a red circle above a blue square", steps=3)
    return trace, from_pipeline(pipe, trace)


def recorder():
    calls = []
    return calls, lambda done, total, desc: calls.append((done, total, desc))


def test_df_rise_tells_a_callback_every_batch_up_to_the_mask_count(tiny):
    trace, den = tiny
    calls, callback = recorder()
    rise.df_rise(den, trace, 1, n_masks=24, batch_size=8, progress=callback)
    assert [c[0] for c in calls] == [8, 16, 24] and {c[1] for c in calls} == {24}
    assert "DF-RISE" in calls[0][2]


def test_games_and_df_cam_report_progress_too(tiny):
    trace, den = tiny
    calls, callback = recorder()
    faithfulness.insertion_deletion(den, trace, 1, torch.rand(trace.latent_size), batch_size=4, progress=callback)
    by_game = {desc: [] for _, _, desc in calls}
    for done, total, desc in calls:
        by_game[desc].append((done, total))
    assert set(by_game) == {"insertion game", "deletion game"}
    for points in by_game.values():
        assert points[-1][0] == points[-1][1] and len(points) > 1  # counted batch by batch to the end
    calls, callback = recorder()
    cam.df_cam(den, trace, 1, layers="up_blocks.0.resnets.0", progress=callback)
    assert [(c[0], c[1]) for c in calls] == [(1, 2), (2, 2)]


def test_progress_is_silent_by_default_and_a_tqdm_bar_on_request(tiny, capsys):
    trace, den = tiny
    rise.df_rise(den, trace, 1, n_masks=16, batch_size=8)
    assert capsys.readouterr().err == ""
    rise.df_rise(den, trace, 1, n_masks=16, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "DF-RISE masks" in err and "16/16" in err


def test_a_bad_progress_value_is_refused_with_what_to_pass():
    with pytest.raises(TypeError, match="None, True or a callable"):
        progress.bar("yes", 3, "x")
