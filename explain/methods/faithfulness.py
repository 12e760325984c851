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

**Removal** (``removal``). The paper's game (``"paper"``: insertion from the blurred latent,
deletion to zeros) scores the identity path: x0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ moves by
Δx_t/√ᾱ at every replaced position whatever the network does, so a map of |x_t| (deletion)
or |x_t - blur(x_t)| (insertion) wins it with no model at all. ``"noise"`` (the default,
`explain.methods.defaults.GAME`) removes a position by adding the step's own noise level
again (``noise_scale`` × √(1-ᾱ), or σ in k-diffusion latents), one seeded draw shared by every
map and ``noise_draws`` draws averaged: every position is disturbed by the same amount in
distribution, so the identity path scores every order alike and only the network's response
separates maps. Insertion starts from the fully re-noised latent; deletion ends there.
``"blur"`` replaces positions by the blurred latent in both games (in distribution, but it
keeps the identity path's preference for high-contrast positions).

``quantity`` scores x0 (default) or ε distances.

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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from explain.denoiser import QUANTITIES, GuidedDenoiser, NoiseLevel
from explain.methods import defaults

MODES = ("insertion", "deletion")
REMOVALS = ("noise", "blur", "paper")
GAME_SCORES = ("all", "context", "final")
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


def removed_latent(x: torch.Tensor, removal: str = "paper", mode: str = "insertion", noise: torch.Tensor | None = None, noise_std: float = 0.0) -> torch.Tensor:
    """What a latent ``[C, h, w]`` looks like with every position removed: the blurred latent
    (``"blur"``, and the paper's insertion start), zeros (the paper's deletion), or the latent
    with ``noise_std · noise`` added (``"noise"``)."""
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {REMOVALS}, got {removal!r}")
    if removal == "noise":
        if noise is None or not noise_std > 0:
            raise ValueError("the noise removal needs a noise draw and a positive noise_std")
        return x + float(noise_std) * noise.to(x.device, x.dtype)
    if removal == "blur" or mode == "insertion":
        return gaussian_blur(x)
    return torch.zeros_like(x)


def game_latents(x: torch.Tensor, order: torch.Tensor, mode: str, stride: int, start: torch.Tensor | None = None, finish: torch.Tensor | None = None) -> torch.Tensor:
    """The sequence ``[P, C, h, w]`` of partially inserted (or deleted) latents: point j has the
    first j·stride positions of ``order`` taken from ``finish``, the rest from ``start`` (by
    default the paper's: insertion from the blurred latent, deletion to zeros)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c, h, w = x.shape
    if start is None:
        start = removed_latent(x, "paper", "insertion") if mode == "insertion" else x
    if finish is None:
        finish = x if mode == "insertion" else removed_latent(x, "paper", "deletion")
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
    removal: str = "paper",
    removed: torch.Tensor | None = None,
    score: str = "all",
    progress=None,
) -> GameResult:
    """Play one game on latent ``x`` ``[C, h, w]`` for any batched ``predict_x0`` (any
    prediction: the curve is its mean squared distance to ``reference``). ``stride`` positions
    move per point (default: the latent width, as the paper). ``removed`` is the fully removed
    latent (default: the paper's, see `removed_latent`; pass one for ``"noise"``). ``decode``
    maps predictions ``[N, C, h, w]`` to images for the image-space curve.

    ``score="all"`` measures the distance over every position (the paper). ``"context"``
    measures it only where the latent is untouched (deletion: the positions not yet removed;
    insertion: the positions inserted so far), as a mean over those positions: what the
    removed or missing *context* does to the model's prediction of the rest. A point with no
    such position takes its neighbour's value."""
    if score not in GAME_SCORES:
        raise ValueError(f"game score must be one of {GAME_SCORES}, got {score!r}")
    if x.ndim != 3:
        raise ValueError(f"x must be one latent [C, h, w], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    stride = w if stride is None else int(stride)
    if not 1 <= stride <= h * w:
        raise ValueError(f"stride must be between 1 and the number of latent positions ({h * w}), got {stride}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = saliency_order(saliency, (h, w), seed)
    if removed is None:
        if removal == "noise":
            raise ValueError("the noise removal needs the removed latent (see removed_latent)")
        removed = removed_latent(x, removal, mode)
    latents = game_latents(x, order, mode, stride, *((removed, x) if mode == "insertion" else (x, removed)))
    if reference is None:
        reference = predict_x0(x.unsqueeze(0))
    reference = reference if reference.ndim == 4 else reference.unsqueeze(0)
    ref_image = decode(reference).float() if decode is not None else None
    points = latents.shape[0]
    counts = torch.clamp(torch.arange(points) * stride, max=h * w)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    moved = rank.view(1, h, w) < counts.view(-1, 1, 1)  # [P, h, w]
    measured = (moved if mode == "insertion" else ~moved).float()  # where the latent is x itself
    from explain.progress import bar

    counter = bar(progress, latents.shape[0], f"{mode} game")
    lat, img = [], []
    for i in range(0, points, int(batch_size)):
        pred = predict_x0(latents[i : i + int(batch_size)]).float()
        d = ((pred - reference.float()) ** 2).mean(1).cpu()
        lat.append(d.mean((1, 2)) if score == "all" else _masked_mean(d, measured[i : i + int(batch_size)]))
        if decode is not None:
            images = decode(pred).float()
            di = ((images - ref_image) ** 2).mean(1).cpu()
            if score == "all":
                img.append(di.mean((1, 2)))
            else:
                m = F.interpolate(measured[i : i + int(batch_size)].unsqueeze(1), size=tuple(di.shape[-2:]), mode="nearest")[:, 0]
                img.append(_masked_mean(di, m))
        counter.update(pred.shape[0])
    counter.close()
    fractions = counts.double() / (h * w)
    lat_curve = torch.cat(lat)
    img_curve = torch.cat(img) if img else None
    if score == "context":
        lat_curve = _fill_empty(lat_curve)
        img_curve = _fill_empty(img_curve) if img_curve is not None else None
    return GameResult(mode, fractions, lat_curve, img_curve, stride)


def _masked_mean(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    total = m.sum((1, 2))
    return torch.where(total > 0, (d * m).sum((1, 2)) / total.clamp_min(1), torch.full_like(total, float("nan")))


def _fill_empty(curve: torch.Tensor) -> torch.Tensor:
    """Points without a measured position (NaN) take the nearest defined neighbour's value."""
    c = curve.clone()
    ok = ~torch.isnan(c)
    if not bool(ok.any()):
        return torch.zeros_like(c)
    idx = torch.arange(len(c))
    good = idx[ok]
    for i in idx[~ok].tolist():
        c[i] = c[good[(good - i).abs().argmin()]]
    return c


def insertion_deletion(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    saliency: torch.Tensor,
    item: int = 0,
    *,
    modes=MODES,
    removal: str = defaults.GAME.removal,
    quantity: str = defaults.GAME.quantity,
    noise_scale: float = defaults.GAME.noise_scale,
    noise_draws: int = defaults.GAME.noise_draws,
    score: str = defaults.GAME.score,
    stride: int | None = defaults.GAME.stride,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
    progress=None,
) -> dict[str, GameResult]:
    """Insertion and/or deletion at ``step`` of ``trace`` (the explanation's own step), with the
    guided denoiser of the generation. Returns ``{mode: GameResult}``; with ``removal="noise"``
    the curves are means over ``noise_draws`` seeded draws (the same draws for every map given
    the same ``seed``, so maps are compared on equal terms)."""
    step = trace.check_step(step)
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {REMOVALS}, got {removal!r}")
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if score not in GAME_SCORES:
        raise ValueError(f"game score must be one of {GAME_SCORES}, got {score!r}")
    if decode is not None and quantity != "x0":
        raise ValueError("the image-space curve decodes x0 predictions; use quantity='x0' with decode")
    x = trace.x_t[step, item].float()
    if denoiser.device is not None:
        x = x.to(denoiser.device)
    level = NoiseLevel.from_trace(trace, step)
    if batch_size is None:
        batch_size = denoiser.batch_size_for(x, memory_budget)
    if score == "final":
        from explain.methods.timing import resample

        def predict(latents):
            return resample(denoiser, trace, [step] * latents.shape[0], item=item, latents=latents, batch_size=batch_size)

        reference = predict(x.unsqueeze(0))
        score = "all"  # the distance of the final latents, over every position
    else:
        reference = denoiser.predict(x.unsqueeze(0), level, quantity)

        def predict(latents):
            return denoiser.predict(latents, level, quantity)

    if removal != "noise":
        return {
            m: play(predict, x, saliency, mode=m, stride=stride, reference=reference, decode=decode, batch_size=batch_size, seed=seed, removal=removal, score=score, progress=progress)
            for m in modes
        }
    draws = int(noise_draws)
    if draws < 1:
        raise ValueError(f"noise_draws must be at least 1, got {noise_draws}")
    from explain.methods.rise import step_noise_std

    std = float(noise_scale) * step_noise_std(denoiser, level)
    noises = game_noise(tuple(x.shape), draws, seed)
    out = {}
    for m in modes:
        games = [
            play(predict, x, saliency, mode=m, stride=stride, reference=reference, decode=decode, batch_size=batch_size, seed=seed,
                 removal="noise", removed=removed_latent(x, "noise", m, noise, std), score=score, progress=progress)
            for noise in noises
        ]  # fmt: skip
        out[m] = average_games(games)
    return out


def game_noise(shape: tuple[int, ...], draws: int, seed: int = 0) -> list[torch.Tensor]:
    """The noise draws of the ``"noise"`` removal: the same for every map given ``seed``."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + 17)
    return [torch.randn(*shape, generator=g) for _ in range(int(draws))]


def average_games(games: list[GameResult]) -> GameResult:
    """The mean curve of games played on the same positions (several noise draws)."""
    first = games[0]
    if len(games) == 1:
        return first
    latent = torch.stack([g.latent_curve for g in games]).mean(0)
    image = torch.stack([g.image_curve for g in games]).mean(0) if first.image_curve is not None else None
    return GameResult(first.mode, first.fractions, latent, image, first.stride)


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


def randomized_copy(model: torch.nn.Module, seed: int = 0, only: Sequence[str] | None = None) -> torch.nn.Module:
    """A deep copy of ``model`` with every parameter re-initialised (each sub-module's own
    ``reset_parameters``, else a normal draw), leaving the global random state alone. ``only``
    (module-name prefixes such as ``"up_blocks.2"``) re-initialises just those sub-modules, for
    the cascading check (`explain.methods.sanity.cascading_randomized_copies`)."""
    clone = copy.deepcopy(model)
    prefixes = None if only is None else tuple(only)

    def chosen(name: str) -> bool:
        return prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)

    # seed only the generators the re-initialisation draws from (the CPU's and the model's CUDA
    # devices'), each inside a fork: torch.manual_seed would reseed every CUDA device for good
    cuda = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device() for p in clone.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        handled: set[int] = set()
        for name, module in clone.named_modules():
            if not chosen(name):
                continue
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
                handled.update(id(p) for p in module.parameters(recurse=False))
        for name, p in clone.named_parameters():
            module_name = name.rpartition(".")[0]
            if id(p) not in handled and chosen(module_name):
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
