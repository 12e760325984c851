"""Sanity checks for every map the project draws, and the verdicts front ends show beside them.

A map is evidence about the *model* only if it changes when the model does. Two checks:

* **model randomisation** (Adebayo et al. 2018): the same method on a copy of the model whose
  weights are re-initialised, cascading from the output side ("top") to the input side
  (`layer_groups`, `cascading_randomized_copies`). A map passes when its Spearman rank
  correlation with the fully randomised model's map is below ``RANDOMIZATION_LIMIT`` (0.3);
* **null models**: a denoiser that returns a fixed prediction whatever its input
  (`null_denoiser`). For an ε-predicting model, "fixed ε" makes x0 = (x - √(1-ᾱ) ε)/√ᾱ follow
  the input pixel by pixel (the identity path), and "fixed x0" makes ε follow it; a map is
  checked against both (``NULL_KINDS``). A map is **explained by a null model** when that null
  model's map is not constant and its Spearman correlation with the trained model's map is at
  least ``NULL_LIMIT`` (0.5): half or more of its ranking is what a network that does nothing
  would also give.

``passes = randomization ρ < 0.3 and not explained by any null model`` (means over prompts in
the benchmark; `check_map` for one prompt on demand). Ours in addition: a map drawn from random
masks must agree with itself under another mask seed (ρ ≥ ``SEED_LIMIT``, 0.5), since a map that
is mostly mask noise correlates with nothing, a randomised model's map included, and would
otherwise pass for free.

Verdicts: `MethodVerdict` holds the method id, whether it passes, the numbers behind it, what
it was measured on and a one-line note. `known_verdict(method, model)` reads the verdicts
measured once per model by ``benchmarks/bench_sanity.py`` (shipped in ``verdicts.json`` next to
this file, for the embedded model); the front ends show those. `check_map` computes one
on demand for a user's own model and prompt (costly: the method runs three to four times).

Method ids (`METHODS`): ``word_heatmap``, ``df_rise`` (the project's default settings),
``df_rise:<variant>`` (a named variant of `explain.methods.defaults.VARIANTS`, e.g.
``df_rise:paper``), ``df_rise_tokens``, ``df_cam``, ``recovery``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

RANDOMIZATION_LIMIT = 0.3
NULL_LIMIT = 0.5
SEED_LIMIT = 0.5
NULL_KINDS = ("epsilon", "x0")
VERDICTS_FILE = Path(__file__).with_name("verdicts.json")

METHODS: dict[str, str] = {
    "word_heatmap": "cross-attention word heatmap (per word, over steps)",
    "df_rise": "DF-RISE with the project's default settings (explain.methods.defaults.RISE)",
    "df_rise_tokens": "per-token DF-RISE (prompt tokens masked, per word)",
    "df_cam": "DF-CAM (Grad-CAM on the denoiser's blocks)",
    "recovery": "R1 recovery view (per-step x0 change)",
}


@dataclass(frozen=True)
class MethodVerdict:
    """Whether a method's maps pass the sanity checks on a model, and the numbers behind it.

    ``numbers`` holds at least ``randomization_rho`` (mean Spearman ρ, trained vs fully
    randomised model) and ``null_rho`` (the largest mean ρ with a null model's map; ``None``
    where no null model applies); benchmarks add pointing, game wins and stability.
    ``measured_on`` says on what (model, prompts, step, masks); ``note`` is one line for a
    front end."""

    method: str
    passes: bool
    numbers: dict[str, Any] = field(default_factory=dict)
    measured_on: str = ""
    note: str = ""
    model: str = ""

    @property
    def randomization_rho(self) -> float | None:
        return self.numbers.get("randomization_rho")

    @property
    def null_rho(self) -> float | None:
        return self.numbers.get("null_rho")

    def line(self) -> str:
        """One line for a front end, e.g. ``"passes the sanity checks (ρ vs randomised model
        0.05; vs null model 0.02): <note>"``."""
        parts = []
        if self.randomization_rho is not None:
            parts.append(f"ρ vs randomised model {self.randomization_rho:.2f}")
        if self.null_rho is not None:
            parts.append(f"vs null model {self.null_rho:.2f}")
        numbers = f" ({'; '.join(parts)})" if parts else ""
        head = "passes the sanity checks" if self.passes else "FAILS the sanity checks"
        return f"{head}{numbers}" + (f": {self.note}" if self.note else "")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MethodVerdict":
        return cls(
            method=str(data["method"]),
            passes=bool(data["passes"]),
            numbers=dict(data.get("numbers", {})),
            measured_on=str(data.get("measured_on", "")),
            note=str(data.get("note", "")),
            model=str(data.get("model", "")),
        )


def verdict_passes(randomization_rho: float | None, null_rho: float | None, seed_rho: float | None = None) -> bool:
    """The pass rule: ρ with the randomised model below 0.3 and not explained by a null model
    (ρ below 0.5, or no null model applies); for a map from random masks, ρ with itself under
    another mask seed at least 0.5 (``None``: a deterministic map). A missing or NaN
    randomisation ρ does not pass."""
    if randomization_rho is None or not math.isfinite(randomization_rho):
        return False
    if seed_rho is not None and not (math.isfinite(seed_rho) and seed_rho >= SEED_LIMIT):
        return False
    if randomization_rho >= RANDOMIZATION_LIMIT:
        return False
    return null_rho is None or not math.isfinite(null_rho) or null_rho < NULL_LIMIT


# ---------------------------------------------------------------------------- evidence
# The bars a map from random masks must meet to be shown as evidence about the model (issue 12):
# pass the sanity checks, beat random and every model-free baseline (and the same method on the
# randomised model) in insertion AND deletion on >= 90 % of held-out prompts, and agree with
# itself under another mask seed (ρ >= 0.9) at the mask count it runs with.
EVIDENCE_WIN_SHARE = 0.9
EVIDENCE_SEED_RHO = 0.9


def evidence_failures(numbers: dict, passes: bool, from_masks: bool = True) -> list[str]:
    """What keeps a method's maps from counting as evidence, from a verdict's ``passes`` and
    ``numbers`` (``beats_all_share``: share of prompts where the map beats every baseline in both
    games; ``seed_rho_at_masks``: mask-seed ρ at the method's own mask count). Empty: nothing;
    a bar that was not measured is listed as such."""
    fails = [] if passes else ["fails the sanity checks"]
    share = numbers.get("beats_all_share")
    if share is None:
        fails.append("faithfulness not measured")
    elif not share >= EVIDENCE_WIN_SHARE:
        fails.append(f"beats every baseline in insertion and deletion on {100 * share:.0f} % of prompts (bar {100 * EVIDENCE_WIN_SHARE:.0f} %)")
    if from_masks:
        rho = numbers.get("seed_rho_at_masks")
        if rho is None:
            fails.append("mask-seed stability not measured")
        elif not rho >= EVIDENCE_SEED_RHO:
            fails.append(f"mask-seed ρ {rho:.2f} at {numbers.get('masks_at', '?')} masks (bar {EVIDENCE_SEED_RHO})")
    return fails


# ---------------------------------------------------------------------------- cached verdicts
def _model_keys(model: str) -> set[str]:
    text = str(model).strip().rstrip("/\\")
    keys = {text}
    if text:
        keys.add(Path(text).name)
    return keys


def load_verdicts(path: str | Path = VERDICTS_FILE) -> dict[str, dict[str, MethodVerdict]]:
    """All cached verdicts: ``{model id: {method id: MethodVerdict}}`` (empty when the file is
    missing). Each model entry may list ``aliases`` (e.g. the folder name) it is also found by."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, dict[str, MethodVerdict]] = {}
    for model_id, entry in data.get("models", {}).items():
        out[model_id] = {m: MethodVerdict.from_json(v) for m, v in entry.get("methods", {}).items()}
    return out


def _aliases(path: str | Path = VERDICTS_FILE) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    names = {}
    for model_id, entry in data.get("models", {}).items():
        names[model_id] = model_id
        for alias in entry.get("aliases", []):
            names[str(alias)] = model_id
    return names


def known_verdict(method: str, model: str, path: str | Path = VERDICTS_FILE) -> MethodVerdict | None:
    """The verdict measured once for ``method`` (an id of `METHODS`, or ``df_rise:<variant>``)
    on ``model`` (a model id such as ``"diffusion-explain/shapes-64"``, or a path whose last
    folder is a known alias, such as a trace's ``meta["model"]``), or ``None`` when it was never
    measured. Front ends show this next to each map."""
    names = _aliases(path)
    model_id = next((names[k] for k in _model_keys(model) if k in names), None)
    if model_id is None:
        return None
    return load_verdicts(path).get(model_id, {}).get(method)


def write_verdicts(verdicts: list[MethodVerdict], model_id: str, aliases: list[str] = (), path: str | Path = VERDICTS_FILE) -> None:
    """Store ``verdicts`` for ``model_id`` (replacing that model's entry; other models stay)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("version", 1)
    models = data.setdefault("models", {})
    models[model_id] = {"aliases": list(aliases), "methods": {v.method: v.to_json() for v in verdicts}}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- null models
def null_denoiser(denoiser, x: torch.Tensor, level, kind: str = "epsilon"):
    """A `GuidedDenoiser` that returns, for any input (and any token mask), the trained
    ``denoiser``'s guided prediction at latent ``x`` ``[C, h, w]`` and ``level``, held fixed as
    ε (``kind="epsilon"``: x0 then follows the input through the identity path) or as x0
    (``kind="x0"``: ε then follows the input). It has no modules, so DF-CAM cannot run on it."""
    from explain.denoiser import GuidedDenoiser

    if kind not in NULL_KINDS:
        raise ValueError(f"null model kind must be one of {NULL_KINDS}, got {kind!r}")
    fixed = denoiser.predict(x.unsqueeze(0) if x.ndim == 3 else x[:1], level, kind).detach()

    def model_fn(xb, lv):
        return None, fixed.to(xb.device).expand(xb.shape[0], *fixed.shape[1:])

    def token_model_fn(xb, lv, keep):
        return model_fn(xb, lv)

    return GuidedDenoiser(
        model_fn=model_fn,
        prediction_type="epsilon" if kind == "epsilon" else "sample",
        guidance_scale=1.0,
        latent_space=denoiser.latent_space,
        device=denoiser.device,
        token_model_fn=token_model_fn,
    )


def null_denoisers(denoiser, trace, step: int, item: int = 0) -> dict:
    """Both null models (`NULL_KINDS`) of ``denoiser`` at ``step`` of ``trace``."""
    from explain.denoiser import NoiseLevel

    step = trace.check_step(step)
    x = trace.x_t[step, item].float()
    if denoiser.device is not None:
        x = x.to(denoiser.device)
    level = NoiseLevel.from_trace(trace, step)
    return {kind: null_denoiser(denoiser, x, level, kind) for kind in NULL_KINDS}


# ---------------------------------------------------------------------------- cascading randomisation
def group_of(name: str) -> str:
    """The cascade group of a module name: its first component, with the block index when there
    is one (``up_blocks.2.resnets.0.conv1`` -> ``up_blocks.2``; ``conv_out`` -> ``conv_out``)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def layer_groups(model: torch.nn.Module, run: Callable[[], Any]) -> list[str]:
    """The model's parameter-holding groups (`group_of`) ordered from the output side to the
    input side: ``run()`` makes one forward pass, and groups are sorted by when they first ran,
    last first ("top layers first", as Adebayo et al. cascade from the logits down)."""
    first: dict[str, int] = {}
    handles = []
    counter = [0]
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue

        def hook(mod, inputs, output, name=name):
            first.setdefault(group_of(name), counter[0])
            counter[0] += 1

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    ran = sorted(first, key=lambda g: -first[g])
    # groups that hold parameters but never ran (unused heads) cannot change a map: left out
    return ran


def cascading_randomized_copies(model: torch.nn.Module, groups: list[str], seed: int = 0, stages: list[int] | None = None):
    """Yield ``(label, copy)`` with the first k groups of ``groups`` (top first) re-initialised,
    for k in ``stages`` (default every k = 1..len(groups)); the last stage is the fully
    randomised model when k = len(groups)."""
    from explain.methods.faithfulness import randomized_copy

    ks = list(range(1, len(groups) + 1)) if stages is None else [int(k) for k in stages]
    for k in ks:
        if not 1 <= k <= len(groups):
            raise ValueError(f"cascade stage {k} is outside 1..{len(groups)}")
        yield f"{groups[k - 1]} and above" if k < len(groups) else "all layers", randomized_copy(model, seed=seed, only=groups[:k])


# ---------------------------------------------------------------------------- checking one map
def _rho(a, b) -> float | None:
    """Spearman ρ of two maps (resized to the smaller grid); ``None`` when either is constant."""
    import torch.nn.functional as F

    from explain.methods.faithfulness import spearman

    a = torch.as_tensor(a).float().cpu()
    b = torch.as_tensor(b).float().cpu()
    if a.shape != b.shape:
        size = min(a.shape, b.shape, key=lambda s: s[0] * s[1])
        a, b = (F.interpolate(m[None, None], size=tuple(size), mode="area")[0, 0] if tuple(m.shape) != tuple(size) else m for m in (a, b))
    value = spearman(a, b)
    return None if not math.isfinite(value) else value


def is_constant(m) -> bool:
    m = torch.as_tensor(m).float()
    return float(m.max() - m.min()) <= 1e-9 * max(float(m.abs().max()), 1e-30)


@dataclass
class MapCheck:
    """The sanity checks of one map on one prompt: ρ with the fully randomised model's map, ρ
    with each cascade stage's (top first), and ρ with each null model's map (``None`` when that
    null model gives a constant map or cannot run the method)."""

    randomization_rho: float | None
    cascade: list[tuple[str, float | None]] = field(default_factory=list)
    null_rho: dict[str, float | None] = field(default_factory=dict)
    seed_rho: float | None = None  # the same method under another mask seed (None: deterministic)

    @property
    def max_null_rho(self) -> float | None:
        values = [v for v in self.null_rho.values() if v is not None]
        return max(values) if values else None

    @property
    def explained_by_null(self) -> bool:
        """A null model's map is not constant and ranks positions like this one (ρ ≥ 0.5)."""
        rho = self.max_null_rho
        return rho is not None and rho >= NULL_LIMIT

    @property
    def passes(self) -> bool:
        return verdict_passes(self.randomization_rho, self.max_null_rho, self.seed_rho)


def check_map(
    explain: Callable[[Any], torch.Tensor],
    trained,
    randomized,
    nulls: dict | None = None,
    cascade: list[tuple[str, Any]] | None = None,
    trained_map: torch.Tensor | None = None,
    reseeded: Callable[[Any], torch.Tensor] | None = None,
) -> MapCheck:
    """Run ``explain(denoiser) -> map [h, w]`` on the trained denoiser, the fully randomised one,
    each cascade stage (``[(label, denoiser)]``) and each null model (``{kind: denoiser}``; a
    null on which the method cannot run, e.g. DF-CAM, counts as giving no map), and compare
    the maps by Spearman ρ. ``reseeded(denoiser)`` (for maps from random masks) is the same
    method under another mask seed, for the self-agreement ρ."""
    base = explain(trained) if trained_map is None else trained_map

    def versus(d) -> float | None:
        m = explain(d)
        # a randomised model whose map is flat has lost all the structure: no resemblance
        return 0.0 if is_constant(m) else _rho(base, m)

    rand_rho = versus(randomized) if randomized is not None else None
    stages = [(label, versus(d)) for label, d in (cascade or [])]
    null_rho: dict[str, float | None] = {}
    for kind, d in (nulls or {}).items():
        try:
            m = explain(d)
        except (ValueError, KeyError):  # the method needs something a null model has not (modules)
            null_rho[kind] = None
            continue
        null_rho[kind] = None if is_constant(m) else _rho(base, m)
    seed_rho = _rho(base, reseeded(trained)) if reseeded is not None else None
    return MapCheck(rand_rho, stages, null_rho, seed_rho)


def summarize(method: str, checks: list[MapCheck], measured_on: str, note: str = "", model: str = "", extra: dict | None = None) -> MethodVerdict:
    """One verdict from the checks of many prompts: mean ρ with the randomised model, the
    largest mean ρ over null models, and the share of prompts whose own map passes."""
    rand = [c.randomization_rho for c in checks if c.randomization_rho is not None]
    by_kind: dict[str, list[float]] = {}
    for c in checks:
        for kind, v in c.null_rho.items():
            if v is not None:
                by_kind.setdefault(kind, []).append(v)
    null_means = {k: sum(v) / len(v) for k, v in by_kind.items() if v}
    rand_mean = sum(rand) / len(rand) if rand else None
    null_max = max(null_means.values()) if null_means else None
    seed_mean = _mean([c.seed_rho for c in checks])
    numbers: dict[str, Any] = {
        "randomization_rho": rand_mean,
        "null_rho": null_max,
        "seed_rho": seed_mean,
        "null_rho_by_kind": null_means,
        "prompts": len(checks),
        "prompts_passing": sum(c.passes for c in checks),
    }
    if checks and checks[0].cascade:
        labels = [label for label, _ in checks[0].cascade]
        numbers["cascade"] = [
            [label, _mean([c.cascade[i][1] for c in checks if len(c.cascade) > i and c.cascade[i][1] is not None])] for i, label in enumerate(labels)
        ]
    numbers.update(extra or {})
    return MethodVerdict(method, verdict_passes(rand_mean, null_max, seed_mean), numbers, measured_on, note, model)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def verdict_on_demand(
    method: str,
    explain: Callable[[Any], torch.Tensor],
    trained,
    randomized,
    trace,
    step: int,
    item: int = 0,
    reseeded: Callable[[Any], torch.Tensor] | None = None,
    model: str = "",
) -> MethodVerdict:
    """A verdict measured now, on the user's own model and prompt: ``explain`` run on the
    trained denoiser, on ``randomized`` (the same model re-initialised, e.g.
    ``from_pipeline(pipe, trace, unet=randomized_copy(pipe.unet))``) and on both null models of
    ``step``. One prompt, so weaker evidence than a cached verdict; it costs three to four runs
    of the method."""
    check = check_map(explain, trained, randomized, null_denoisers(trained, trace, step, item), reseeded=reseeded)
    prompt = trace.prompts[item] if item < len(trace.prompts) else ""
    return summarize(method, [check], f"this prompt ({prompt!r}), step {step}, measured on demand", "one prompt, measured on demand", model)
