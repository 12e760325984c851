"""DF-RISE and DF-CAM at one step, with the evidence a reader needs beside each map.

Every front end (the Gradio app's panels, the CLI's ``--rise`` / ``--cam``, the HTML report)
shows a model-based map the same way: the map, the insertion and deletion games played with it
and with a random map (`explain.methods.faithfulness`), and two verdicts:

* **beats random**: the map's insertion AUC is below the random map's and its deletion AUC
  above (a faithful order makes the prediction drift fastest when the top positions go, and
  recover fastest when they come back);
* **passes the sanity checks**: what `explain.methods.sanity.known_verdict` measured once for
  this method on this model, or "not measured" where nothing was (or where that module is not
  there yet).

Settings come from `explain.methods.defaults` (`RISE`, `CAM` and, where it exists, `GAME`), so
a default changed by measurement changes every front end at once. Results are plain values
(`MethodMap`), so the app can keep them in a session and the report can render them later.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from explain.methods import defaults

NOT_MEASURED = (
    "passes the sanity checks: not measured for this model (verdicts are measured once and cached for the embedded "
    "shapes-64 model; for another model measure one on demand with explain.methods.sanity.verdict_on_demand)"
)


@dataclass
class Game:
    """One insertion or deletion game, played with the map and with a random map."""

    mode: str  # "insertion" or "deletion"
    fractions: list[float]
    curve: list[float]
    random_curve: list[float]
    auc: float
    random_auc: float
    space: str = "image"  # where the distance was measured: "image" (decoded) or "latent"

    @property
    def beats_random(self) -> bool | None:
        if not (math.isfinite(self.auc) and math.isfinite(self.random_auc)):
            return None
        return self.auc < self.random_auc if self.mode == "insertion" else self.auc > self.random_auc

    def line(self) -> str:
        verdict = {True: "yes", False: "no", None: "undecided"}[self.beats_random]
        want = "lower" if self.mode == "insertion" else "higher"
        return f"{self.mode}: {verdict} (AUC {self.auc:.4g} vs random {self.random_auc:.4g}; {want} is better)"

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "space": self.space, "fractions": self.fractions, "curve": self.curve,
            "random_curve": self.random_curve, "auc": self.auc, "random_auc": self.random_auc, "beats_random": self.beats_random,
        }


@dataclass
class MethodMap:
    """A model-based map at one step and what supports it (see the module docstring)."""

    method: str  # "DF-RISE" or "DF-CAM"
    method_id: str  # the id sanity verdicts are stored under ("df_rise", "df_rise:paper", "df_cam", ...)
    step: int
    timestep: float
    heat: torch.Tensor  # [H, W] in 0..1, the display map
    saliency: torch.Tensor  # [h, w] at latent resolution, the order the games used
    settings: dict = field(default_factory=dict)
    games: list[Game] = field(default_factory=list)
    sanity: bool | None = None
    sanity_line: str = NOT_MEASURED
    caption: str = ""
    seconds: float = 0.0

    @property
    def beats_random(self) -> bool | None:
        """True when the map beats the random map in every game played; None when none was."""
        verdicts = [g.beats_random for g in self.games]
        if not verdicts or any(v is None for v in verdicts):
            return None
        return all(verdicts)

    def verdict_lines(self) -> list[str]:
        head = {True: "yes", False: "no", None: "not tested"}[self.beats_random]
        lines = [f"beats random: {head}" + (f" ({'; '.join(g.line() for g in self.games)})" if self.games else "")]
        return lines + [self.sanity_line]

    def to_json(self) -> dict:
        return {
            "method": self.method, "method_id": self.method_id, "step": self.step, "timestep": self.timestep,
            "settings": self.settings, "games": [g.to_json() for g in self.games], "beats_random": self.beats_random,
            "sanity": self.sanity, "sanity_line": self.sanity_line, "caption": self.caption, "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------- verdicts
def _model_names(model: str | None) -> list[str]:
    """The names a trace's model may be stored under: ``"embedded (diffusion-explain/shapes-64)"``
    is also ``"diffusion-explain/shapes-64"``."""
    text = (model or "").strip()
    names = [text] if text else []
    if text.endswith(")") and " (" in text:
        names.append(text[text.rindex(" (") + 2 : -1])
    return names


def sanity_verdict(method_id: str, model: str | None) -> tuple[bool | None, str]:
    """``(passes, one line)`` from `explain.methods.sanity.known_verdict`; ``(None, "... not
    measured ...")`` when nothing was measured for this method and model, or when this version
    of the library has no sanity module."""
    try:
        from explain.methods.sanity import known_verdict
    except ImportError:
        return None, NOT_MEASURED
    for name in _model_names(model):
        verdict = known_verdict(method_id, name)
        if verdict is not None:
            passes = bool(verdict.passes)
            # the verdict's own line repeats the head ("FAILS the sanity checks (ρ ...): note"): keep the rest
            detail = re.sub(r"^(passes|fails) the sanity checks:?\s*", "", verdict.line() if hasattr(verdict, "line") else "", flags=re.I)
            head = f"passes the sanity checks: {'yes' if passes else 'no'}"
            line = head + (f" {detail}" if detail.startswith("(") else f" — {detail}" if detail else "")
            where = getattr(verdict, "model", "") or name
            return passes, line + f" [cached verdict, measured once for {where}]"
    return None, NOT_MEASURED


def rise_method_id(settings) -> str:
    """The id a DF-RISE verdict is stored under for ``settings``."""
    method_id = getattr(defaults, "method_id", None)
    if method_id is not None:
        return method_id(settings)
    same = lambda a, b: {k: v for k, v in a.kwargs().items() if k not in ("n_masks", "seed")} == {k: v for k, v in b.kwargs().items() if k not in ("n_masks", "seed")}  # noqa: E731
    if same(settings, defaults.RISE):
        return "df_rise"
    if same(settings, defaults.PAPER_RISE):
        return "df_rise:paper"
    return "df_rise:custom"


# ---------------------------------------------------------------------------- games
def _game_kwargs() -> dict:
    game = getattr(defaults, "GAME", None)
    return game.kwargs() if game is not None else {}


def play_games(denoiser, trace, step: int, saliency: torch.Tensor, item: int = 0, decode=None, progress=None, seed: int = 0) -> list[Game]:
    """Insertion and deletion with ``saliency`` and with a random map of the same size."""
    from explain.methods import faithfulness

    kwargs = _game_kwargs()
    played = faithfulness.insertion_deletion(denoiser, trace, step, saliency, item, decode=decode, progress=progress, seed=seed, **kwargs)
    random_map = faithfulness.random_saliency(tuple(saliency.shape[-2:]), seed=seed)
    baseline = faithfulness.insertion_deletion(denoiser, trace, step, random_map, item, decode=decode, progress=progress, seed=seed, **kwargs)
    games = []
    for mode, game in played.items():
        base = baseline[mode]
        image = game.image_curve is not None and base.image_curve is not None
        curve, random_curve = (game.image_curve, base.image_curve) if image else (game.latent_curve, base.latent_curve)
        games.append(
            Game(
                mode=mode,
                fractions=[float(f) for f in game.fractions],
                curve=[float(v) for v in curve],
                random_curve=[float(v) for v in random_curve],
                auc=float(game.image_auc if image else game.latent_auc),
                random_auc=float(base.image_auc if image else base.latent_auc),
                space="image" if image else "latent",
            )
        )
    return games


def _stage(progress, start: float, end: float):
    """A `explain.progress` callable that maps one stage's count into ``start..end`` of a
    front end's 0..1 bar (``progress(fraction, description)``)."""
    if progress is None:
        return None
    return lambda done, total, desc: progress(start + (end - start) * done / max(total, 1), desc)


# ---------------------------------------------------------------------------- methods
def run_rise(denoiser, trace, step: int, settings=None, item: int = 0, decode=None, games: bool = True, progress=None) -> MethodMap:
    """DF-RISE at ``step`` with ``settings`` (default `defaults.RISE`), its games and verdicts.
    ``progress(fraction, description)`` follows the masks, then the games."""
    from explain.methods import rise

    settings = settings or defaults.RISE
    start = time.perf_counter()
    step = trace.check_step(step)
    result = rise.df_rise(denoiser, trace, step, item, progress=_stage(progress, 0.0, 0.6 if games else 1.0), **settings.kwargs())
    played = play_games(denoiser, trace, step, result.saliency, item, decode, _stage(progress, 0.6, 1.0)) if games else []
    method_id = rise_method_id(settings)
    passes, line = sanity_verdict(method_id, trace.meta.get("model"))
    caption = (
        f"DF-RISE at step {step} (t = {float(trace.timesteps[step]):.0f}) from {result.n_masks} random masks "
        f"({settings.masks}, p = {settings.p}; {settings.quantity} compared by {result.similarity}"
        f"{', centered' if result.centered else ''}): where keeping the latent keeps the model's prediction the same "
        "(ReLU + min-max for display)."
    )
    return MethodMap(
        method="DF-RISE", method_id=method_id, step=step, timestep=float(trace.timesteps[step]), heat=result.display(),
        saliency=result.saliency, settings=settings.kwargs(), games=played, sanity=passes, sanity_line=line,
        caption=caption, seconds=time.perf_counter() - start,
    )


def cam_layers(denoiser, layers) -> str | list[str]:
    """A layer group name (``down_blocks``, ``mid_block``, ``up_blocks``) as the blocks in it;
    anything else as it is (``paper``, ``all``, a block name)."""
    from explain.methods import cam

    if layers in ("down_blocks", "mid_block", "up_blocks"):
        return [n for n in cam.all_layers(denoiser.modules) if n.startswith(layers + ".")]
    return layers


def run_cam(denoiser, trace, step: int, settings=None, layers=None, item: int = 0, decode=None, games: bool = True, progress=None) -> MethodMap:
    """DF-CAM at ``step`` with ``settings`` (default `defaults.CAM`; ``layers`` overrides its
    layers), its games and verdicts."""
    from explain.methods import cam

    settings = settings or defaults.CAM
    kwargs = settings.kwargs()
    if layers:
        kwargs["layers"] = layers
    shown_layers = kwargs["layers"]
    kwargs["layers"] = cam_layers(denoiser, kwargs["layers"])
    start = time.perf_counter()
    step = trace.check_step(step)
    result = cam.df_cam(denoiser, trace, step, item, progress=_stage(progress, 0.0, 0.2 if games else 1.0), **kwargs)
    played = play_games(denoiser, trace, step, result.latent, item, decode, _stage(progress, 0.2, 1.0)) if games else []
    passes, line = sanity_verdict("df_cam", trace.meta.get("model"))
    count = len(result.layers)
    caption = (
        f"DF-CAM at step {step} (t = {float(trace.timesteps[step]):.0f}) on {shown_layers} ({count} block{'s' if count != 1 else ''}): "
        f"Grad-CAM of the guided {settings.quantity} prediction (target: {settings.target}), each block's map min-max scaled, then summed."
    )
    return MethodMap(
        method="DF-CAM", method_id="df_cam", step=step, timestep=float(trace.timesteps[step]), heat=result.display(),
        saliency=result.latent, settings={**settings.kwargs(), "layers": shown_layers, "blocks": count}, games=played,
        sanity=passes, sanity_line=line, caption=caption, seconds=time.perf_counter() - start,
    )


def run_guidance(denoiser, trace, step: int, item: int = 0, decode=None, games: bool = True, progress=None, words=None) -> MethodMap:
    """The guidance map at ``step`` (`explain.methods.guidance`): the prompt's (conditional minus
    unconditional x0 at the same x_t) or, with ``words`` (a word, several, or a phrase of the
    prompt), the words' (the prediction with their tokens masked against the unmasked one), with
    its games and verdicts."""
    from explain.methods import guidance

    start = time.perf_counter()
    step = trace.check_step(step)
    result = guidance.guidance_map(denoiser, trace, step, item, words=words)
    played = play_games(denoiser, trace, step, result.latent, item, decode, _stage(progress, 0.0, 1.0)) if games else []
    t = float(trace.timesteps[step])
    if words is None:
        method, method_id = "Guidance map", "guidance_map"
        what = "where the prompt changes the model's x0 prediction, |x0(prompt) - x0(no prompt)| at the same x_t"
    else:
        label = result.against.removeprefix("without ")
        method, method_id = f"Guidance map of '{label}'", "guidance_word"
        what = f"where masking the tokens of '{label}' changes the model's x0 prediction, at the same x_t"
    passes, line = sanity_verdict(method_id, trace.meta.get("model"))
    caption = (
        f"{method} at step {step} (t = {t:.0f}): {what} (so the identity path cancels), min-max for display. "
        "Where the conditioning acts at this step, not which input pixels the prediction depends on."
    )
    return MethodMap(
        method=method, method_id=method_id, step=step, timestep=t, heat=result.display(),
        saliency=result.latent, settings={"against": result.against}, games=played, sanity=passes, sanity_line=line,
        caption=caption, seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- causal onset (R2)
ONSET_MEASURED = {
    "diffusion-explain/shapes-64": (
        "measured on this model (benchmarks/bench_timing.py, 30 held-out prompts, 393 attribute pairs): the onset order "
        "agrees with the ground-truth settle order of the attributes for 61.3 % of pairs, below the 80 % bar and below "
        "a prior that knows only each attribute's kind (74.4 %): read each curve as how strongly the word steers each "
        "step's prediction, not as the order in which the model decides"
    ),
}
ONSET_NOT_MEASURED = "agreement with a ground truth: not measured for this model (benchmarks/bench_timing.py measures it on the embedded shapes model)"


@dataclass
class OnsetView:
    """`explain.methods.timing.concept_onset` of every prompt word, with the edit made to each
    (``edits``: ``"swap: cyan"`` or ``"removed"``) and the prompt that edit gave."""

    onset: object  # ConceptOnset
    edits: list[str]
    prompts: list[str]
    evidence: str
    seconds: float = 0.0

    def table(self) -> list[dict]:
        return [{**row, "edit": e, "edited_prompt": p} for row, e, p in zip(self.onset.table(), self.edits, self.prompts)]

    def to_json(self) -> dict:
        return {**self.onset.to_json(), "edits": list(self.edits), "edited_prompts": list(self.prompts), "evidence": self.evidence, "seconds": self.seconds}


def onset_evidence(model: str | None) -> str:
    for name in _model_names(model):
        if name in ONSET_MEASURED:
            return ONSET_MEASURED[name]
    return ONSET_NOT_MEASURED


def run_onset(denoiser, trace, denoiser_for_prompt, item: int = 0, decode=None) -> OnsetView:
    """When each prompt word starts to shape the prediction: each word swapped for a
    contrasting value of its kind (or removed where it has none) in the prompt as written, one
    counterfactual denoiser per word from ``denoiser_for_prompt(prompt)``, and the effect on
    every step's x0 prediction (decoded by ``decode`` when given)."""
    from explain.methods import heatmaps, timing
    from explain.sweep.words import counterfactual_prompts

    start = time.perf_counter()
    words = [w for w in heatmaps.prompt_words(trace, item) if w.token_indices]
    if not words:
        raise ValueError("the trace names no prompt words with tokens, so there is no word to edit")
    edits, prompts = map(list, zip(*counterfactual_prompts(trace.prompts[item], [w.text for w in words])))
    counterfactuals = [denoiser_for_prompt(p) for p in prompts]
    onset = timing.concept_onset(denoiser, trace, [[w] for w in words], item=item, counterfactuals=counterfactuals, decode=decode, **defaults.ONSET.kwargs())
    return OnsetView(onset, edits, prompts, onset_evidence(trace.meta.get("model")), time.perf_counter() - start)
