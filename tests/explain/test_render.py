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
