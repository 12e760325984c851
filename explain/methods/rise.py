"""DF-RISE: which regions of the latent the model's prediction at one step rests on.

At a chosen step of a trace, N random masks M_n keep part of the latent x_t and zero the rest;
each masked latent goes through the guided denoiser (classifier-free guidance as in the
generation), and a per-pixel similarity map s_n compares its prediction with the prediction for
the unmasked latent, on like quantities (x0 with x0, or ε with ε; the official code compared the
next latent with ε, bug B3). The saliency is RISE's estimator (Petsiuk et al. 2018) applied per
pixel, as the paper does:

    S = Σ_n M_n ⊙ s_n / (N · p)

Masks are the paper's per-pixel Bernoulli(p) draws on the latent grid, or RISE's low-resolution
grids, bilinearly upsampled and randomly shifted. They are generated in fixed chunks from
seeded generators, so a seed gives the same masks whatever the batch size (bug B5), and are
processed in batches that a memory budget sets. The denoiser is stateless, so no scheduler is
stepped or changed by a probe (bug B9).

`df_rise_tokens` is the per-token variant: masks over the prompt's token positions instead of
pixels; a dropped token takes the unconditional context at its position. For each token it gives
the map E[s | token kept] - E[s | token dropped]: where the prediction depends on that token.

Perturbations (``perturbation``): ``"zero"`` sets masked pixels to 0 (the paper); ``"blur"``
gives them the blurred latent; ``"noise"`` adds the step's own noise level again (``noise_scale``
times the latent's noise standard deviation, a fresh seeded draw per mask), so every masked
pixel is disturbed by the same amount whatever its value. Why it matters: the x0 prediction
contains the input itself, x0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ, so zeroing pixel i moves x0 at i by
x_t[i]/√ᾱ whatever the network does; a zero-fill map of x0 is then ∝ x_t² for a network that
does nothing (see `explain.methods.sanity`). Additive noise moves every pixel alike, so that
path gives a flat map and what remains is the network's own sensitivity.

``method`` picks a named preset of `explain.methods.defaults` (``"default"``, ``"paper"`` or a
variant name); the keyword defaults of `df_rise` are `defaults.RISE`.

For display, `display_map` applies ReLU (when anything is positive) and min-max, as the paper.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from explain.denoiser import QUANTITIES, GuidedDenoiser, NoiseLevel
from explain.methods import defaults
from explain.similarity import SimilarityFn, get_similarity

MASK_KINDS = ("bernoulli", "grid", "cells")
BINARY_MASKS = ("bernoulli", "cells")
MASK_CHUNK = 64  # masks are drawn in chunks of this many, each from its own seeded generator
MAX_MASKS = 1_000_000
SCORES = ("map", "mean", "kept")
PERTURBATIONS = ("zero", "blur", "noise")

PAPER_WARNING = (
    "DF-RISE as published (x0 compared by SSIM structure, masked pixels zeroed, uncentered) fails the sanity "
    "checks: on the embedded model (30 held-out prompts, step 14, 32 masks; benchmarks/bench_sanity.py) its map "
    "has Spearman ρ 0.85 with a randomised model's map; ρ 0.62 with the map of a null model returning a fixed ε "
    "(x0 then follows the input through the identity path x0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ) and 0.88 with that of one "
    "returning a fixed x0 (whose map is only how often each pixel was kept: the uncentered estimator's mask "
    "noise); ρ 0.16 with itself under another mask seed. Use it to reproduce the paper, not as evidence about "
    "the model (README: 'What each map is evidence of')."
)


class PaperMethodWarning(UserWarning):
    """DF-RISE is running the published algorithm, which fails the sanity checks."""


# ---------------------------------------------------------------------------- masks
def _chunk_seed(seed: int, chunk: int, salt: str = "") -> int:
    digest = hashlib.blake2b(f"{int(seed)}:{int(chunk)}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def bernoulli_masks(n: int, size: tuple[int, int], p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, h, w]`` 0/1 masks, each latent pixel kept independently with probability ``p``."""
    h, w = size
    return (torch.rand(n, h, w, generator=generator) < p).float()


def grid_masks(n: int, size: tuple[int, int], cells: int = 8, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """RISE masks ``[n, h, w]`` in [0, 1]: a ``cells × cells`` Bernoulli(p) grid, bilinearly
    upsampled to (cells + 1) cells of ceil(side / cells) pixels and cropped at a random shift."""
    h, w = size
    if cells < 1 or cells > max(h, w):
        raise ValueError(f"grid cells must be between 1 and the latent side ({max(h, w)}), got {cells}")
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n, 1, cells, cells, generator=generator) < p).float()
    up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (n,), generator=generator)
    dx = torch.randint(0, cell_w, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # [n, 1, w]
    return up[torch.arange(n)[:, None, None], 0, rows, cols].clamp_(0, 1)


def cell_masks(n: int, size: tuple[int, int], cells: int = 4, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary masks ``[n, h, w]``: a ``cells × cells`` Bernoulli(p) grid of ceil(side / cells)
    pixel blocks, shifted at random by up to one block (RISE's grid without the bilinear ramps,
    so every pixel is either kept untouched or masked, as the ``"kept"`` score needs)."""
    h, w = size
    if cells < 1 or cells > max(h, w):
        raise ValueError(f"grid cells must be between 1 and the latent side ({max(h, w)}), got {cells}")
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n, 1, cells + 1, cells + 1, generator=generator) < p).float()
    up = grid.repeat_interleave(cell_h, 2).repeat_interleave(cell_w, 3)
    dy = torch.randint(0, cell_h, (n,), generator=generator)
    dx = torch.randint(0, cell_w, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
    return up[torch.arange(n)[:, None, None], 0, rows, cols]


@dataclass
class MaskSampler:
    """Masks ``start..stop`` of a seeded stream; the same seed gives the same masks in any batching."""

    size: tuple[int, int]
    kind: str = "bernoulli"
    p: float = 0.5
    cells: int = 8
    seed: int = 0
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {', '.join(MASK_KINDS)}")
        if not 0.0 < float(self.p) < 1.0:
            raise ValueError(f"mask keep-probability p must be strictly between 0 and 1, got {self.p}")

    def _chunk(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache.clear()  # batches walk forwards: one chunk of memory is enough
            g = torch.Generator().manual_seed(_chunk_seed(self.seed, index, self.kind))
            if self.kind == "bernoulli":
                self._cache[index] = bernoulli_masks(MASK_CHUNK, self.size, self.p, g)
            elif self.kind == "cells":
                self._cache[index] = cell_masks(MASK_CHUNK, self.size, self.cells, self.p, g)
            else:
                self._cache[index] = grid_masks(MASK_CHUNK, self.size, self.cells, self.p, g)
        return self._cache[index]

    def masks(self, start: int, stop: int) -> torch.Tensor:
        return _take(self._chunk, start, stop)


def _take(chunk_fn, start: int, stop: int) -> torch.Tensor:
    parts = []
    i = start
    while i < stop:
        chunk, offset = divmod(i, MASK_CHUNK)
        take = min(stop - i, MASK_CHUNK - offset)
        parts.append(chunk_fn(chunk)[offset : offset + take])
        i += take
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass
class NoiseSampler:
    """Standard-normal draws ``[n, C, h, w]`` ``start..stop`` of a seeded stream, one per mask,
    the same in any batching (chunked like `MaskSampler`)."""

    shape: tuple[int, int, int]
    seed: int = 0
    salt: str = "noise"
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def _chunk(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache.clear()
            g = torch.Generator().manual_seed(_chunk_seed(self.seed, index, self.salt))
            self._cache[index] = torch.randn(MASK_CHUNK, *self.shape, generator=g)
        return self._cache[index]

    def draws(self, start: int, stop: int) -> torch.Tensor:
        return _take(self._chunk, start, stop)


def perturb(x: torch.Tensor, masks: torch.Tensor, perturbation: str = "zero", *, fill: torch.Tensor | float = 0.0, noise: torch.Tensor | None = None, noise_std: float = 0.0) -> torch.Tensor:
    """Probes ``[n, C, h, w]`` from one latent ``x`` ``[C, h, w]`` and masks ``[n, h, w]`` (1 =
    keep): ``"zero"`` / ``"blur"`` blend towards ``fill`` (0, or the blurred latent) where a mask
    is 0; ``"noise"`` adds ``noise_std · (1 - M) · noise`` (``noise`` ``[n, C, h, w]``)."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")
    mm = masks.unsqueeze(1).to(x.dtype)
    if perturbation == "noise":
        if noise is None:
            raise ValueError("the noise perturbation needs noise draws")
        return x.unsqueeze(0) + float(noise_std) * (1 - mm) * noise.to(device=x.device, dtype=x.dtype)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return x.unsqueeze(0) * mm + fill_t * (1 - mm)


def step_noise_std(denoiser: GuidedDenoiser, level: NoiseLevel) -> float:
    """The standard deviation of the noise in a latent at ``level``, in the denoiser's own latent
    space: √(1-ᾱ) for variance-preserving latents, σ for k-diffusion's x0 + σ ε and for rectified
    flow's (1-σ) x0 + σ ε (SD3, Flux)."""
    if denoiser.latent_space == "vp":
        return math.sqrt(max(1.0 - level.alpha_bar, 0.0))
    if denoiser.latent_space in ("sigma", "flow"):
        return float(level.sigma)
    raise ValueError(f"no noise level is known for latent space {denoiser.latent_space!r}; use perturbation='zero' or 'blur'")


def check_mask_count(n_masks) -> int:
    if isinstance(n_masks, bool) or not isinstance(n_masks, (int,)) and not (isinstance(n_masks, float) and n_masks.is_integer()):
        raise TypeError(f"the number of masks must be a whole number, got {n_masks!r}")
    n = int(n_masks)
    if n < 1:
        raise ValueError(f"the number of masks must be at least 1, got {n}; the paper used 500")
    if n > MAX_MASKS:
        raise ValueError(f"{n} masks is more than the {MAX_MASKS} allowed; a few hundred to a few thousand are enough")
    return n


# ---------------------------------------------------------------------------- core estimator
@dataclass
class RiseResult:
    """A DF-RISE saliency ``[h, w]`` at latent resolution (raw RISE estimate; see `display`)."""

    saliency: torch.Tensor
    n_masks: int
    similarity: str
    quantity: str
    mask_kind: str
    p: float
    step: int | None = None
    item: int = 0
    centered: bool = False
    reference: torch.Tensor | None = field(default=None, repr=False)
    perturbation: str = "zero"
    score: str = "map"
    method: str = "df_rise:custom"

    def display(self, relu: bool = True) -> torch.Tensor:
        return display_map(self.saliency, relu=relu)


def display_map(saliency: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """The paper's display normalisation: ReLU (skipped when nothing is positive, e.g. for a
    negative-MSE map), then min-max to [0, 1]. A constant map becomes all zeros."""
    s = saliency.float()
    if relu and bool((s > 0).any()):
        s = s.clamp_min(0)
    lo, hi = s.amin(), s.amax()
    if float(hi - lo) <= 1e-12:
        return torch.zeros_like(s)
    return (s - lo) / (hi - lo)


def rise_map(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    n_masks: int = 500,
    masks: str = "bernoulli",
    p: float = 0.5,
    cells: int = 8,
    similarity: str | SimilarityFn = "structure",
    seed: int = 0,
    batch_size: int = 16,
    fill: float | torch.Tensor = 0.0,
    reference: torch.Tensor | None = None,
    score: str = "map",
    centered: bool = False,
    perturbation: str = "zero",
    noise_std: float = 0.0,
    progress=None,
) -> torch.Tensor:
    """RISE over latent pixels for any batched ``predict([N, C, h, w]) -> [N, C', h, w]``.

    ``x`` is one latent ``[C, h, w]``; masked pixels take ``fill`` (0, as the paper), or with
    ``perturbation="blur"`` the blurred latent, or with ``"noise"`` get ``noise_std`` times a
    fresh standard-normal draw added (see `perturb`). ``reference``
    is the prediction to compare with (by default ``predict(x)``). ``score="map"`` accumulates
    the per-pixel similarity map (the paper); ``"mean"`` uses its spatial mean, as classic RISE
    uses one score per mask; ``"kept"`` its mean over the pixels the mask kept untouched (binary
    masks only), so a pixel is credited with how well the model predicts the *kept* part of the
    latent from what it sees: a prediction that only copies each input pixel (the identity
    path, whatever the parameterisation) scores every mask alike and gives a flat map. Returns S = Σ M_n ⊙ s_n / (N·p), ``[h, w]``, an estimate of
    E[s | pixel kept]. With ``centered`` the per-pixel mean similarity s̄ is subtracted first,
    S = Σ M_n ⊙ (s_n - s̄) / (N·p), an estimate of E[s | kept] - E[s]: how much keeping a pixel
    raises the similarity, rather than how similar a kept pixel is. It is far less noisy for a
    given N (the masks' own fluctuation, Σ M_n ≠ N·p, cancels).
    """
    n = check_mask_count(n_masks)
    if x.ndim != 3:
        raise ValueError(f"x must be one latent [C, h, w], got shape {tuple(x.shape)}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "kept" and masks not in BINARY_MASKS:
        raise ValueError(f"the 'kept' score needs binary masks ({', '.join(BINARY_MASKS)}), not {masks!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")
    if perturbation == "noise" and not (float(noise_std) > 0 and math.isfinite(float(noise_std))):
        raise ValueError(f"the noise perturbation needs a positive noise_std, got {noise_std}")
    sim = get_similarity(similarity)
    h, w = x.shape[-2:]
    sampler = MaskSampler((h, w), masks, p, cells, seed)
    noises = NoiseSampler(tuple(x.shape), seed) if perturbation == "noise" else None
    if perturbation == "blur":
        from explain.methods.faithfulness import gaussian_blur

        fill = gaussian_blur(x)
    if reference is None:
        reference = predict(x.unsqueeze(0))
    reference = reference if reference.ndim == 4 else reference.unsqueeze(0)
    total = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    sim_sum = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    mask_sum = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    kept_maps, kept_masks = [], []
    from explain.progress import bar

    counter = bar(progress, n, "DF-RISE masks")
    for start in range(0, n, int(batch_size)):
        stop = min(n, start + int(batch_size))
        m = sampler.masks(start, stop).to(x.device)  # [b, h, w]
        noise = noises.draws(start, stop) if noises is not None else None
        probes = perturb(x, m, perturbation, fill=fill, noise=noise, noise_std=noise_std)
        pred = predict(probes)
        counter.update(stop - start)
        s = sim(pred, reference)  # [b, h', w']
        if s.shape[-2:] != (h, w):
            s = F.interpolate(s.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
        if score == "kept":
            kept_maps.append(s.float())
            kept_masks.append(m.float())
            continue
        if score == "mean":
            s = s.mean((-2, -1), keepdim=True).expand(-1, h, w)
        total += (m * s.float()).sum(0)
        if centered:
            sim_sum += s.float().sum(0)
            mask_sum += m.sum(0)
    counter.close()
    if score == "kept":
        return _kept_estimate(torch.cat(kept_maps), torch.cat(kept_masks), float(p), centered)
    if centered:
        # Σ M_n ⊙ (s_n - s̄) estimates Cov(M, s) per pixel: the paper's E[s | kept] minus the
        # pixel's mean similarity, and free of the noise that Σ M_n ≠ N·p adds to the paper's sum
        total = total - sim_sum / n * mask_sum
    return total / (n * float(p))


def _kept_estimate(s: torch.Tensor, m: torch.Tensor, p: float, centered: bool) -> torch.Tensor:
    """The ``"kept"`` score's estimator from per-mask similarity maps ``s`` and binary masks
    ``m`` ``[N, h, w]``: each kept pixel's similarity is taken relative to its own mean over the
    masks that kept it, so a mask is not credited with *which* pixels it kept (some pixels are
    simply harder to predict) but with how much better than usual the kept pixels were
    predicted; the per-mask score g_n is the sum of those deviations over the kept pixels / hw,
    and pixel i gets Σ_n M_n(i) g_n / (N p) (centered: minus its mean)."""
    n = s.shape[0]
    kept_count = m.sum(0)
    own_mean = (s * m).sum(0) / kept_count.clamp_min(1.0)
    g = ((s - own_mean) * m).sum((-2, -1)) / float(s.shape[-2] * s.shape[-1])  # [N]
    total = torch.einsum("n,nhw->hw", g, m)
    if centered:
        total = total - g.mean() * kept_count
    return total / (n * p)


# ---------------------------------------------------------------------------- on a trace
def _latent_and_level(trace, step: int, item: int, device) -> tuple[torch.Tensor, NoiseLevel, int]:
    step = trace.check_step(step)
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    x = trace.x_t[step, item].float()
    if device is not None:
        x = x.to(device)
    return x, NoiseLevel.from_trace(trace, step), step


def resolve_settings(method: str | None, **given) -> defaults.RiseSettings:
    """The settings DF-RISE runs with: ``method`` (``"default"``, ``"paper"`` or a name in
    `defaults.VARIANTS`) fixes the estimator; ``n_masks`` / ``seed`` given as ``None`` take the
    preset's. Without ``method`` the given values are used as they are."""
    if method is None:
        base = defaults.RISE
        values = {k: (getattr(base, k) if v is None else v) for k, v in given.items()}
        return defaults.RiseSettings(**values)
    presets = {**defaults.PRESETS, **defaults.VARIANTS}
    if method not in presets:
        raise ValueError(f"unknown DF-RISE method {method!r}; choose one of {', '.join(presets)}")
    preset = presets[method]
    n_masks = given.get("n_masks")
    seed = given.get("seed")
    return replace(preset, n_masks=preset.n_masks if n_masks is None else n_masks, seed=preset.seed if seed is None else seed)


def df_rise(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    item: int = 0,
    *,
    method: str | None = None,
    n_masks: int | None = None,
    quantity: str = defaults.RISE.quantity,
    masks: str = defaults.RISE.masks,
    p: float = defaults.RISE.p,
    cells: int = defaults.RISE.cells,
    similarity: str | SimilarityFn = defaults.RISE.similarity,
    score: str = defaults.RISE.score,
    centered: bool = defaults.RISE.centered,
    perturbation: str = defaults.RISE.perturbation,
    noise_scale: float = defaults.RISE.noise_scale,
    seed: int | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress=None,
) -> RiseResult:
    """DF-RISE at ``step`` of ``trace`` (item ``item``) with the guided ``denoiser``.

    The keyword defaults are the project's measured default (`explain.methods.defaults.RISE`;
    ``n_masks=None`` is its mask count). ``method="paper"`` runs the published algorithm
    (`defaults.PAPER_RISE`) and warns that it fails the sanity checks; any ``method`` fixes
    every estimator setting but ``n_masks`` and ``seed``.

    ``quantity`` is what is compared: ``"x0"`` (the clean-latent prediction) or ``"epsilon"``
    (the noise prediction, the network's own output for ε models). ``perturbation`` is what a
    masked pixel becomes (``"zero"``, ``"blur"``, ``"noise"``: ``noise_scale`` times the step's
    noise level added; see the module doc). ``score="mean"`` credits each mask with the
    whole-image mean similarity; ``centered`` subtracts each pixel's mean similarity (see
    `rise_map`). Batches hold ``batch_size`` masks, or as many as ``memory_budget`` bytes allow
    (see `GuidedDenoiser.batch_size_for`); many masks are processed batch by batch, never refused.
    """
    if not isinstance(similarity, str):
        custom = similarity
        similarity_name = getattr(similarity, "__name__", "custom")
    else:
        custom, similarity_name = None, similarity
    settings = resolve_settings(
        method, n_masks=n_masks, quantity=quantity, masks=masks, p=p, cells=cells, similarity=similarity_name,
        centered=centered, perturbation=perturbation, score=score, noise_scale=noise_scale, seed=seed,
    )  # fmt: skip
    if settings.same_method(defaults.PAPER_RISE):
        warnings.warn(PAPER_WARNING, PaperMethodWarning, stacklevel=2)
    if settings.quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {settings.quantity!r}")
    n = check_mask_count(settings.n_masks)
    x, level, step = _latent_and_level(trace, step, item, denoiser.device)
    if batch_size is None:
        batch_size = denoiser.batch_size_for(x, memory_budget, limit=n)
    noise_std = settings.noise_scale * step_noise_std(denoiser, level) if settings.perturbation == "noise" else 0.0
    q = settings.quantity
    reference = denoiser.predict(x.unsqueeze(0), level, q)
    saliency = rise_map(
        lambda probes: denoiser.predict(probes, level, q),
        x,
        n_masks=n,
        masks=settings.masks,
        p=settings.p,
        cells=settings.cells,
        similarity=custom if custom is not None else settings.similarity,
        seed=settings.seed,
        batch_size=batch_size,
        reference=reference,
        score=settings.score,
        centered=settings.centered,
        perturbation=settings.perturbation,
        noise_std=noise_std,
        progress=progress,
    )
    method_name = defaults.method_id(settings) if custom is None else "df_rise:custom"
    return RiseResult(
        saliency.cpu(), n, similarity_name, q, settings.masks, float(settings.p), step, item, settings.centered,
        reference[0].cpu(), settings.perturbation, settings.score, method_name,
    )  # fmt: skip


@dataclass
class TokenRiseResult:
    """Per-token DF-RISE: ``maps[t]`` ``[h, w]`` is E[s | token t kept] - E[s | token t dropped]."""

    maps: torch.Tensor  # [T, h, w]
    tokens: list[str]
    n_masks: int
    step: int
    item: int = 0

    def word_map(self, token_indices: list[int]) -> torch.Tensor:
        return self.maps[list(token_indices)].mean(0)


def df_rise_tokens(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    item: int = 0,
    *,
    n_masks: int = 200,
    quantity: str = "x0",
    p: float = 0.5,
    similarity: str | SimilarityFn = "structure",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    keep_special: bool = True,
) -> TokenRiseResult:
    """Per-token DF-RISE: random subsets of the prompt's tokens are dropped (replaced by the
    unconditional context at their positions) and the per-pixel similarity of each prediction to
    the full-prompt prediction is credited to the tokens that were kept. The start and end tokens
    are always kept unless ``keep_special=False``."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    n = check_mask_count(n_masks)
    if not 0.0 < float(p) < 1.0:
        raise ValueError(f"token keep-probability p must be strictly between 0 and 1, got {p}")
    x, level, step = _latent_and_level(trace, step, item, denoiser.device)
    tokens = list(trace.tokens[item])
    t = len(tokens)
    if t == 0:
        raise ValueError("the trace has no token list for this item; per-token DF-RISE needs one")
    if batch_size is None:
        batch_size = denoiser.batch_size_for(x, memory_budget, limit=n)
    sim = get_similarity(similarity)
    with torch.no_grad():
        reference = denoiser.predict(x.unsqueeze(0), level, quantity)
        g = torch.Generator().manual_seed(_chunk_seed(seed, 0, "tokens"))
        keep_all = (torch.rand(n, t, generator=g) < p).float()
        if keep_special:
            keep_all[:, 0] = 1
            keep_all[:, -1] = 1
        h, w = x.shape[-2:]
        kept_sum = torch.zeros(t, h, w, device=x.device)
        all_sum = torch.zeros(h, w, device=x.device)
        for start in range(0, n, int(batch_size)):
            keep = keep_all[start : start + int(batch_size)].to(x.device)
            probes = x.unsqueeze(0).expand(keep.shape[0], *x.shape)
            pred = denoiser.predict_tokens(probes, level, keep, quantity)
            s = sim(pred, reference).float()  # [b, h, w]
            kept_sum += torch.einsum("bt,bhw->thw", keep, s)
            all_sum += s.sum(0)
        kept_n = keep_all.sum(0).to(x.device).view(t, 1, 1)
        dropped_n = (n - kept_n)
        kept_mean = kept_sum / kept_n.clamp_min(1)
        dropped_mean = (all_sum.unsqueeze(0) - kept_sum) / dropped_n.clamp_min(1)
        maps = torch.where((kept_n > 0) & (dropped_n > 0), kept_mean - dropped_mean, torch.zeros_like(kept_mean))
    return TokenRiseResult(maps.cpu(), tokens, n, step, item)
