"""Maps that need no model: the baselines a sceptical reader tries before believing a saliency map.

Each is a ``[h, w]`` map of one latent ``x`` ``[C, h, w]`` (the latent the explanation is made
at). A map that does not beat all of them in a faithfulness game, or that correlates with them,
says nothing the input did not already say.

* ``random``: U[0, 1) per position, seeded;
* ``center``: a centred Gaussian (σ = a quarter of the side): "objects are in the middle";
* ``abs_x``: |x_t| (channel mean): where the latent is large;
* ``contrast``: |x_t - blur(x_t)| (channel mean, the paper's 11×11 σ = 5 blur): where the latent
  has detail, which the paper's insertion game rewards through the identity path.
"""

from __future__ import annotations

import torch

from explain.methods.faithfulness import gaussian_blur, random_saliency

BASELINES = ("random", "center", "abs_x", "contrast")
DESCRIPTIONS = {
    "random": "U[0,1) per position",
    "center": "centred Gaussian, sigma = side / 4",
    "abs_x": "|x_t| (channel mean)",
    "contrast": "|x_t - blur(x_t)| (channel mean)",
}


def center_map(size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij")
    s = max(h, w) / 4
    return torch.exp(-(yy**2 + xx**2) / (2 * s * s))


def abs_map(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().mean(0)


def contrast_map(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x - gaussian_blur(x)).abs().mean(0)


def baseline_map(name: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One baseline map ``[h, w]`` of latent ``x`` ``[C, h, w]``."""
    if x.ndim != 3:
        raise ValueError(f"x must be one latent [C, h, w], got shape {tuple(x.shape)}")
    size = tuple(x.shape[-2:])
    if name == "random":
        return random_saliency(size, seed)
    if name == "center":
        return center_map(size)
    if name == "abs_x":
        return abs_map(x)
    if name == "contrast":
        return contrast_map(x)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def baseline_maps(x: torch.Tensor, seed: int = 0, names=BASELINES) -> dict[str, torch.Tensor]:
    return {name: baseline_map(name, x, seed) for name in names}
