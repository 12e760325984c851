"""Concept scores: how much attention each prompt word gets at each step, when it emerges, and
how its attention trends over the run.

Definitions (the paper's own "correlation quantification" is not published; everything
marked *ours* is our choice):

* **mass** ``[S, W]``: the word's attention mass, the mean over latent pixels of the
  cross-attention probability of the word's tokens, summed over its sub-word tokens. Since a
  pixel's probabilities sum to one over the context, it is the share of the whole image's
  attention that goes to the word; the start, end and padding tokens take the rest.
* **share** ``[S, W]``: mass divided by the summed mass of all prompt words at that step, so
  the start / end / padding tokens, which soak up most of the attention in CLIP-conditioned
  models, are left out of the normalisation.
* **normalized** ``[S, W]``: at each step, min-max across the prompt's words (the top word
  scores 1, the bottom 0), as in the paper's Fig. 9 and Fig. 11. A step where all words tie
  scores 1 for all. ``step_sum`` is its sum over steps, the paper's Fig. 11 bar height.
* **emergence step** (ours): the first step from which the word's share curve, min-max
  scaled over the run, is at least ``threshold`` (0.5: halfway from its lowest to its highest
  value) for ``persist`` consecutive steps (3, or up to the end of the run). A flat curve
  emerges at step 0.
* **peak step**: the step of the largest share.
* **Spearman rho** (ours): Spearman's rank correlation between the step index and the
  word's share curve; +1 means the word gains attention monotonically over the run, -1
  that it loses it. Undefined (``None``) for a constant curve or a single step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from explain.methods.heatmaps import (
    StepSelection,
    WordSpec,
    prompt_words,
    resolve_words,
    select_steps,
)
from explain.trace import Trace

DEFINITIONS = {
    "mass": "mean over latent pixels of the word's cross-attention probability, summed over its sub-word tokens",
    "share": "mass / summed mass of all prompt words at that step (start, end and padding tokens excluded)",
    "normalized": "per-step min-max of the mass across the prompt's words (top word 1, bottom 0), as the paper's Fig. 9/11",
    "step_sum": "sum over steps of the normalized curve (the paper's Fig. 11 bars)",
    "emergence_step": "ours: first step from which the share curve, min-max scaled over the run, stays >= {threshold} for {persist} steps",
    "peak_step": "step with the largest share",
    "spearman_rho": "ours: Spearman rank correlation between step index and the share curve",
}


@dataclass
class ConceptScores:
    labels: list[str]  # one per word, unique ("a", "a (2)")
    token_indices: list[list[int]]
    steps: list[int]
    timesteps: list[float]
    mass: torch.Tensor  # [S, W]
    share: torch.Tensor  # [S, W]
    normalized: torch.Tensor  # [S, W]
    emergence_step: list[int]
    peak_step: list[int]
    spearman_rho: list[float | None]
    step_sum: list[float]
    threshold: float = 0.5
    persist: int = 3
    negative: bool = False
    tokens: list[str] = field(default_factory=list)
    token_mass: torch.Tensor | None = None  # [S, T], every context position, start/end included

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"no concept {label!r}; the scores cover: {', '.join(self.labels)}") from None

    def curve(self, label: str, kind: str = "normalized") -> torch.Tensor:
        if kind not in ("mass", "share", "normalized"):
            raise ValueError(f"unknown curve {kind!r}; choose mass, share or normalized")
        return getattr(self, kind)[:, self.index(label)]

    def table(self) -> list[dict]:
        """One row per word: the scalar scores, ready for a table."""
        return [
            {
                "word": label,
                "tokens": list(self.token_indices[j]),
                "mean_mass": float(self.mass[:, j].mean()),
                "mean_share": float(self.share[:, j].mean()),
                "peak_step": self.peak_step[j],
                "emergence_step": self.emergence_step[j],
                "spearman_rho": self.spearman_rho[j],
                "step_sum": self.step_sum[j],
            }
            for j, label in enumerate(self.labels)
        ]

    def definitions(self) -> dict[str, str]:
        return {k: v.format(threshold=self.threshold, persist=self.persist) for k, v in DEFINITIONS.items()}

    def to_json(self) -> dict:
        return {
            "labels": list(self.labels),
            "token_indices": [list(t) for t in self.token_indices],
            "steps": list(self.steps),
            "timesteps": list(self.timesteps),
            "mass": self.mass.tolist(),
            "share": self.share.tolist(),
            "normalized": self.normalized.tolist(),
            "emergence_step": list(self.emergence_step),
            "peak_step": list(self.peak_step),
            "spearman_rho": list(self.spearman_rho),
            "step_sum": list(self.step_sum),
            "threshold": self.threshold,
            "persist": self.persist,
            "negative": self.negative,
            "tokens": list(self.tokens),
            "token_mass": None if self.token_mass is None else self.token_mass.tolist(),
            "definitions": self.definitions(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "ConceptScores":
        t = lambda key: torch.tensor(data[key], dtype=torch.float64)  # noqa: E731
        return cls(
            labels=list(data["labels"]),
            token_indices=[list(x) for x in data["token_indices"]],
            steps=list(data["steps"]),
            timesteps=list(data["timesteps"]),
            mass=t("mass"),
            share=t("share"),
            normalized=t("normalized"),
            emergence_step=list(data["emergence_step"]),
            peak_step=list(data["peak_step"]),
            spearman_rho=list(data["spearman_rho"]),
            step_sum=list(data["step_sum"]),
            threshold=float(data.get("threshold", 0.5)),
            persist=int(data.get("persist", 3)),
            negative=bool(data.get("negative", False)),
            tokens=list(data.get("tokens", [])),
            token_mass=None if data.get("token_mass") is None else t("token_mass"),
        )


# ---------------------------------------------------------------------------- pure pieces
def token_mass(attention: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of attention ``[S, T, h, w]``: ``[S, T]``."""
    return attention.double().mean(dim=(-2, -1))


def per_step_minmax(values: torch.Tensor) -> torch.Tensor:
    """Min-max across the last axis, separately for each row; a tied row becomes all ones."""
    lo, hi = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-12, (values - lo) / span.clamp_min(1e-12), torch.ones_like(values))


def emergence_step(curve: torch.Tensor, threshold: float = 0.5, persist: int = 3) -> int:
    """First index from which ``curve``, min-max scaled, is >= ``threshold`` for ``persist``
    consecutive entries (fewer at the end of the run); 0 for a flat curve."""
    c = curve.double()
    lo, hi = float(c.min()), float(c.max())
    if hi - lo <= 1e-9 * max(abs(hi), 1e-30):
        return 0
    above = ((c - lo) / (hi - lo)) >= threshold - 1e-12
    n = len(c)
    for s in range(n):
        if bool(above[s : min(s + persist, n)].all()):
            return s
    return int(c.argmax())  # unreachable: the maximum itself is above any threshold <= 1


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation; ``None`` when either input is constant or shorter than 2."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.pow(2).sum() * ry.pow(2).sum()).sqrt())
    if denom <= 1e-12:
        return None
    return float((rx * ry).sum()) / denom


# ---------------------------------------------------------------------------- from a trace
def concept_scores(
    trace: Trace,
    words: Sequence[WordSpec] | None = None,
    steps: StepSelection = None,
    *,
    item: int = 0,
    negative: bool = False,
    threshold: float = 0.5,
    persist: int = 3,
) -> ConceptScores:
    """Concept scores of ``words`` (default: every prompt word) over the selected steps.

    Share and the per-step min-max are always taken across *all* prompt words, so a word's
    scores do not change with which other words are asked for.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if persist < 1:
        raise ValueError(f"persist must be at least 1 step, got {persist}")
    attention = trace.attention_negative if negative else trace.attention
    if attention is None:
        what = "negative-prompt attention; generate with a negative prompt" if negative else "cross-attention; record it with an attention tap"
        raise ValueError(f"this trace has no {what}")
    all_words = [w for w in prompt_words(trace, item, negative) if w.token_indices]
    # curves, emergence and the step correlation read the steps in denoising order
    chosen = sorted(set(select_steps(trace, steps)))
    per_token = token_mass(attention[chosen, item])  # [S, T]

    if not all_words:
        raise ValueError("the prompt has no words with tokens in the trace")
    all_mass = torch.stack([per_token[:, w.token_indices].sum(-1) for w in all_words], dim=-1)  # [S, Wall]
    total = all_mass.sum(-1, keepdim=True)
    all_normalized = per_step_minmax(all_mass)

    specs: list = list(words) if words is not None else all_words
    labels, positions_list, columns = [], [], []
    for spec in specs:
        label, positions = resolve_words(trace, spec, item, negative)
        key, n = label, 2
        while key in labels:
            key, n = f"{label} ({n})", n + 1
        labels.append(key)
        positions_list.append(positions)
        match = next((j for j, w in enumerate(all_words) if sorted(w.token_indices) == sorted(positions)), None)
        columns.append(match)

    mass = torch.stack([per_token[:, p].sum(-1) for p in positions_list], dim=-1)
    share = torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))
    # A merged phrase is not one of the prompt's words: rank it against them at each step.
    normalized = torch.stack(
        [
            all_normalized[:, j] if j is not None else _minmax_against(mass[:, k], all_mass)
            for k, j in enumerate(columns)
        ],
        dim=-1,
    )
    step_index = torch.tensor(chosen, dtype=torch.float64)
    return ConceptScores(
        labels=labels,
        token_indices=positions_list,
        steps=chosen,
        timesteps=[float(trace.timesteps[s]) for s in chosen],
        mass=mass,
        share=share,
        normalized=normalized,
        emergence_step=[chosen[emergence_step(share[:, k], threshold, persist)] for k in range(len(labels))],
        peak_step=[chosen[int(share[:, k].argmax())] for k in range(len(labels))],
        spearman_rho=[spearman(step_index, share[:, k]) for k in range(len(labels))],
        step_sum=[float(normalized[:, k].sum()) for k in range(len(labels))],
        threshold=threshold,
        persist=persist,
        negative=negative,
        tokens=_token_names(trace, item, negative),
        token_mass=per_token,
    )


def _minmax_against(curve: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    lo = torch.minimum(others.amin(-1), curve)
    hi = torch.maximum(others.amax(-1), curve)
    span = hi - lo
    return torch.where(span > 1e-12, (curve - lo) / span.clamp_min(1e-12), torch.ones_like(curve))


def _token_names(trace: Trace, item: int, negative: bool) -> list[str]:
    names = trace.negative_tokens if negative else trace.tokens
    return list(names[item]) if item < len(names) else []
