"""One set of defaults for every front end (library, CLI, Gradio app, ComfyUI nodes).

Front ends read their DF-RISE, DF-CAM, game and timing settings from here instead of writing
their own, so a default changed by measurement changes everywhere at once, and the library
functions' own keyword defaults follow these values.

* `RISE` is what the project shows by default; `PAPER_RISE` is the published algorithm
  exactly (x0, SSIM structure, zeroed pixels, uncentered, 500 masks), kept for reproduction.
  `VARIANTS` names every DF-RISE variant the sanity benchmark measures; a verdict for each
  (`explain.methods.sanity.known_verdict`) says whether it passes the sanity checks.
* `TOKEN_RISE` is per-token DF-RISE, `CAM` is DF-CAM, `GAME` the insertion / deletion game,
  `TIMING` the causal concept timing.

``method_id`` turns settings into the method id a verdict is stored under.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class RiseSettings:
    """Keyword arguments of `explain.methods.rise.df_rise`.

    ``perturbation`` is what a masked latent pixel becomes: ``"zero"`` (the paper), ``"blur"``
    (the blurred latent) or ``"noise"`` (the step's own noise level added again,
    ``noise_scale`` times, a fresh draw per mask); ``score`` is what a mask is credited with:
    ``"map"`` (the similarity at each pixel, the paper) or ``"mean"`` (the whole-image mean
    similarity, as classic RISE).
    """

    n_masks: int = 256
    quantity: str = "x0"
    masks: str = "bernoulli"
    p: float = 0.5
    cells: int = 8
    similarity: str = "structure"
    centered: bool = True
    perturbation: str = "zero"
    score: str = "map"
    noise_scale: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        """The keyword arguments of `explain.methods.rise.df_rise`."""
        return asdict(self)

    def with_masks(self, n_masks: int) -> "RiseSettings":
        return replace(self, n_masks=int(n_masks))

    def same_method(self, other: "RiseSettings") -> bool:
        """Equal in everything but the mask count and seed (which change the noise, not the method)."""
        skip = {"n_masks", "seed"}
        if self.masks == other.masks == "bernoulli":
            skip.add("cells")  # Bernoulli masks have no cells
        if self.perturbation == other.perturbation != "noise":
            skip.add("noise_scale")  # only the noise perturbation scales anything
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name not in skip)


@dataclass(frozen=True)
class TokenRiseSettings:
    """Keyword arguments of `explain.methods.rise.df_rise_tokens`."""

    n_masks: int = 128
    quantity: str = "x0"
    p: float = 0.5
    similarity: str = "neg_mse"
    seed: int = 0

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CamSettings:
    layers: str = "paper"
    target: str = "sum"
    quantity: str = "epsilon"

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GameSettings:
    """Keyword arguments of `explain.methods.faithfulness.insertion_deletion`.

    ``removal`` is how a position is removed: ``"noise"`` (the step's noise level added again,
    the same draw for every map, so the identity path x0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ scores every
    order alike), ``"blur"`` or ``"paper"`` (insertion from the blurred latent, deletion to
    zeros, as the paper). ``noise_draws`` games are averaged.
    """

    removal: str = "noise"
    quantity: str = "x0"
    noise_scale: float = 4.0
    noise_draws: int = 2
    score: str = "context"
    stride: int | None = None

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TimingSettings:
    """Keyword arguments of `explain.methods.timing.concept_timing`."""

    mode: str = "from"  # remove the word from step s on ("from") or only at step s ("at")
    threshold: float = 0.5

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OnsetSettings:
    """Keyword arguments of `explain.methods.timing.concept_onset`."""

    threshold: float = 0.5  # onset: the first step whose effect reaches this share of the largest

    def kwargs(self) -> dict:
        return asdict(self)


# The paper's DF-RISE: SSIM structure of x0, Bernoulli masks, zeroed pixels, uncentered, 500 masks.
PAPER_RISE = RiseSettings(n_masks=500, similarity="structure", centered=False)

# Every variant the sanity benchmark measures, by name.
VARIANTS: dict[str, RiseSettings] = {
    "paper": PAPER_RISE,
    "x0-structure-centered": RiseSettings(similarity="structure", centered=True),
    "x0-negmse-centered": RiseSettings(similarity="neg_mse", centered=True),
    "grid4-structure-centered": RiseSettings(n_masks=64, masks="grid", cells=4, similarity="structure", centered=True),
    "epsilon-negmse-centered": RiseSettings(quantity="epsilon", similarity="neg_mse", centered=True),
    "kept-cells4-noise4": RiseSettings(masks="cells", cells=4, similarity="neg_mse", centered=True, perturbation="noise", noise_scale=4.0, score="kept"),
    # smooth masks (stable at few masks) scoring the network's own output, or removing in-distribution
    "grid4-epsilon-negmse-centered": RiseSettings(n_masks=64, masks="grid", cells=4, quantity="epsilon", similarity="neg_mse", centered=True),
    "grid4-noise4-structure-centered": RiseSettings(n_masks=64, masks="grid", cells=4, similarity="structure", centered=True, perturbation="noise", noise_scale=4.0),
}
# The default, chosen by measurement (benchmarks/results/sanity.txt, faithfulness.txt; 30 held-out
# prompts of the embedded model, step 14): NO variant meets every bar. This one misses the fewest:
# mask-seed ρ 0.92 at 64 masks (bar 0.9: met), but ρ 0.34 with the randomised model's map (bar < 0.3:
# fails the sanity checks) and it beats every baseline in both games on 10 % of prompts (bar 90 %).
# It is shown with that verdict (verdicts.json) and is not evidence about the model.
RISE = replace(VARIANTS["grid4-structure-centered"], n_masks=64)
TOKEN_RISE = TokenRiseSettings()
CAM = CamSettings()
GAME = GameSettings()
TIMING = TimingSettings()
ONSET = OnsetSettings()
PRESETS = {"default": RISE, "paper": PAPER_RISE}


def method_id(settings: RiseSettings) -> str:
    """The method id a DF-RISE verdict is stored under: ``"df_rise"`` for the default,
    ``"df_rise:<variant>"`` for a named variant, ``"df_rise:custom"`` for anything else (no
    verdict is known for it)."""
    if settings.same_method(RISE):
        return "df_rise"
    for name, variant in VARIANTS.items():
        if settings.same_method(variant):
            return f"df_rise:{name}"
    return "df_rise:custom"
