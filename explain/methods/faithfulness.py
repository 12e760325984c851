"""Faithfulness of saliency maps at one denoising step, and a sanity check.

Insertion and deletion games (Petsiuk et al. 2018, as the paper plays them) at the *same* step
as the explanation (the official DF-CAM game ran at the last step, bug B10, with the
unconditional prompt, B11):

* latent positions are ordered by decreasing saliency (ties broken by a seeded shuffle) and
  moved ``stride`` at a time (the paper: the latent side length, giving side + 1 points), all
  channels together;
* insertion starts from the blurred latent (Gaussian 11×11, σ = 5, *reflect* padding; the
  official zero padding darkened the borders, B15) and inserts the true latent; deletion starts
  from the latent and replaces it with zeros;
* every point is scored by the distance (mean squared error) between the probe's one-step
  guided x0 prediction, made statelessly (no scheduler step, B9), and the x0 prediction for the
  untouched latent, in latent space and, when a decoder is given, in image space.

Direction: the scores are *distances*, as the paper's (its "FID" reduced to a feature distance).
A faithful map makes the insertion curve **fall** fast (low insertion AUC is good) and the
deletion curve **rise** fast (high deletion AUC is good). This is the opposite of RISE's
probability-based convention.

`auc` is the per-prompt trapezoid area over the fraction of positions moved (0..1);
`paper_auc` is the paper's aggregation (mean curve over prompts -> min-max -> trapezoid).
`random_saliency` gives the random-map baseline.

`model_randomization_check` is Adebayo et al.'s (2018) sanity check: the Spearman rank
correlation between maps computed with the trained model and with a re-initialised copy
(`randomized_copy`). A map that survives randomisation (correlation near 1) does not explain
the model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from explain.denoiser import GuidedDenoiser, NoiseLevel

MODES = ("insertion", "deletion")
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


# ---------------------------------------------------------------------------- substrates
def gaussian_blur(x: torch.Tensor, kernel_size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Per-channel Gaussian blur of ``[..., C, h, w]`` with reflect padding (replicate where the
    latent is too small to reflect)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd number, got {kernel_size}")
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:]).float()
    coords = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - (kernel_size - 1) / 2
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = k / k.sum()
    pad = kernel_size // 2
    h, w = shape[-2:]
    mode = "reflect" if pad < h and pad < w else "replicate"
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
    return y.reshape(shape).to(x.dtype)


def saliency_order(saliency: torch.Tensor, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Flat latent positions in decreasing saliency. A map at another resolution (an image-size
    DF-CAM map, say) is area-resized to ``size`` first; ties are broken by a seeded shuffle, not
    by position."""
    s = torch.as_tensor(saliency).float().cpu()
    if s.ndim != 2:
        raise ValueError(f"saliency must be a 2-D map [h, w], got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("saliency map has NaN or infinite values")
    if tuple(s.shape) != tuple(size):
        s = F.interpolate(s[None, None], size=size, mode="area" if s.shape[0] >= size[0] else "bilinear")[0, 0]
    flat = s.flatten()
    shuffle = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    order = torch.sort(flat[shuffle], descending=True, stable=True).indices
    return shuffle[order]


def game_points(num_positions: int, stride: int) -> int:
    return math.ceil(num_positions / stride) + 1


def game_latents(x: torch.Tensor, order: torch.Tensor, mode: str, stride: int, start: torch.Tensor | None = None, finish: torch.Tensor | None = None) -> torch.Tensor:
    """The sequence ``[P, C, h, w]`` of partially inserted (or deleted) latents: point j has the
    first j·stride positions of ``order`` taken from ``finish``, the rest from ``start``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c, h, w = x.shape
    if start is None:
        start = gaussian_blur(x) if mode == "insertion" else x
    if finish is None:
        finish = x if mode == "insertion" else torch.zeros_like(x)
    n = h * w
    points = game_points(n, stride)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    rank = rank.view(1, h, w).to(x.device)
    counts = torch.clamp(torch.arange(points, device=x.device) * stride, max=n).view(-1, 1, 1)
    moved = (rank < counts).unsqueeze(1)  # [P, 1, h, w]
    return torch.where(moved, finish.unsqueeze(0), start.unsqueeze(0))


# ---------------------------------------------------------------------------- scores and AUC
def auc(curve: torch.Tensor, fractions: torch.Tensor | None = None) -> float:
    """Trapezoid area under ``curve`` over the fraction of positions moved (0..1)."""
    y = torch.as_tensor(curve, dtype=torch.float64).flatten()
    if y.numel() < 2:
        raise ValueError("an AUC needs at least two curve points")
    x = torch.linspace(0, 1, y.numel(), dtype=torch.float64) if fractions is None else torch.as_tensor(fractions, dtype=torch.float64)
    return float(torch.trapezoid(y, x))


def normalized_auc(curve: torch.Tensor, fractions: torch.Tensor | None = None) -> float:
    """AUC of the curve min-max normalised to [0, 1] (shape only, as the paper reports)."""
    y = torch.as_tensor(curve, dtype=torch.float64).flatten()
    span = float(y.max() - y.min())
    return auc((y - y.min()) / span if span > 0 else torch.zeros_like(y), fractions)


def paper_auc(curves) -> float:
    """The paper's aggregation over prompts: mean curve, min-max normalised, trapezoid on [0, 1]
    (the official code divided by a hard-coded 1000 prompts, B17; here by the real count)."""
    stacked = torch.stack([torch.as_tensor(c, dtype=torch.float64).flatten() for c in curves])
    return normalized_auc(stacked.mean(0))


@dataclass
class GameResult:
    """One insertion or deletion game: distance curves over ``fractions`` and their AUCs."""

    mode: str
    fractions: torch.Tensor
    latent_curve: torch.Tensor
    image_curve: torch.Tensor | None = None
    stride: int = 0

    @property
    def latent_auc(self) -> float:
        return auc(self.latent_curve, self.fractions)

    @property
    def image_auc(self) -> float | None:
        return None if self.image_curve is None else auc(self.image_curve, self.fractions)


def play(
    predict_x0: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    saliency: torch.Tensor,
    *,
    mode: str = "insertion",
    stride: int | None = None,
    reference: torch.Tensor | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> GameResult:
    """Play one game on latent ``x`` ``[C, h, w]`` for any batched ``predict_x0``. ``stride``
    positions move per point (default: the latent width, as the paper). ``decode`` maps x0
    latents ``[N, C, h, w]`` to images for the image-space curve."""
    if x.ndim != 3:
        raise ValueError(f"x must be one latent [C, h, w], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    stride = w if stride is None else int(stride)
    if not 1 <= stride <= h * w:
        raise ValueError(f"stride must be between 1 and the number of latent positions ({h * w}), got {stride}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = saliency_order(saliency, (h, w), seed)
    latents = game_latents(x, order, mode, stride)
    if reference is None:
        reference = predict_x0(x.unsqueeze(0))
    reference = reference if reference.ndim == 4 else reference.unsqueeze(0)
    ref_image = decode(reference).float() if decode is not None else None
    from explain.progress import bar

    counter = bar(progress, latents.shape[0], f"{mode} game")
    lat, img = [], []
    for i in range(0, latents.shape[0], int(batch_size)):
        pred = predict_x0(latents[i : i + int(batch_size)]).float()
        lat.append(((pred - reference.float()) ** 2).mean((1, 2, 3)).cpu())
        if decode is not None:
            images = decode(pred).float()
            img.append(((images - ref_image) ** 2).mean((1, 2, 3)).cpu())
        counter.update(pred.shape[0])
    counter.close()
    points = latents.shape[0]
    fractions = torch.clamp(torch.arange(points, dtype=torch.float64) * stride / (h * w), max=1.0)
    return GameResult(mode, fractions, torch.cat(lat), torch.cat(img) if img else None, stride)


def insertion_deletion(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    saliency: torch.Tensor,
    item: int = 0,
    *,
    modes=MODES,
    stride: int | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
    progress=None,
) -> dict[str, GameResult]:
    """Insertion and/or deletion at ``step`` of ``trace`` (the explanation's own step), with the
    guided denoiser of the generation. Returns ``{mode: GameResult}``."""
    step = trace.check_step(step)
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    x = trace.x_t[step, item].float()
    if denoiser.device is not None:
        x = x.to(denoiser.device)
    level = NoiseLevel.from_trace(trace, step)
    if batch_size is None:
        batch_size = denoiser.batch_size_for(x, memory_budget)
    reference = denoiser.predict(x.unsqueeze(0), level, "x0")

    def predict_x0(latents):
        return denoiser.predict(latents, level, "x0")

    return {
        m: play(predict_x0, x, saliency, mode=m, stride=stride, reference=reference, decode=decode, batch_size=batch_size, seed=seed, progress=progress)
        for m in modes
    }


def random_saliency(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The random-map baseline: U[0, 1) per latent position, seeded."""
    return torch.rand(*size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- sanity check
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps of the same size (average ranks for ties; NaN when
    either map is constant)."""
    from scipy.stats import rankdata

    a = torch.as_tensor(a).detach().float().cpu().flatten().numpy()
    b = torch.as_tensor(b).detach().float().cpu().flatten().numpy()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.shape} vs {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``model`` with every parameter re-initialised (each sub-module's own
    ``reset_parameters``, else a normal draw), leaving the global random state alone."""
    clone = copy.deepcopy(model)
    # seed only the generators the re-initialisation draws from (the CPU's and the model's CUDA
    # devices'), each inside a fork: torch.manual_seed would reseed every CUDA device for good
    cuda = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device() for p in clone.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        handled: set[int] = set()
        for module in clone.modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
                handled.update(id(p) for p in module.parameters(recurse=False))
        for p in clone.parameters():
            if id(p) not in handled:
                p.normal_(0.0, 0.02)
    return clone


@dataclass
class SanityResult:
    """Rank correlation between maps of the trained and of the randomised model (low is good)."""

    spearman: float
    trained: torch.Tensor = field(repr=False)
    randomized: torch.Tensor = field(repr=False)


def model_randomization_check(explain: Callable[[GuidedDenoiser], torch.Tensor], trained: GuidedDenoiser, randomized: GuidedDenoiser) -> SanityResult:
    """Run ``explain(denoiser) -> map`` with both denoisers and compare the maps by rank."""
    a = explain(trained)
    b = explain(randomized)
    return SanityResult(spearman(a, b), a, b)
