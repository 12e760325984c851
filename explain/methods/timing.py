"""Causal concept timing (R2 answered causally): when does the model stop needing a prompt word?

Attention-share curves (`explain.methods.concepts`) say how much attention a word gets at each
step, which is not when the model *decides* the concept: in the shapes world colour words get
most of their attention at the last step although colour is settled in x0 at step 0. Here the
question is put to the model directly. For each word and each step s the run is repeated from
step s with the word's tokens removed from the conditioning (replaced by the unconditional
context at their positions, as per-token DF-RISE does, `GuidedDenoiser.token_model_fn`):

* ``mode="from"``: removed at every step from s on. If the result no longer changes, the word
  had done its work before s; the **decision step** is the first s from which the result stays
  close to the unmodified one (`decision_step`: the effect stays at or below ``threshold`` times
  the effect of removing the word for the whole run);
* ``mode="at"``: removed at step s only; the effect curve says at which steps the word matters
  (its peak is `peak_step`).

Both ask when the model stops *needing* the word (lock-in, as PCI's concept insertion, arXiv
2512.08486). A model that stays steerable to the end has no early lock-in even for an attribute
that is visible in x0 from the first step: on the embedded model a colour word still changes the
result when removed or swapped from step 15 on, although colour is settled in x0 at step 0-1.
`concept_onset` asks the other causal question, when the word starts to *shape* the model's
prediction: at each traced step, the x0 prediction with the word edited (removed, or swapped for a
contrasting value) against the unedited one, on the traced x_t; the **onset step** is the first
step at which that effect reaches ``threshold`` times its largest value. It costs one guided
evaluation per word and step, no re-runs.

Measured on the embedded model (``benchmarks/bench_timing.py``; attribute pairs ordered as the
ground-truth settle steps): onset with swapped words, decoded, 77.0 % on the 12-prompt
development set it was designed on but **61.3 %** on the 30 held-out prompts, against lock-in
50.3 %, attention-share peaks 38.8 % and a kind-only prior (each attribute its kind's mean settle
step over the other prompts) 74.4 %. Neither timing is evidence of *when a concept is decided*
until one beats that prior.

The effect is the mean squared distance of the final latent to the unmodified re-run's final
latent (in the trace's latent space; decode the finals for an image-space or attribute test, as
``benchmarks/bench_timing.py`` does with the shapes-world checker, `decision_from_correct`).

**The sampler** (`resample`): the re-runs need a sampler loop from step s, written here over the
model-agnostic `GuidedDenoiser` and the trace's own timesteps and sigmas, in k-diffusion's
σ-parameterisation (a variance-preserving latent is converted with x_σ = x_vp·√(1+σ²)):
``"dpmpp_2m"`` (DPM-Solver++(2M) as k-diffusion's ``sample_dpmpp_2m``: first order at the first
step and at the last one, to σ = 0, as diffusers' multistep solver with ``final_sigmas_type
="zero"``) or ``"ddim"`` (first order everywhere). A re-run from step s > 0 takes x_t[s] and, for
the second-order history, x0[s-1] from the trace. It is an approximation of the traced sampler
whenever that was another one (Euler ancestral, say, whose noise is not in the trace);
`reproduction_error` says how closely it reproduces the traced final latent (on the embedded
model, see the README's evidence section).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from explain.denoiser import GuidedDenoiser, NoiseLevel

SAMPLERS = ("dpmpp_2m", "ddim")
MODES = ("from", "at")
# schedulers (trace.meta["scheduler"], as diffusers and ComfyUI name them) whose deterministic
# update `resample` reproduces exactly with the second-order solver; everything else gets DDIM
SECOND_ORDER = ("DPMSolverMultistepScheduler", "dpmpp_2m", "dpmpp_2m_karras")


def sampler_for(trace) -> str:
    """The re-run sampler that matches the trace's: DPM-Solver++(2M) for DPM-Solver multistep
    runs, DDIM (= Euler in σ space) otherwise."""
    name = str(trace.meta.get("scheduler", "") or trace.meta.get("sampler", ""))
    return "dpmpp_2m" if name in SECOND_ORDER else "ddim"


# ---------------------------------------------------------------------------- sampler steps (σ space)
def _to_sigma(x: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    if space == "vp":
        return x * math.sqrt(1.0 + sigma * sigma)
    if space == "sigma":
        return x
    raise ValueError(f"the re-run sampler knows the 'vp' and 'sigma' latent spaces, not {space!r}")


def _from_sigma(x: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    if space == "vp":
        return x / math.sqrt(1.0 + sigma * sigma)
    return x


def sampler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, *, sampler: str = "dpmpp_2m", old_x0: torch.Tensor | None = None, sigma_prev: float | None = None) -> torch.Tensor:
    """One deterministic step in σ space (x = x0 + σ ε) from ``sigma`` to ``sigma_next`` given
    the prediction ``x0``; DPM-Solver++(2M) uses the previous step's ``old_x0`` (at
    ``sigma_prev``) when given. A step to σ = 0 returns x0."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sigma_next <= 0:
        return x0
    if sampler == "ddim" or old_x0 is None or sigma_prev is None:
        return x0 + (sigma_next / sigma) * (x - x0)
    t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    h, h_last = t_next - t, t - t_prev
    r = h_last / h
    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
    return (sigma_next / sigma) * x - math.expm1(-h) * d


def _sigmas(trace) -> list[float]:
    return [float(s) for s in trace.sigmas] + [0.0]


def resample(
    denoiser: GuidedDenoiser,
    trace,
    starts: Sequence[int],
    keep: torch.Tensor | None = None,
    item: int = 0,
    *,
    sampler: str = "auto",
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    alternatives: Sequence[GuidedDenoiser] = (),
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-run the trace's sampling from each step in ``starts`` to the end; returns the final
    latents ``[R, C, h, w]`` (R = len(starts)). ``latents`` ``[R, C, h, w]`` (optional) replaces
    the traced x_t of each run's start step (a perturbed latent, for the regenerate game).
    ``choice`` ``[R, S]`` (optional) says which denoiser run r uses at step s: 0 is
    ``denoiser``, k >= 1 is ``alternatives[k - 1]`` (e.g. the same model conditioned on an
    edited prompt), for counterfactual re-runs.

    ``keep`` ``[R, S, T]`` (optional) masks the prompt's tokens per run and step (1 = keep; a
    dropped position takes the unconditional context), through the denoiser's
    ``token_model_fn``. Runs are batched step by step (those that have started). ``sampler``
    is ``"dpmpp_2m"``, ``"ddim"`` or ``"auto"`` (`sampler_for` the trace)."""
    sampler = sampler_for(trace) if sampler == "auto" else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = trace.num_steps
    starts = [trace.check_step(int(s)) for s in starts]
    if not starts:
        raise ValueError("no start steps given")
    r = len(starts)
    if keep is not None:
        if keep.ndim != 3 or keep.shape[0] != r or keep.shape[1] != steps:
            raise ValueError(f"keep must be [runs={r}, steps={steps}, tokens], got {tuple(keep.shape)}")
        if denoiser.token_model_fn is None:
            raise ValueError("this denoiser cannot mask prompt tokens (it has no token_model_fn)")
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    sig = _sigmas(trace)
    space = denoiser.latent_space
    device = denoiser.device
    x = torch.stack([trace.x_t[s, item].float() for s in starts]) if latents is None else latents.float().clone()
    if x.shape[0] != r:
        raise ValueError(f"latents must hold one latent per run ({r}), got {x.shape[0]}")
    old = [trace.x0[s - 1, item].float() if s > 0 else None for s in starts]
    old_x0 = torch.stack([o if o is not None else torch.zeros_like(x[0]) for o in old])
    has_old = torch.tensor([o is not None for o in old])
    if device is not None:
        x, old_x0 = x.to(device), old_x0.to(device)
    denoisers = [denoiser, *alternatives]
    if choice is not None:
        choice = torch.as_tensor(choice, dtype=torch.long)
        if tuple(choice.shape) != (r, steps) or int(choice.min()) < 0 or int(choice.max()) >= len(denoisers):
            raise ValueError(f"choice must be [runs={r}, steps={steps}] with entries 0..{len(denoisers) - 1}, got {tuple(choice.shape)}")
    start_t = torch.tensor(starts)
    size = batch_size or denoiser.batch_size_for(x[0], limit=max(r, 1))
    for j in range(min(starts), steps):
        active = (start_t <= j).nonzero().flatten().tolist()
        level = NoiseLevel(timestep=float(trace.timesteps[j]), sigma=sig[j])
        x0 = torch.empty_like(x[active])
        position = {i: k for k, i in enumerate(active)}
        by_model: dict[int, list[int]] = {}
        for i in active:
            by_model.setdefault(int(choice[i, j]) if choice is not None else 0, []).append(i)
        for d, runs in by_model.items():
            model = denoisers[d]
            for a in range(0, len(runs), size):
                idx = runs[a : a + size]
                xb = x[idx]
                kb = keep[idx, j] if keep is not None and d == 0 else None
                with torch.no_grad():
                    if kb is not None and bool((kb < 1).any()):
                        pred = model.predict_tokens(xb, level, kb.to(xb.device), "x0")
                    else:
                        pred = model.predict(xb, level, "x0")
                for k, i in enumerate(idx):
                    x0[position[i]] = pred[k].to(x0.dtype)
        for k, i in enumerate(active):
            xs = _to_sigma(x[i], sig[j], space)
            use_old = sampler == "dpmpp_2m" and (j > starts[i] or bool(has_old[i])) and j > 0
            prev = old_x0[i] if use_old else None
            nxt = sampler_step(xs, x0[k], sig[j], sig[j + 1], sampler=sampler, old_x0=prev, sigma_prev=sig[j - 1] if j > 0 else None)
            x[i] = _from_sigma(nxt, sig[j + 1], space)
            old_x0[i] = x0[k]
            has_old[i] = True
    return x


def reproduction_error(denoiser: GuidedDenoiser, trace, item: int = 0, sampler: str = "auto") -> dict[str, float]:
    """How closely `resample` from step 0 with the full prompt reproduces the traced final
    latent: the RMS difference, relative to the final latent's RMS, and the largest one."""
    final = trace.final_latent[item] if trace.final_latent is not None else trace.x0[-1, item]
    rerun = resample(denoiser, trace, [0], item=item, sampler=sampler)[0].cpu()
    diff = rerun - final.float()
    return {
        "relative_rms": float(diff.pow(2).mean().sqrt() / final.float().pow(2).mean().sqrt().clamp_min(1e-12)),
        "max_abs": float(diff.abs().max()),
    }


# ---------------------------------------------------------------------------- concept timing
def _words_to_edit(trace, words, item: int, counterfactuals) -> tuple[list[str], list[list[int]]]:
    """Unique labels and token positions of ``words`` (default: every prompt word with tokens),
    checked against the counterfactual denoisers, one per word."""
    from explain.methods.heatmaps import prompt_words, resolve_words

    specs = list(words) if words is not None else [w for w in prompt_words(trace, item) if w.token_indices]
    labels, positions = [], []
    for spec in specs:
        label, pos = resolve_words(trace, spec, item)
        key, n = label, 2
        while key in labels:
            key, n = f"{label} ({n})", n + 1
        labels.append(key)
        positions.append(pos)
    if not labels:
        raise ValueError("no words to time")
    if counterfactuals is not None and len(counterfactuals) != len(labels):
        raise ValueError(f"give one counterfactual denoiser per word ({len(labels)}), got {len(counterfactuals)}")
    return labels, positions


@dataclass
class ConceptTiming:
    """Per word (``labels``) and start step (``steps``): the final latent of the re-run with the
    word removed (``finals`` ``[W, S, C, h, w]``), its distance to the unmodified re-run
    (``effect`` ``[W, S]``), and the decision / peak step read off the effect curve."""

    labels: list[str]
    token_indices: list[list[int]]
    steps: list[int]
    mode: str
    effect: torch.Tensor
    decision_step: list[int]
    peak_step: list[int]
    threshold: float
    reference: torch.Tensor = field(repr=False)
    finals: torch.Tensor | None = field(default=None, repr=False)
    sampler: str = "dpmpp_2m"

    def table(self) -> list[dict]:
        return [
            {
                "word": label,
                "tokens": list(self.token_indices[k]),
                "decision_step": self.decision_step[k],
                "peak_step": self.peak_step[k],
                "effect_whole_run": float(self.effect[k, 0]),
            }
            for k, label in enumerate(self.labels)
        ]

    def to_json(self) -> dict:
        return {
            "labels": list(self.labels),
            "token_indices": [list(t) for t in self.token_indices],
            "steps": list(self.steps),
            "mode": self.mode,
            "effect": self.effect.tolist(),
            "decision_step": list(self.decision_step),
            "peak_step": list(self.peak_step),
            "threshold": self.threshold,
            "sampler": self.sampler,
            "definitions": {
                "effect": f"mean squared distance of the final latent, word removed {'from' if self.mode == 'from' else 'only at'} step s on, to the unmodified re-run's",
                "decision_step": f"first step s from which the effect stays <= {self.threshold} x the effect at the first step tested",
                "peak_step": "step with the largest effect",
            },
        }


def decision_step(effect: torch.Tensor, steps: Sequence[int], threshold: float = 0.5) -> int:
    """The first step from which ``effect`` stays at or below ``threshold`` × its first value
    (the effect of removing the word from the first step tested); the first step when the word
    never had an effect."""
    e = torch.as_tensor(effect, dtype=torch.float64)
    base = float(e[0])
    if base <= 0:
        return int(steps[0])
    ok = e <= threshold * base
    return decision_from_correct(ok.tolist(), steps)


def decision_from_correct(correct: Sequence[bool], steps: Sequence[int]) -> int:
    """The first step from which ``correct`` holds at every later step tested (the step after
    the last one tested when it never settles)."""
    steps = list(steps)
    last_bad = max((k for k, ok in enumerate(correct) if not ok), default=-1)
    if last_bad == len(steps) - 1:
        return steps[-1] + 1
    return steps[last_bad + 1]


def concept_timing(
    denoiser: GuidedDenoiser,
    trace,
    words=None,
    *,
    item: int = 0,
    mode: str = "from",
    steps: Sequence[int] | None = None,
    threshold: float = 0.5,
    keep_finals: bool = True,
    batch_size: int | None = None,
    sampler: str = "auto",
    counterfactuals: Sequence[GuidedDenoiser] | None = None,
) -> ConceptTiming:
    """Causal concept timing of ``words`` (default: every prompt word) over the start ``steps``
    (default: all). Costs about ``len(words) · Σ_s (S - s)`` guided model evaluations in
    "from" mode (half the run on average per step tested).

    How a word is removed: by default its token positions take the unconditional context
    (``token_model_fn``). With a causal text encoder (CLIP) the *later* tokens still carry the
    word ("circle" after "red" has attended to "red"), so that removal is partial; pass
    ``counterfactuals`` (one `GuidedDenoiser` per word, the same model conditioned on the prompt
    re-encoded without the word, e.g. ``from_pipeline(pipe, trace, prompt=edited)``) to switch
    to it instead."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if denoiser.token_model_fn is None and counterfactuals is None:
        raise ValueError("concept timing removes prompt tokens, but this denoiser has no token_model_fn (pass counterfactuals)")
    labels, positions = _words_to_edit(trace, words, item, counterfactuals)
    chosen = sorted({trace.check_step(int(s)) for s in (steps if steps is not None else range(trace.num_steps))})
    tokens = len(trace.tokens[item]) if item < len(trace.tokens) and trace.tokens[item] else 1 + max(max(p) for p in positions)
    S = trace.num_steps
    runs_start, keeps, choices = [], [], []
    for w, pos in enumerate(positions):
        for s in chosen:
            k = torch.ones(S, tokens)
            c = torch.zeros(S, dtype=torch.long)
            removed = slice(s, None) if mode == "from" else slice(s, s + 1)
            if counterfactuals is None:
                k[removed, pos] = 0
            else:
                c[removed] = w + 1
            runs_start.append(s)
            keeps.append(k)
            choices.append(c)
    starts = runs_start + [min(chosen)]
    keep = torch.cat([torch.stack(keeps), torch.ones(1, S, tokens)]) if counterfactuals is None else None
    choice = torch.cat([torch.stack(choices), torch.zeros(1, S, dtype=torch.long)]) if counterfactuals is not None else None
    sampler = sampler_for(trace) if sampler == "auto" else sampler
    finals = resample(
        denoiser, trace, starts, keep, item, sampler=sampler, batch_size=batch_size, alternatives=list(counterfactuals or ()), choice=choice,
    ).cpu()  # fmt: skip
    reference = finals[-1]
    finals = finals[:-1].view(len(labels), len(chosen), *reference.shape)
    effect = (finals - reference).pow(2).mean(dim=(-3, -2, -1))
    decision = [decision_step(effect[k], chosen, threshold) if mode == "from" else int(chosen[int(effect[k].argmax())]) for k in range(len(labels))]
    peak = [int(chosen[int(effect[k].argmax())]) for k in range(len(labels))]
    return ConceptTiming(labels, positions, chosen, mode, effect, decision, peak, threshold, reference, finals if keep_finals else None, sampler)


@dataclass
class ConceptOnset:
    """Per word (``labels``) and traced step: the effect of editing the word on that step's x0
    prediction (``effect`` ``[W, S]``, mean squared difference, in decoded pixels when a decoder
    was given, else in the latent), the onset step (first step with effect >= ``threshold`` ×
    the word's largest effect) and the peak step."""

    labels: list[str]
    token_indices: list[list[int]]
    effect: torch.Tensor
    onset_step: list[int]
    peak_step: list[int]
    threshold: float
    space: str

    def table(self) -> list[dict]:
        return [
            {"word": label, "tokens": list(self.token_indices[k]), "onset_step": self.onset_step[k], "peak_step": self.peak_step[k], "largest_effect": float(self.effect[k].max())}
            for k, label in enumerate(self.labels)
        ]

    def to_json(self) -> dict:
        return {
            "labels": list(self.labels),
            "token_indices": [list(t) for t in self.token_indices],
            "effect": self.effect.tolist(),
            "onset_step": list(self.onset_step),
            "peak_step": list(self.peak_step),
            "threshold": self.threshold,
            "space": self.space,
            "definitions": {
                "effect": f"mean squared difference ({self.space}) between the x0 prediction at the traced x_t with the word edited and without the edit",
                "onset_step": f"first step whose effect is >= {self.threshold} x the word's largest effect",
                "peak_step": "step with the largest effect",
            },
        }


def onset_step(effect: torch.Tensor, threshold: float = 0.5) -> int:
    """The first index at which ``effect`` reaches ``threshold`` × its largest value (0 when the
    word never has an effect)."""
    e = torch.as_tensor(effect, dtype=torch.float64)
    top = float(e.max()) if e.numel() else 0.0
    if top <= 0:
        return 0
    return int((e >= threshold * top).nonzero()[0])


def concept_onset(
    denoiser: GuidedDenoiser,
    trace,
    words=None,
    *,
    item: int = 0,
    counterfactuals: Sequence[GuidedDenoiser] | None = None,
    decode=None,
    threshold: float = 0.5,
    batch_size: int | None = None,
) -> ConceptOnset:
    """When each of ``words`` (default: every prompt word) starts to shape the model's
    prediction. The word is removed through the denoiser's ``token_model_fn`` (its token
    positions take the unconditional context), or, with ``counterfactuals`` (one `GuidedDenoiser`
    per word: the same model conditioned on the edited prompt, e.g. the word swapped for a
    contrasting value, which keeps the prompt in distribution), by switching to that denoiser.
    ``decode`` (latents -> images, e.g. `explain.adapters.diffusers.vae_decoder`) measures the
    effect on the decoded predictions, where a person judges it; the latent otherwise. The trace
    only supplies x_t: the unedited prediction is re-computed with ``denoiser``, so a randomised
    or null model is measured against itself."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if denoiser.token_model_fn is None and counterfactuals is None:
        raise ValueError("concept onset removes prompt tokens, but this denoiser has no token_model_fn (pass counterfactuals)")
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    labels, positions = _words_to_edit(trace, words, item, counterfactuals)
    tokens = len(trace.tokens[item]) if item < len(trace.tokens) and trace.tokens[item] else 1 + max(max(p) for p in positions)
    device = denoiser.device
    view = decode if decode is not None else (lambda z: z)
    effect = torch.zeros(len(labels), trace.num_steps, dtype=torch.float64)
    for j in range(trace.num_steps):
        x = trace.x_t[j, item : item + 1].float()
        if device is not None:
            x = x.to(device)
        level = step_level(trace, j)
        with torch.no_grad():
            preds = [denoiser.predict(x, level, "x0")]
            for w, pos in enumerate(positions):
                if counterfactuals is not None:
                    preds.append(counterfactuals[w].predict(x, level, "x0"))
                else:
                    keep = torch.ones(1, tokens, device=x.device)
                    keep[:, pos] = 0
                    preds.append(denoiser.predict_tokens(x, level, keep, "x0"))
            stacked = torch.cat([p.to(preds[0].device, torch.float32) for p in preds])
            size = batch_size or len(stacked)
            seen = torch.cat([view(stacked[i : i + size]).float().cpu() for i in range(0, len(stacked), size)])
        effect[:, j] = edit_effect(seen[:1], seen[1:])
    return onset_from_effect(labels, positions, effect, threshold, "decoded" if decode is not None else "latent")


def step_level(trace, step: int) -> NoiseLevel:
    """The noise level of a traced step (its timestep and sigma)."""
    return NoiseLevel(timestep=float(trace.timesteps[step]), sigma=_sigmas(trace)[step])


def edit_effect(reference: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per edited prediction (``edited`` ``[W, ...]``): its mean squared difference from the
    unedited ``reference`` ``[1, ...]`` (float64 ``[W]``)."""
    return (edited.float() - reference.float()).pow(2).flatten(1).mean(1).double()


def onset_from_effect(labels, positions, effect: torch.Tensor, threshold: float = 0.5, space: str = "latent") -> ConceptOnset:
    """A `ConceptOnset` from per-word, per-step effects ``[W, S]`` measured elsewhere (a front end
    that runs each edited conditioning through its own sampler)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    effect = torch.as_tensor(effect, dtype=torch.float64)
    if effect.ndim != 2 or effect.shape[0] != len(labels):
        raise ValueError(f"effect must be [words, steps] with one row per label ({len(labels)}), got shape {tuple(effect.shape)}")
    onset = [onset_step(effect[k], threshold) for k in range(len(labels))]
    peak = [int(effect[k].argmax()) for k in range(len(labels))]
    return ConceptOnset(list(labels), [list(p) for p in positions], effect, onset, peak, threshold, space)


def rerun_trajectory(denoiser: GuidedDenoiser, trace, item: int = 0, sampler: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The whole run re-done from the trace's first latent with ``denoiser`` (the trained model,
    a randomised copy, a null model): its x0 predictions ``[S, C, h, w]`` and final latent
    ``[C, h, w]``, for the R1 view of another model on the same starting noise."""
    sampler = sampler_for(trace) if sampler == "auto" else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    sig = _sigmas(trace)
    space = denoiser.latent_space
    x = trace.x_t[0, item : item + 1].float()
    if denoiser.device is not None:
        x = x.to(denoiser.device)
    x0s, old = [], None
    for j in range(trace.num_steps):
        level = NoiseLevel(timestep=float(trace.timesteps[j]), sigma=sig[j])
        with torch.no_grad():
            x0 = denoiser.predict(x, level, "x0")
        x0s.append(x0[0].cpu())
        nxt = sampler_step(_to_sigma(x, sig[j], space), x0, sig[j], sig[j + 1], sampler=sampler, old_x0=old, sigma_prev=sig[j - 1] if j > 0 else None)
        x = _from_sigma(nxt, sig[j + 1], space)
        old = x0
    return torch.stack(x0s), x[0].cpu()
