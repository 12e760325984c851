"""Per-pixel similarity maps between two stacks of latents (or predictions), for DF-RISE.

Every function takes ``a`` of shape ``[N, C, h, w]`` and ``b`` of shape ``[N, C, h, w]`` or
``[1, C, h, w]`` (one reference against many probes) and returns ``[N, h, w]``, larger meaning
more similar. They must be given *like* quantities (noise prediction with noise prediction, or
x0 with x0): the official DF-RISE compared the next latent with a noise prediction (bug B3).

* `ssim_structure`: the "structure" term of SSIM, (σ_ab + C3) / (σ_a σ_b + C3), in a Gaussian
  window, averaged over channels. ``paper_compatible=True`` reproduces the official ``ssim.py``
  (numerator 2σ_ab, C3 = 4.5e-4 for a data range of 1, zero padding), keeping its other defects
  fixed (B4): variances are clamped at zero instead of giving NaN, and everything runs in float32.
* `cosine`: cosine similarity of the channel vectors at each pixel.
* `neg_mse`: minus the channel-mean squared difference at each pixel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SimilarityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PAPER_WINDOW = 15
PAPER_SIGMA = 1.5
PAPER_C3 = (0.03 * 1.0) ** 2 / 2  # C2 / 2 with max_val = 1, as ssim.py


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim != 4:
        raise ValueError(f"similarity maps need [N, C, h, w] tensors, got a of shape {tuple(a.shape)}")
    if b.ndim == 3:
        b = b.unsqueeze(0)
    if b.ndim != 4 or b.shape[1:] != a.shape[1:] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(
            f"similarity: b must be [1 or {a.shape[0]}, {a.shape[1]}, {a.shape[2]}, {a.shape[3]}], got {tuple(b.shape)}"
        )
    return a.float(), b.float()


def gaussian_window(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised 2-D Gaussian ``[size, size]``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _local_mean(x: torch.Tensor, window: torch.Tensor, padding_mode: str) -> torch.Tensor:
    c = x.shape[1]
    pad = window.shape[-1] // 2
    kernel = window.expand(c, 1, *window.shape)
    if padding_mode == "zeros":
        return F.conv2d(x, kernel, padding=pad, groups=c)
    h, w = x.shape[-2:]
    # reflect needs the pad to be smaller than the side; small latents fall back to replicate
    mode = padding_mode if (padding_mode != "reflect" or (pad < h and pad < w)) else "replicate"
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), kernel, groups=c)


def ssim_structure(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    window_size: int = PAPER_WINDOW,
    sigma: float = PAPER_SIGMA,
    data_range: float | None = None,
    paper_compatible: bool = False,
) -> torch.Tensor:
    """SSIM's structure term per pixel, averaged over channels: ``[N, h, w]`` in about [-1, 1]
    (about [-2, 2] with ``paper_compatible``).

    ``data_range`` sets C3 = (0.03·L)²/2; by default L is the range of ``b`` (Stable Diffusion
    latents span about ±4, not the 0..1 the official code assumed). ``paper_compatible`` uses
    the official numerator 2σ_ab, C3 = 4.5e-4 and zero padding.
    """
    a, b = _check_pair(a, b)
    window = gaussian_window(window_size, sigma, device=a.device)
    if paper_compatible:
        c3 = PAPER_C3
        padding = "zeros"
    else:
        if data_range is None:
            data_range = float((b.amax() - b.amin()).clamp_min(1e-6))
        if not (data_range > 0 and math.isfinite(data_range)):
            raise ValueError(f"data_range must be a positive number, got {data_range}")
        c3 = (0.03 * data_range) ** 2 / 2
        padding = "reflect"
    b = b.expand_as(a)
    mu_a = _local_mean(a, window, padding)
    mu_b = _local_mean(b, window, padding)
    var_a = (_local_mean(a * a, window, padding) - mu_a**2).clamp_min(0)
    var_b = (_local_mean(b * b, window, padding) - mu_b**2).clamp_min(0)
    cov = _local_mean(a * b, window, padding) - mu_a * mu_b
    numerator = (2 * cov if paper_compatible else cov) + c3
    structure = numerator / (var_a.sqrt() * var_b.sqrt() + c3)
    return structure.mean(1)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of the channel vectors at each pixel, ``[N, h, w]`` in [-1, 1]."""
    a, b = _check_pair(a, b)
    return F.cosine_similarity(a, b.expand_as(a), dim=1, eps=eps)


def neg_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minus the mean over channels of the squared difference at each pixel, ``[N, h, w]`` (≤ 0)."""
    a, b = _check_pair(a, b)
    return -((a - b) ** 2).mean(1)


def _paper_structure(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ssim_structure(a, b, paper_compatible=True)


SIMILARITIES: dict[str, SimilarityFn] = {
    "structure": ssim_structure,
    "structure_paper": _paper_structure,
    "cosine": cosine,
    "neg_mse": neg_mse,
}


def get_similarity(name: str | SimilarityFn) -> SimilarityFn:
    """A similarity function by name (or a callable, returned as is)."""
    if callable(name):
        return name
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}") from None
