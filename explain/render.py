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


def labeled_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    cell_inches: float = 1.15,
    dpi: int = 100,
) -> np.ndarray:
    """Images in a grid with row labels on the left and column titles on top (one list of
    titles for all rows, or one per row). ``None`` cells stay empty."""
    rows = len(cells)
    cols = max((len(r) for r in cells), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("a grid needs at least one image")
    label_w = 0.9 if row_labels else 0.0
    title_h = 0.35 if title else 0.0
    fig = _figure(label_w + cols * cell_inches, title_h + rows * (cell_inches + 0.28), dpi)
    per_row_titles = bool(col_labels) and not isinstance(col_labels[0], str)
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = fig.add_axes(
                [
                    (label_w + c * cell_inches + 0.04) / fig.get_figwidth(),
                    1 - (title_h + (r + 1) * (cell_inches + 0.28) - 0.02) / fig.get_figheight(),
                    (cell_inches - 0.08) / fig.get_figwidth(),
                    (cell_inches - 0.08) / fig.get_figheight(),
                ]
            )
            ax.set_axis_off()
            img = row[c] if c < len(row) else None
            if img is not None:
                ax.imshow(as_uint8_image(img), interpolation="nearest")
            if col_labels:
                label = (col_labels[r][c] if c < len(col_labels[r]) else "") if per_row_titles else (col_labels[c] if r == 0 and c < len(col_labels) else "")
                if label:
                    ax.set_title(label, fontsize=7, pad=2)
        if row_labels and r < len(row_labels):
            fig.text(
                0.06 / fig.get_figwidth(),
                1 - (title_h + r * (cell_inches + 0.28) + 0.28 + cell_inches / 2) / fig.get_figheight(),
                row_labels[r],
                fontsize=8,
                va="center",
                ha="left",
                wrap=True,
            )
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / fig.get_figheight())
    return figure_to_array(fig)


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def pick_steps(num_steps: int, count: int) -> list[int]:
    """``count`` steps spread evenly over a run, always with the first and the last."""
    if count >= num_steps:
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


def step_grid(trace: Trace, steps: Sequence[int] | None = None, item: int = 0, count: int = 8) -> np.ndarray:
    """Two rows: the noisy latent x_t entering each step and the model's x0 prediction there
    (decoded previews when the trace has them, otherwise a rough latent picture)."""
    chosen = [trace.check_step(s) for s in steps] if steps is not None else pick_steps(trace.num_steps, count)
    rows = [[_preview(trace, "x_t", s, item) for s in chosen], [_preview(trace, "x0", s, item) for s in chosen]]
    titles = [f"step {s}\nt={float(trace.timesteps[s]):.0f}" for s in chosen]
    decoded = trace.x0_previews is not None
    return labeled_grid(
        rows,
        row_labels=["x_t (noisy)", "x0 (predicted)"],
        col_labels=titles,
        title=None if decoded else "latent channels shown (trace has no decoded previews)",
    )


def heatmap_grid(
    image,
    heatmaps: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    row_labels: Sequence[str] | None = None,
    mode: str = "paper",
    title: str | None = None,
    columns: int | None = None,
) -> np.ndarray:
    """Overlays of word heatmaps on ``image``: one row of words (a dict), or several rows (a
    list of dicts with the same words, e.g. one per step range)."""
    base = as_uint8_image(image)
    if isinstance(heatmaps, dict):
        items = list(heatmaps.items())
        per_row = columns or len(items)
        rows = [items[i : i + per_row] for i in range(0, len(items), per_row)]
        cells = [[overlay(base, h, mode) for _, h in row] for row in rows]
        titles = [[k for k, _ in row] for row in rows]
        return labeled_grid(cells, row_labels=None, col_labels=titles, title=title)
    if not heatmaps:
        raise ValueError("no heatmaps to draw")
    words = list(heatmaps[0])
    cells = [[overlay(base, row[w], mode) for w in words] for row in heatmaps]
    return labeled_grid(cells, row_labels=row_labels, col_labels=words, title=title)


def concept_curves(scores, kind: str = "normalized", title: str | None = None, dpi: int = 100) -> np.ndarray:
    """Per-word curves over the steps (`explain.methods.concepts.ConceptScores`), with each word's
    emergence step marked."""
    values = {"normalized": scores.normalized, "share": scores.share, "mass": scores.mass}
    if kind not in values:
        raise ValueError(f"unknown curve kind {kind!r}; choose normalized, share or mass")
    data = values[kind].double().cpu().numpy()
    fig = _figure(6.4, 3.4, dpi)
    ax = fig.add_axes([0.09, 0.14, 0.66, 0.76])
    import matplotlib

    colors = matplotlib.colormaps["tab10" if len(scores.labels) <= 10 else "tab20"]
    steps = np.asarray(scores.steps)
    for j, label in enumerate(scores.labels):
        color = colors(j % colors.N)
        ax.plot(steps, data[:, j], marker="o", markersize=2.5, linewidth=1.3, color=color, label=label)
        e = scores.emergence_step[j]
        if e in scores.steps:
            k = scores.steps.index(e)
            ax.plot([e], [data[k, j]], marker="*", markersize=9, color=color, markeredgecolor="black", markeredgewidth=0.5)
    _integer_steps(ax)
    ax.set_xlabel("step", fontsize=8)
    ylabel = {"normalized": "per-step min-max (paper)", "share": "share of prompt-word attention", "mass": "attention mass"}[kind]
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="★ emergence", title_fontsize=7)
    ax.set_title(title or f"concept curves ({kind})", fontsize=9)
    return figure_to_array(fig)


def recovery_grid(view, trace: Trace, steps: Sequence[int] | None = None, item: int = 0, count: int = 6) -> np.ndarray:
    """R1 view: for chosen steps, the x0 prediction, where this step changed it (each step
    scaled to its own largest change, printed above it), what already matches the final image
    (green), then the per-pixel recovery step."""
    chosen = [trace.check_step(s) for s in steps] if steps is not None else pick_steps(view.num_steps, count)
    size = final_image(trace, item).shape[:2]
    x0_row, change_row, match_row = [], [], []
    for s in chosen:
        pred = resize(_preview(trace, "x0", s, item), size)
        x0_row.append(pred)
        if s >= 1:
            # each step scaled to its own largest change: the row shows where, the titles how much
            change_row.append(resize(colorize(view.change[s - 1, item], cmap="magma"), size))
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
