"""Pictures of explanations: heatmap overlays, step grids, concept curves, recovery views.

Everything returns ``numpy`` ``uint8`` RGB arrays ``[H, W, 3]`` (what Gradio shows; the node
pack turns them into ComfyUI ``IMAGE`` tensors); `save_png` writes one. Figures
are drawn with matplotlib's object API on an Agg canvas, never through pyplot, so nothing
needs a display, no global backend is switched and renders from several threads do not
share state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from explain.trace import Trace

OVERLAY_MODES = ("paper", "alpha")


# ---------------------------------------------------------------------------- arrays
def as_uint8_image(image) -> np.ndarray:
    """RGB ``uint8`` ``[H, W, 3]`` from a numpy array or tensor, ``uint8`` or float in 0..1,
    ``[H, W, 3]``, ``[1, H, W, 3]`` (a ComfyUI IMAGE of one) or ``[H, W]`` (grey)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float().numpy() if image.dtype != torch.uint8 else image.numpy()
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(image, path: str | os.PathLike) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(as_uint8_image(image)).save(path, format="PNG")
    return path


def resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an RGB ``uint8`` image to ``(H, W)``."""
    from PIL import Image

    image = as_uint8_image(image)
    if image.shape[:2] == tuple(size):
        return image
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def _heat_array(heat, size: tuple[int, int] | None = None) -> np.ndarray:
    t = torch.as_tensor(np.asarray(heat) if not isinstance(heat, torch.Tensor) else heat).detach().float().cpu()
    if t.ndim != 2:
        raise ValueError(f"a heatmap must be [H, W], got shape {tuple(t.shape)}")
    if size is not None and tuple(t.shape) != tuple(size):
        t = torch.nn.functional.interpolate(t[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return t.numpy()


def minmax(a: np.ndarray) -> np.ndarray:
    a = np.maximum(a.astype(np.float32), 0)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(a)


def colorize(heat, cmap: str = "jet", normalize: bool = True) -> np.ndarray:
    """A heatmap ``[H, W]`` (0..1, or min-max normalised first) as an RGB ``uint8`` image."""
    import matplotlib

    m = _heat_array(heat)
    m = minmax(m) if normalize else np.clip(m, 0, 1)
    return (matplotlib.colormaps[cmap](m)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(image, heat, mode: str = "paper", alpha: float = 0.5, cmap: str = "jet", normalize: bool = True) -> np.ndarray:
    """Heatmap on an image. ``paper``: ``(1 - m^0.8) img + m^0.8 H`` with ``m`` the min-max
    normalised heatmap and ``H`` its colour map (the paper's display), so cold regions stay
    visible; ``alpha``: ``(1 - alpha) img + alpha H`` everywhere. The heatmap is resized
    bilinearly to the image."""
    import matplotlib

    img = as_uint8_image(image).astype(np.float32) / 255
    m = _heat_array(heat, img.shape[:2])
    m = minmax(m) if normalize else np.clip(m, 0, 1)
    colored = matplotlib.colormaps[cmap](m)[..., :3].astype(np.float32)
    if mode == "paper":
        w = (m**0.8)[..., None]
    elif mode == "alpha":
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in 0..1, got {alpha}")
        w = np.full(m.shape + (1,), alpha, dtype=np.float32)
    else:
        raise ValueError(f"unknown overlay mode {mode!r}; choose one of {', '.join(OVERLAY_MODES)}")
    out = ((1 - w) * img + w * colored).clip(0, 1)
    return (out * 255 + 0.5).astype(np.uint8)


def latent_rgb(latent: torch.Tensor) -> np.ndarray:
    """A rough picture of a latent ``[C, h, w]``: its first three channels, each min-max
    stretched. For traces recorded without decoded previews."""
    lat = latent.detach().float().cpu()
    if lat.shape[0] < 3:
        lat = torch.cat([lat, lat[:1].expand(3 - lat.shape[0], -1, -1)])
    lat = lat[:3]
    lo = lat.amin(dim=(1, 2), keepdim=True)
    hi = lat.amax(dim=(1, 2), keepdim=True)
    out = (lat - lo) / (hi - lo).clamp_min(1e-6)
    return (out.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def final_image(trace: Trace, item: int = 0) -> np.ndarray:
    """The trace's final image; the last x0 preview or a latent picture when it has none."""
    if trace.images is not None:
        return as_uint8_image(trace.images[item])
    if trace.x0_previews is not None:
        return as_uint8_image(trace.x0_previews[-1, item])
    final = trace.final_latent[item] if trace.final_latent is not None else trace.x0[-1, item]
    return resize(latent_rgb(final), trace.image_size, nearest=True)


# ---------------------------------------------------------------------------- colours
# Colour words drawn in their own colour in the concept curves. Front ends that know a model's
# vocabulary pass its own shades (the shapes world's, say) as ``palette``; these are the rest.
WORD_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.84, 0.15, 0.16), "orange": (1.0, 0.5, 0.05), "yellow": (0.9, 0.78, 0.0), "gold": (0.83, 0.69, 0.22),
    "green": (0.17, 0.63, 0.17), "cyan": (0.0, 0.75, 0.8), "teal": (0.0, 0.5, 0.5), "blue": (0.12, 0.3, 0.85),
    "navy": (0.0, 0.0, 0.5), "purple": (0.55, 0.2, 0.75), "violet": (0.56, 0.0, 1.0), "magenta": (0.85, 0.0, 0.75),
    "pink": (1.0, 0.45, 0.7), "brown": (0.55, 0.34, 0.16), "black": (0.1, 0.1, 0.1), "white": (0.8, 0.8, 0.8),
    "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5), "silver": (0.66, 0.66, 0.66),
}


def _color_word(label: str, palette: dict) -> str | None:
    base = label.split(" (")[0].lower()  # "blue (2)" is the second "blue"
    return next((w for w in base.split() if w in palette), None)


def word_colors(labels: Sequence[str], palette: dict | None = None) -> list[tuple[float, float, float]]:
    """One RGB colour (0..1) per label: a colour word gets its colour (``palette`` first, then
    `WORD_COLORS`); the others take tab10/tab20 colours not too close to any colour word's."""
    import matplotlib

    known = {**WORD_COLORS, **{k.lower(): tuple(float(c) for c in v[:3]) for k, v in (palette or {}).items()}}
    fixed = {i: known[w] for i, label in enumerate(labels) if (w := _color_word(label, known)) is not None}
    cmap = matplotlib.colormaps["tab10" if len(labels) - len(fixed) <= 10 else "tab20"]
    free = [tuple(float(v) for v in cmap(k)[:3]) for k in range(cmap.N)]
    free = [c for c in free if all(np.abs(np.subtract(c, f)).sum() > 0.45 for f in fixed.values())] or free
    out, k = [], 0
    for i in range(len(labels)):
        if i in fixed:
            out.append(fixed[i])
        else:
            out.append(free[k % len(free)])
            k += 1
    return out


def hex_color(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb[:3])


# ---------------------------------------------------------------------------- figures
def _figure(width_in: float, height_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def _plain(artist) -> None:
    """Show text as typed: a prompt word like ``$^$`` must not be parsed as mathtext."""
    artist.set_parse_math(False)


def _fit(image: np.ndarray, box: int) -> np.ndarray:
    """``image`` scaled to fit a ``box``-pixel square, keeping its aspect; small images are
    enlarged without smoothing (their pixels stay visible), large ones reduced smoothly."""
    from PIL import Image

    image = as_uint8_image(image)
    h, w = image.shape[:2]
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    resample = Image.NEAREST if scale > 1 else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, resample))


def colorbar_strip(width: int, cmap: str = "jet", height: int = 12) -> np.ndarray:
    """A horizontal colour ramp ``[height, width, 3]`` from the low end (left) to the high end."""
    import matplotlib

    ramp = np.linspace(0, 1, max(int(width), 2))
    row = (matplotlib.colormaps[cmap](ramp)[:, :3] * 255 + 0.5).astype(np.uint8)
    return np.repeat(row[None], height, axis=0)


def with_colorbar(image, cmap: str = "jet", low: str = "low", high: str = "high", label: str = "", dpi: int = 100) -> np.ndarray:
    """``image`` with a labelled colour bar under it (for a map shown on its own, as in the app)."""
    image = as_uint8_image(image)
    h, w = image.shape[:2]
    bar_h, text_h = 12, 16
    fig = _figure(w / dpi, (h + bar_h + text_h + 4) / dpi, dpi)
    canvas = np.full((h + bar_h + text_h + 4, w, 3), 255, np.uint8)
    canvas[:h] = image
    canvas[h + 3 : h + 3 + bar_h] = colorbar_strip(w, cmap, bar_h)
    fig.figimage(canvas, 0, 0, origin="upper")
    y = (text_h - 2) / 2 / fig.bbox.height
    for x, text, ha in ((2, low, "left"), (w / 2, label, "center"), (w - 2, high, "right")):
        if text:
            _plain(fig.text(x / w, y, text, fontsize=7, ha=ha, va="center"))
    return figure_to_array(fig)


def balanced_columns(count: int, max_columns: int) -> int:
    """Columns for ``count`` cells in rows of at most ``max_columns``, with rows as even as
    possible (7 words in rows of up to 6 become 4 + 3, never 6 + 1)."""
    if count <= 0:
        return 1
    rows = -(-count // max(1, int(max_columns)))
    return -(-count // rows)


def labeled_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    cell_inches: float = 1.15,
    dpi: int = 100,
    colorbar: dict | None = None,
) -> np.ndarray:
    """Images in a grid with row labels on the left and column titles on top (one list of
    titles for all rows, or one per row). ``None`` cells stay empty. ``colorbar`` (``cmap``,
    ``low``, ``high``, ``label``) adds a labelled colour bar under the grid.

    The cells are pasted into one picture and drawn as a single image, with only the labels
    left to matplotlib: a 40-cell grid then takes milliseconds, not seconds."""
    rows = len(cells)
    cols = max((len(r) for r in cells), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("a grid needs at least one image")
    cell = round(cell_inches * dpi)
    pad = 4
    label_w = round(0.9 * dpi) if row_labels else 0
    title_h = round(0.35 * dpi) if title else 0
    row_h = cell + round(0.28 * dpi)
    bar_h = round(0.42 * dpi) if colorbar else 0
    width, height = label_w + cols * cell, title_h + rows * row_h + bar_h
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            if img is None:
                continue
            fitted = _fit(img, cell - 2 * pad)
            fh, fw = fitted.shape[:2]
            top = title_h + r * row_h + (row_h - cell) + pad + (cell - 2 * pad - fh) // 2
            left = label_w + c * cell + pad + (cell - 2 * pad - fw) // 2
            canvas[top : top + fh, left : left + fw] = fitted
    if colorbar:
        bar_w = min(width - label_w - 2 * pad, 4 * cell)
        left = label_w + (width - label_w - bar_w) // 2
        top = title_h + rows * row_h + 4
        canvas[top : top + 10, left : left + bar_w] = colorbar_strip(bar_w, colorbar.get("cmap", "jet"), 10)
    fig = _figure(width / dpi, height / dpi, dpi)
    fig.figimage(canvas, 0, 0, origin="upper")

    def text(x_px: float, y_px: float, s: str, **kw):
        if s:
            _plain(fig.text(x_px / width, 1 - y_px / height, s, **kw))

    per_row_titles = bool(col_labels) and not isinstance(col_labels[0], str)
    for r in range(rows):
        labels = (col_labels[r] if r < len(col_labels) else []) if per_row_titles else (col_labels if r == 0 else []) if col_labels else []
        for c, label in enumerate(labels[:cols]):
            text(label_w + c * cell + cell / 2, title_h + r * row_h + (row_h - cell) + 2, label, fontsize=7, ha="center", va="bottom")
        if row_labels and r < len(row_labels):
            text(6, title_h + r * row_h + (row_h - cell) + cell / 2, row_labels[r], fontsize=8, ha="left", va="center")
    if title:
        text(width / 2, title_h * 0.45, title, fontsize=9, ha="center", va="center")
    if colorbar:
        y = title_h + rows * row_h + 4 + 10 + 9
        text(left, y, colorbar.get("low", "0"), fontsize=7, ha="left", va="center")
        text(left + bar_w, y, colorbar.get("high", "1"), fontsize=7, ha="right", va="center")
        text(left + bar_w / 2, y, colorbar.get("label", ""), fontsize=7, ha="center", va="center")
    return figure_to_array(fig)


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def pick_steps(num_steps: int, count: int | None) -> list[int]:
    """``count`` steps spread evenly over a run, always with the first and the last (all of
    them for ``count=None``)."""
    if count is None or count >= num_steps:
        return list(range(num_steps))
    if count <= 1:
        return [num_steps - 1]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def _preview(trace: Trace, kind: str, step: int, item: int) -> np.ndarray:
    previews = trace.x_t_previews if kind == "x_t" else trace.x0_previews
    if previews is not None:
        return as_uint8_image(previews[step, item])
    latents = trace.x_t if kind == "x_t" else trace.x0
    return latent_rgb(latents[step, item])


def step_grid_rows(steps: Sequence[int], columns: int = 10) -> list[list[int]]:
    """The steps of a step grid, wrapped into rows of at most ``columns`` (evenly)."""
    steps = list(steps)
    per_row = balanced_columns(len(steps), columns)
    return [steps[i : i + per_row] for i in range(0, len(steps), per_row)]


def step_grid(trace: Trace, steps: Sequence[int] | None = None, item: int = 0, count: int | None = None, columns: int = 10) -> np.ndarray:
    """The noisy latent x_t entering each step above the model's x0 prediction there (decoded
    previews when the trace has them, otherwise a rough latent picture); every step by
    default, in rows of at most ``columns`` steps."""
    chosen = [trace.check_step(s) for s in steps] if steps is not None else pick_steps(trace.num_steps, count)
    cells, row_labels, titles = [], [], []
    for part in step_grid_rows(chosen, columns):
        cells += [[_preview(trace, "x_t", s, item) for s in part], [_preview(trace, "x0", s, item) for s in part]]
        row_labels += ["x_t (noisy)", "x0 (predicted)"]
        titles += [[f"step {s}\nt={float(trace.timesteps[s]):.0f}" for s in part], []]
    decoded = trace.x0_previews is not None
    return labeled_grid(cells, row_labels=row_labels, col_labels=titles, title=None if decoded else "latent channels shown (trace has no decoded previews)")


HEAT_BAR = {"cmap": "jet", "low": "0 (least)", "high": "1 (most)", "label": "attention, min-max per map"}


def heatmap_grid(
    image,
    heatmaps: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    row_labels: Sequence[str] | None = None,
    mode: str = "paper",
    title: str | None = None,
    columns: int | None = None,
    colorbar: dict | None = HEAT_BAR,
) -> np.ndarray:
    """Overlays of word heatmaps on ``image``: one set of words (a dict, in even rows of at
    most ``columns``), or several rows (a list of dicts with the same words, e.g. one per step
    range). A colour bar says what the colours mean (``colorbar=None`` leaves it out)."""
    base = as_uint8_image(image)
    if isinstance(heatmaps, dict):
        items = list(heatmaps.items())
        per_row = balanced_columns(len(items), columns or len(items))
        rows = [items[i : i + per_row] for i in range(0, len(items), per_row)]
        cells = [[overlay(base, h, mode) for _, h in row] for row in rows]
        titles = [[k for k, _ in row] for row in rows]
        return labeled_grid(cells, row_labels=None, col_labels=titles, title=title, colorbar=colorbar)
    if not heatmaps:
        raise ValueError("no heatmaps to draw")
    words = list(heatmaps[0])
    cells = [[overlay(base, row[w], mode) for w in words] for row in heatmaps]
    return labeled_grid(cells, row_labels=row_labels, col_labels=words, title=title, colorbar=colorbar)


CURVE_LABELS = {"normalized": "per-step min-max across words (paper)", "share": "share of the prompt words' attention", "mass": "attention mass (raw)"}


def concept_curves(scores, kind: str = "share", title: str | None = None, dpi: int = 100, palette: dict | None = None) -> np.ndarray:
    """Per-word curves over the steps (`explain.methods.concepts.ConceptScores`), with each word's
    emergence step marked; colour words are drawn in their colour (see `word_colors`)."""
    values = {"normalized": scores.normalized, "share": scores.share, "mass": scores.mass}
    if kind not in values:
        raise ValueError(f"unknown curve kind {kind!r}; choose normalized, share or mass")
    data = values[kind].double().cpu().numpy()
    fig = _figure(6.4, 3.4, dpi)
    ax = fig.add_axes([0.1, 0.14, 0.65, 0.76])
    colors = word_colors(scores.labels, palette)
    steps = np.asarray(scores.steps)
    for j, label in enumerate(scores.labels):
        color = colors[j]
        ax.plot(steps, data[:, j], marker="o", markersize=2.5, linewidth=1.3, color=color, label=label)
        e = scores.emergence_step[j]
        if e in scores.steps:
            k = scores.steps.index(e)
            ax.plot([e], [data[k, j]], marker="*", markersize=9, color=color, markeredgecolor="black", markeredgewidth=0.5)
    _integer_steps(ax)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(CURVE_LABELS[kind], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="★ emergence", title_fontsize=7)
    for t in legend.get_texts():
        _plain(t)
    _plain(ax.set_title(title or f"concept curves ({kind})", fontsize=9))
    return figure_to_array(fig)


def recovery_grid(view, trace: Trace, steps: Sequence[int] | None = None, item: int = 0, count: int = 6) -> np.ndarray:
    """R1 view: for chosen steps, the x0 prediction, where this step changed it (all steps on
    one scale, the largest change shown, so panels compare; each step's own largest change is
    printed above it), what already matches the final image (green), then the per-pixel
    recovery step."""
    chosen = [trace.check_step(s) for s in steps] if steps is not None else pick_steps(view.num_steps, count)
    size = final_image(trace, item).shape[:2]
    changed = [s for s in chosen if s >= 1]
    scale = max((float(view.change[s - 1, item].max()) for s in changed), default=0.0)
    scale = scale if scale > 1e-12 else 1.0
    x0_row, change_row, match_row = [], [], []
    for s in chosen:
        pred = resize(_preview(trace, "x0", s, item), size)
        x0_row.append(pred)
        if s >= 1:
            change_row.append(resize(colorize(view.change[s - 1, item] / scale, cmap="magma", normalize=False), size))
        else:
            change_row.append(None)
        match = view.recovered[s, item].float()
        tint = _heat_array(match, size)[..., None]
        green = np.array([0.1, 0.85, 0.2], dtype=np.float32)
        match_row.append(((pred.astype(np.float32) / 255 * (1 - 0.6 * tint) + 0.6 * tint * green).clip(0, 1) * 255).astype(np.uint8))
    steps_map = view.recovery_step[item].float() / max(view.num_steps, 1)
    summary = [resize(colorize(steps_map, cmap="viridis", normalize=False), size, nearest=True)] + [None] * (len(chosen) - 1)
    titles = [
        [f"step {s}" for s in chosen],
        [f"max Δ {float(view.change[s - 1, item].max()):.2g}" if s >= 1 else "" for s in chosen],
        [f"{float(view.recovered_fraction[s, item]) * 100:.0f}% final" for s in chosen],
        ["recovery step\n(dark = early)"] + [""] * (len(chosen) - 1),
    ]
    return labeled_grid(
        [x0_row, change_row, match_row, summary],
        row_labels=["x0", "change", "matches\nfinal", "settled"],
        col_labels=titles,
        colorbar={"cmap": "magma", "low": "0", "high": f"{scale:.3g}", "label": f"change |Δx0| ({view.space}), one scale for all steps"},
    )


def recovery_curves(view, item: int = 0, dpi: int = 100) -> np.ndarray:
    """Share of pixels already matching the final image, and mean change, per step."""
    fig = _figure(6.4, 2.8, dpi)
    ax = fig.add_axes([0.09, 0.17, 0.8, 0.72])
    s = np.arange(view.num_steps)
    ax.plot(s, view.recovered_fraction[:, item].numpy(), marker="o", markersize=3, color="tab:green", label="recovered (matches final)")
    ax.set_ylim(-0.02, 1.02)
    _integer_steps(ax)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("fraction of pixels", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(s[1:], view.mean_change[:, item].numpy(), marker="s", markersize=3, color="tab:purple", label="mean change")
    ax2.set_ylabel(f"mean |Δx0| ({view.space})", fontsize=8)
    ax2.tick_params(labelsize=7)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right", frameon=False)
    ax.set_title("R1: how much of the image is recovered at each step", fontsize=9)
    return figure_to_array(fig)


def game_curves(curves: dict[str, Sequence[float]], fractions: Sequence[float], title: str, ylabel: str = "distance of x0 from the unperturbed prediction", dpi: int = 100) -> np.ndarray:
    """Insertion / deletion curves (``{label: values}`` over ``fractions``), the random map's dashed."""
    fig = _figure(6.4, 2.8, dpi)
    ax = fig.add_axes([0.1, 0.17, 0.62, 0.72])
    for label, values in curves.items():
        dashed = "random" in label
        color = "tab:blue" if label.startswith("insertion") else "tab:red"
        ax.plot(np.asarray(fractions)[: len(values)], np.asarray(values, dtype=float), linestyle="--" if dashed else "-", color=color, alpha=0.6 if dashed else 1.0, label=label)
    ax.set_xlabel("fraction of latent positions inserted / deleted", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for t in legend.get_texts():
        _plain(t)
    _plain(ax.set_title(title, fontsize=9))
    return figure_to_array(fig)


def onset_curves(onset, palette: dict | None = None, dpi: int = 100) -> np.ndarray:
    """Each word's effect on the x0 prediction per step (`explain.methods.timing.ConceptOnset`),
    scaled to its own largest effect, with the onset step marked (★) and the threshold dotted."""
    effect = onset.effect.double().cpu().numpy()
    fig = _figure(6.4, 3.4, dpi)
    ax = fig.add_axes([0.1, 0.14, 0.65, 0.76])
    colors = word_colors(onset.labels, palette)
    steps = np.arange(effect.shape[1])
    for j, label in enumerate(onset.labels):
        top = effect[j].max()
        curve = effect[j] / top if top > 0 else effect[j]
        ax.plot(steps, curve, marker="o", markersize=2.5, linewidth=1.3, color=colors[j], label=label)
        k = onset.onset_step[j]
        ax.plot([k], [curve[k]], marker="*", markersize=9, color=colors[j], markeredgecolor="black", markeredgewidth=0.5)
    ax.axhline(onset.threshold, color="gray", linestyle=":", linewidth=1)
    _integer_steps(ax)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(f"effect of editing the word ({onset.space}), / its largest", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="★ onset", title_fontsize=7)
    for t in legend.get_texts():
        _plain(t)
    _plain(ax.set_title("when each word starts to shape the prediction (causal onset)", fontsize=9))
    return figure_to_array(fig)
