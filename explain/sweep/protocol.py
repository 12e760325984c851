"""The settings a sweep runs with: ``--protocol paper`` (the published setup) or the project's
defaults, each overridable flag by flag.

``paper`` (Park, Ju & Lee 2024; /shared/reference/paper-methods.md §1, §5): 20 DPM-Solver++
(order 2) steps, guidance 7.5 with the empty unconditional prompt, latent seed 1 for every
prompt, explanations at step 15 of 20 (index 14, t = 300), DF-RISE exactly as published
(`explain.methods.defaults.PAPER_RISE`: 500 Bernoulli masks, SSIM structure, uncentered),
DF-CAM on the paper's 43-module equivalent, insertion/deletion with the latent width as stride
against random maps, and the paper's aggregated AUC (mean curve, min-max, trapezoid) next to
the per-prompt ones. Two things are not the paper's, on purpose: the games score a mean squared
distance in latent and image space (the paper's single-image Inception "FID" needs Inception
weights this project never downloads), and the official code's bugs (B3, B9-B11, B15, B17) stay
fixed. The model is whatever ``--model`` names (the paper's is CompVis/stable-diffusion-v1-4).

``default``: the project's validated settings from `explain.methods.defaults` (``RISE``,
``CAM``), the model's own default guidance, seeds derived per prompt, and every baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from explain.methods import defaults

PROTOCOLS = ("default", "paper")
PAPER_STEPS = 20
PAPER_GUIDANCE = 7.5
PAPER_SEED = 1
PAPER_STEP_ONE_BASED = 15  # "step 15 of 20" (t = 300)
GAME_SPACES = ("latent", "image", "both")
RANDOM_SEEDS = (101, 102)  # two random maps, their AUCs averaged: the random baseline


@dataclass(frozen=True)
class Settings:
    """Everything that changes a sweep's results (what ``sweep.json`` records and a resumed run must match)."""

    protocol: str = "default"
    model: str = "embedded"
    steps: int = 20
    guidance: float = 5.0
    schedule: str = "uniform"
    lam: int = 60
    explain_step: int = 14
    sweep_seed: int = 0
    fixed_seed: int | None = None  # the paper's one latent seed for every prompt
    force_dpm_solver: bool = False
    rise: defaults.RiseSettings = field(default_factory=lambda: defaults.RISE)
    cam: defaults.CamSettings = field(default_factory=lambda: defaults.CAM)
    baselines: tuple[str, ...] = ("random", "xt_magnitude", "xt_detail", "center")
    game_space: str = "both"
    random_seeds: tuple[int, ...] = RANDOM_SEEDS
    recovery_tol: float = 0.25
    sanity_threshold: float = 0.3
    analyses: tuple[str, ...] = ("concepts", "recovery")
    subsets: tuple[tuple[str, int], ...] = ()  # (analysis, n): run it on the file's first n rows only

    def to_json(self) -> dict:
        data = asdict(self)
        data["baselines"] = list(self.baselines)
        data["random_seeds"] = list(self.random_seeds)
        data["analyses"] = list(self.analyses)
        data["subsets"] = {k: v for k, v in self.subsets}
        return data

    def subset_limit(self, analysis: str) -> int | None:
        return dict(self.subsets).get(analysis)


def paper_step(steps: int) -> int:
    """The 0-based index of the paper's explanation step, scaled to ``steps`` (14 for 20)."""
    return max(0, min(steps - 1, round(steps * PAPER_STEP_ONE_BASED / PAPER_STEPS) - 1))


def resolve(
    protocol: str,
    *,
    model: str,
    embedded: bool,
    steps: int | None = None,
    guidance: float | None = None,
    explain_step: int | None = None,
    schedule: str = "uniform",
    lam: int = 60,
    sweep_seed: int = 0,
    masks: int | None = None,
    baselines: tuple[str, ...] | None = None,
    game_space: str | None = None,
    analyses: tuple[str, ...] = ("concepts", "recovery"),
    subsets: dict[str, int] | None = None,
) -> Settings:
    """The settings of ``protocol`` with the caller's overrides (``None`` keeps the protocol's)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "paper":
        base = Settings(
            protocol="paper",
            model=model,
            steps=PAPER_STEPS,
            guidance=PAPER_GUIDANCE,
            explain_step=paper_step(PAPER_STEPS),
            fixed_seed=PAPER_SEED,
            force_dpm_solver=True,
            rise=defaults.PAPER_RISE,
            cam=defaults.CAM,
            baselines=("random",),
            game_space="both",
        )
    else:
        from explain import embedded as emb

        base = Settings(protocol="default", model=model, steps=emb.DEFAULT_STEPS, guidance=emb.DEFAULT_GUIDANCE if embedded else PAPER_GUIDANCE)
    steps_ = int(steps) if steps is not None else base.steps
    if steps_ < 1:
        raise ValueError(f"--steps must be at least 1, got {steps_}")
    step = paper_step(steps_) if explain_step is None else int(explain_step)
    if not 0 <= step < steps_:
        raise ValueError(f"--explain-step {step} is outside the run's steps 0..{steps_ - 1}")
    space = game_space or base.game_space
    if space not in GAME_SPACES:
        raise ValueError(f"--game-space must be one of {', '.join(GAME_SPACES)}, got {space!r}")
    from explain.sweep.analyses import BASELINES

    chosen = tuple(baselines) if baselines is not None else base.baselines
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    rise = base.rise if masks is None else replace(base.rise, n_masks=int(masks))
    if rise.n_masks < 1:
        raise ValueError(f"--masks must be at least 1, got {rise.n_masks}")
    return replace(
        base,
        steps=steps_,
        guidance=float(guidance) if guidance is not None else base.guidance,
        explain_step=step,
        schedule=schedule,
        lam=int(lam),
        sweep_seed=int(sweep_seed),
        rise=rise,
        baselines=chosen,
        game_space=space,
        analyses=tuple(analyses),
        subsets=tuple(sorted((subsets or {}).items())),
    )
