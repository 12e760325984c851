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
the benchmark; `check_map` for one prompt on demand).

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
from typing import Any

RANDOMIZATION_LIMIT = 0.3
NULL_LIMIT = 0.5
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


def verdict_passes(randomization_rho: float | None, null_rho: float | None) -> bool:
    """The pass rule: ρ with the randomised model below 0.3 and not explained by a null model
    (ρ below 0.5, or no null model applies). A missing or NaN randomisation ρ does not pass."""
    if randomization_rho is None or not math.isfinite(randomization_rho):
        return False
    if randomization_rho >= RANDOMIZATION_LIMIT:
        return False
    return null_rho is None or not math.isfinite(null_rho) or null_rho < NULL_LIMIT


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
