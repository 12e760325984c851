import numpy as np
import pytest
import torch

from explain import render
from explain.methods.concepts import concept_scores
from explain.methods.heatmaps import word_heatmaps
from explain.methods.recovery import trace_recovery

from tests.explain.synthetic import synthetic_trace


def test_as_uint8_image_accepts_the_usual_layouts():
    f = np.full((4, 5, 3), 0.5, dtype=np.float32)
    assert render.as_uint8_image(f).dtype == np.uint8 and render.as_uint8_image(f)[0, 0, 0] == 128
    comfy = torch.full((1, 4, 5, 3), 1.0)
    assert render.as_uint8_image(comfy).shape == (4, 5, 3) and render.as_uint8_image(comfy).max() == 255
    assert render.as_uint8_image(torch.zeros(4, 5, dtype=torch.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"expected an RGB image \[H, W, 3\]"):
        render.as_uint8_image(np.zeros((3, 4, 5)))


def test_paper_overlay_follows_the_formula():
    img = np.full((2, 2, 3), 100, np.uint8)
    heat = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    out = render.overlay(img, heat, mode="paper").astype(np.float32) / 255
    jet = render.colorize(heat).astype(np.float32) / 255
    m = np.array([[0.0, 1.0], [0.5, 0.25]])[..., None] ** 0.8
    expected = (1 - m) * (100 / 255) + m * jet
    assert np.abs(out - expected).max() < 2 / 255
    assert np.array_equal(render.overlay(img, heat)[0, 0], img[0, 0])  # cold pixels keep the image
    alpha = render.overlay(img, heat, mode="alpha", alpha=0.0)
    assert np.array_equal(alpha, img)
    with pytest.raises(ValueError, match="unknown overlay mode"):
        render.overlay(img, heat, mode="screen")


def test_overlay_resizes_the_heatmap_to_the_image():
    img = np.zeros((32, 32, 3), np.uint8)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1
    out = render.overlay(img, heat)
    assert out.shape == (32, 32, 3)
    assert out[:4, :4].sum() > out[-8:, -8:].sum()


def test_colorize_and_latent_rgb():
    c = render.colorize(torch.linspace(0, 1, 12).view(3, 4))
    assert c.shape == (3, 4, 3) and c.dtype == np.uint8
    assert not np.array_equal(c[0, 0], c[-1, -1])
    lat = render.latent_rgb(torch.randn(4, 8, 8))
    assert lat.shape == (8, 8, 3) and lat.min() == 0 and lat.max() == 255


def test_pick_steps_keeps_first_and_last():
    assert render.pick_steps(20, 5) == [0, 5, 10, 14, 19]
    assert render.pick_steps(3, 8) == [0, 1, 2]
    assert render.pick_steps(10, 1) == [9]


def _not_blank(a: np.ndarray) -> bool:
    return a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8 and a.std() > 5


def test_figures_render_to_arrays_and_png(tmp_path):
    tr = synthetic_trace(steps=5)
    image = render.final_image(tr)
    assert image.shape == (32, 32, 3)
    grid = render.step_grid(tr, count=3)
    assert _not_blank(grid) and grid.shape[1] > grid.shape[0]  # a wide two-row grid
    heat = render.heatmap_grid(image, word_heatmaps(tr, ["red", "blue"]))
    assert _not_blank(heat)
    rows = render.heatmap_grid(image, [word_heatmaps(tr, ["red"], steps=s) for s in ("0:2", "2:")], row_labels=["early", "late"])
    assert _not_blank(rows) and rows.shape[0] > heat.shape[0]
    curves = render.concept_curves(concept_scores(tr))
    assert _not_blank(curves)
    with pytest.raises(ValueError, match="unknown curve kind"):
        render.concept_curves(concept_scores(tr), kind="rank")
    view = trace_recovery(tr)
    assert _not_blank(render.recovery_grid(view, tr, count=3))
    assert _not_blank(render.recovery_curves(view))
    path = render.save_png(grid, tmp_path / "sub" / "grid.png")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), grid)


def test_step_grid_uses_decoded_previews_when_present():
    tr = synthetic_trace(steps=3)
    tr.x_t_previews = torch.zeros(3, 1, 16, 16, 3, dtype=torch.uint8)
    tr.x0_previews = torch.full((3, 1, 16, 16, 3), 255, dtype=torch.uint8)
    tr.x0_previews[..., 1:] = 0  # pure red x0 previews
    grid = render.step_grid(tr)
    red = (grid[..., 0] > 200) & (grid[..., 1] < 50) & (grid[..., 2] < 50)
    assert red.sum() > 3 * 50  # three red cells are drawn


# ---------------------------------------------------------------------------- issue 16
def test_prompt_words_with_dollar_signs_are_drawn_as_text_not_mathtext():
    tr = synthetic_trace(steps=3)
    image = render.final_image(tr)
    odd = {r"$\foo{$": torch.rand(8, 8), "$^$": torch.rand(8, 8)}
    assert _not_blank(render.heatmap_grid(image, odd, title=r"steps $\x$"))  # mathtext would raise here
    scores = concept_scores(tr)
    scores.labels = [r"$\foo{$", "$^$"] + scores.labels[2:]
    assert _not_blank(render.concept_curves(scores))
    assert _not_blank(render.with_colorbar(image, label="$^$"))
    assert _not_blank(render.game_curves({"$^$ (random)": [1.0, 0.5]}, [0.0, 1.0], title=r"$\foo{$"))


def test_heatmap_grids_carry_a_colour_bar_from_cold_to_hot():
    image = np.full((32, 32, 3), 128, np.uint8)
    maps = {"red": torch.rand(8, 8), "blue": torch.rand(8, 8)}
    with_bar = render.heatmap_grid(image, maps)
    without = render.heatmap_grid(image, maps, colorbar=None)
    assert with_bar.shape[0] > without.shape[0]
    bar = with_bar[without.shape[0] :]
    jet = render.colorize(torch.linspace(0, 1, 64).view(1, 64))[0]
    blue_end, red_end = jet[0].astype(int), jet[-1].astype(int)
    row = bar[np.argmax((np.abs(bar.astype(int) - blue_end).sum(-1) < 30).sum(1))]  # the bar's row
    cols = np.nonzero(np.abs(row.astype(int) - 255).sum(-1) > 30)[0]
    assert np.abs(row[cols[0]].astype(int) - blue_end).sum() < 40 and np.abs(row[cols[-1]].astype(int) - red_end).sum() < 40
    shown = render.with_colorbar(image)
    assert shown.shape[0] > 32 and np.array_equal(shown[:32, :32], image)


def test_recovery_change_panels_share_one_scale():
    tr = synthetic_trace(steps=4)
    view = trace_recovery(tr)
    view.change[:] = 0
    view.change[0, 0, :, :] = 1.0  # step 1 changes everything a lot
    view.change[2, 0, :, :] = 0.1  # step 3 a little, everywhere
    grid = render.recovery_grid(view, tr, steps=[1, 3])
    big = render.colorize(torch.ones(2, 2), cmap="magma", normalize=False)[0, 0].astype(int)
    # the change row is the second of four: its cells are flat colours; the small change must be dark
    colours = {tuple(c) for c in grid.reshape(-1, 3)}
    assert tuple(big) in colours  # step 1 at the top of the shared scale
    own_scale = render.colorize(torch.full((2, 2), 0.1), cmap="magma", normalize=False)[0, 0]
    assert tuple(own_scale) in colours  # step 3 at a tenth of it, not stretched to its own maximum


def test_step_grid_shows_every_step_in_even_rows():
    assert render.step_grid_rows(range(20)) == [list(range(10)), list(range(10, 20))]
    assert [len(r) for r in render.step_grid_rows(range(13))] == [7, 6]
    assert render.pick_steps(20, None) == list(range(20))
    tr = synthetic_trace(steps=12)
    assert render.step_grid(tr).shape[0] > render.step_grid(tr, steps=[0, 11]).shape[0]  # two rows of steps


def test_word_grids_never_leave_one_word_alone_on_a_row():
    assert render.balanced_columns(7, 6) == 4 and render.balanced_columns(6, 6) == 6 and render.balanced_columns(13, 6) == 5
    image = np.zeros((16, 16, 3), np.uint8)
    maps = {f"w{i}": torch.rand(4, 4) for i in range(7)}
    seven = render.heatmap_grid(image, maps, columns=6, colorbar=None)
    four = render.heatmap_grid(image, dict(list(maps.items())[:4]), colorbar=None)
    assert seven.shape[1] == four.shape[1]  # 4 + 3, as wide as one row of four


def test_colour_words_get_their_colour_and_others_stay_distinct():
    colours = render.word_colors(["a", "blue", "circle", "red (2)", "square"], palette={"blue": (0.1, 0.2, 0.9)})
    assert colours[1] == (0.1, 0.2, 0.9) and colours[3] == render.WORD_COLORS["red"]
    others = [colours[0], colours[2], colours[4]]
    assert len(set(others)) == 3
    for c in others:  # no other word is drawn blue or red
        assert np.abs(np.subtract(c, colours[1])).sum() > 0.45 and np.abs(np.subtract(c, colours[3])).sum() > 0.45
    assert render.hex_color((1.0, 0.5, 0.0)) == "#ff8000"
