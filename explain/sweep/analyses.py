"""What a sweep measures for each prompt: small plug-in functions over one generated trace.

An analysis is a function ``fn(ctx) -> dict`` over a `Context` (the prompt row, its trace, the
pipeline, a lazily built guided denoiser, the sweep settings). In the dict it returns,

* a scalar (number, bool, text, None) is a **column** of the per-prompt table (``results.csv``);
* a `Rows` value adds rows to another table (``words.csv``, ``objects.csv``, ``layers.csv``), each
  row tagged with the prompt's id;
* anything else (lists, dicts: curves) is a **detail**, kept in the prompt's record for the
  aggregate report but not in the CSVs.

Analyses run in the order of `ANALYSES`; a later one may reuse what an earlier one put in
``ctx.shared`` (the DF-RISE map for the sanity check, say). One that raises is recorded as that
prompt's error; the other analyses of the prompt still run.

Hooks for issue 12 (explain/methods/sanity.py; R1/R3 measurements) are registered
with ``run=None`` and the issue that brings them; asking for one says so. To wire one, write its
function here and ``register(Analysis("causal_timing", causal_timing, ...))``; the aggregate
report already reads the column names listed in each hook's ``summary``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
import torch.nn.functional as F

from explain.methods import concepts as concept_scores_mod
from explain.methods import faithfulness as fa
from explain.methods import heatmaps, recovery
from explain.sweep import shapes, words


class Rows(list):
    """Rows an analysis adds to another table than the per-prompt one (the dict key names it)."""


class AnalysisUnavailable(ValueError):
    """An analysis that exists only as a hook for now; the message says which work brings it."""


@dataclass
class Context:
    row: Any  # explain.sweep.prompts.PromptRow
    trace: Any  # explain.trace.Trace
    pipe: Any
    settings: Any  # explain.sweep.protocol.Settings
    folder: Any = None  # explain.sweep.manifest.SweepFolder
    cache: dict = field(default_factory=dict)  # per process: survives from prompt to prompt
    shared: dict = field(default_factory=dict)  # per prompt: what analyses hand to later ones
    model_name: str = ""  # what the loader called the model (the generation notes read it)

    @cached_property
    def denoiser(self):
        from explain.adapters.diffusers import from_pipeline

        return from_pipeline(self.pipe, self.trace)

    @cached_property
    def decode(self):
        if self.settings.game_space == "latent":
            return None
        from explain.adapters.diffusers import vae_decoder

        return vae_decoder(self.pipe.vae)

    @cached_property
    def scene(self):
        return shapes.row_scene(self.row)

    @cached_property
    def check(self):
        """The attribute checker's verdict on the generated image (ground-truth mode only)."""
        from explain.embedded import checker

        return checker.check_scene(shapes.final_image(self.trace), self.scene)

    @cached_property
    def object_masks(self) -> list:
        """Per caption object, the checker's mask of it in the generated image (None: not found)."""
        return [None if m is None else torch.from_numpy(m.mask) for m in self.check.matches]

    @cached_property
    def union_mask(self) -> torch.Tensor | None:
        found = [m for m in self.object_masks if m is not None]
        if not found:
            return None
        return torch.stack(found).any(0)

    @property
    def step(self) -> int:
        return self.settings.explain_step


@dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable[[Context], dict] | None
    summary: str
    needs: frozenset = frozenset()  # "previews", "layers", "truth" (a shapes-world scene), "grad"
    cost: str = ""
    hook: str | None = None  # for a hook: the work that brings it

    @property
    def available(self) -> bool:
        return self.run is not None


# ---------------------------------------------------------------------------- helpers
def _round(values, digits: int = 6) -> list:
    return [None if v is None else round(float(v), digits) for v in values]


def _flat(m: torch.Tensor) -> bool:
    return float(m.max() - m.min()) <= 1e-12


def point(saliency: torch.Tensor, mask: torch.Tensor) -> bool:
    """Pointing of a map at any resolution against a mask; a flat map is a miss."""
    if _flat(saliency):
        return False
    return heatmaps.pointing_hit(saliency.float(), mask)


def inside_share(saliency: torch.Tensor, mask: torch.Tensor) -> float:
    """The share of a (non-negative) map's mass that lies inside ``mask``."""
    s = saliency.float().clamp_min(0)
    if tuple(s.shape) != tuple(mask.shape):
        s = heatmaps.upsample(s, tuple(mask.shape))
    total = float(s.sum())
    return float(s[mask].sum()) / total if total > 0 else float("nan")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask.float()[None, None], size=size, mode="area")[0, 0] >= 0.5


# ---------------------------------------------------------------------------- baselines
def _xt(ctx: Context) -> torch.Tensor:
    return ctx.trace.x_t[ctx.step, 0].float()


BASELINES: dict[str, Callable[[Context, int], torch.Tensor]] = {
    # U[0, 1) per latent position (the paper's baseline)
    "random": lambda ctx, seed: fa.random_saliency(ctx.trace.latent_size, seed),
    # model-free maps a sceptical reader tries first (issue 12's findings): where the latent is large,
    # where it has detail, and the image centre
    "xt_magnitude": lambda ctx, seed: _xt(ctx).abs().mean(0),
    "xt_detail": lambda ctx, seed: (_xt(ctx) - fa.gaussian_blur(_xt(ctx))).abs().mean(0),
    "center": lambda ctx, seed: _center_map(ctx.trace.latent_size),
}


def _center_map(size: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    h, w = size
    yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h - 0.5, (torch.arange(w) + 0.5) / w - 0.5, indexing="ij")
    return torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))


def play_games(ctx: Context, saliency: torch.Tensor, seed: int = 0) -> dict[str, dict]:
    """Insertion and deletion at the explanation step: per mode and space, the curve and its AUC."""
    games = fa.insertion_deletion(ctx.denoiser, ctx.trace, ctx.step, saliency, decode=ctx.decode, seed=seed)
    out = {}
    for mode, g in games.items():
        if ctx.settings.game_space in ("latent", "both"):
            out[f"{mode}_latent"] = g.latent_curve
        if g.image_curve is not None:
            out[f"{mode}_image"] = g.image_curve
    return out


def baseline_games(ctx: Context) -> dict[str, dict[str, torch.Tensor]]:
    """Every baseline's game curves at this prompt's step, computed once and shared by DF-RISE and DF-CAM."""
    if "baselines" not in ctx.shared:
        result = {}
        for name in ctx.settings.baselines:
            if name == "random":  # the mean curve of a few random maps
                runs = [play_games(ctx, BASELINES[name](ctx, s), seed=s) for s in ctx.settings.random_seeds]
                result[name] = {k: torch.stack([r[k] for r in runs]).mean(0) for k in runs[0]}
            else:
                result[name] = play_games(ctx, BASELINES[name](ctx, 0))
        ctx.shared["baselines"] = result
    return ctx.shared["baselines"]


def game_columns(prefix: str, curves: dict[str, torch.Tensor]) -> dict:
    cols = {f"{prefix}_{key}_auc": fa.auc(curve) for key, curve in curves.items()}
    cols[f"{prefix}_curves"] = {key: _round(curve.tolist()) for key, curve in curves.items()}
    return cols


def saliency_analysis(ctx: Context, method: str, saliency: torch.Tensor, layer_maps: dict | None = None) -> dict:
    """Games (with every baseline), ground-truth pointing and per-layer statistics of one map."""
    out = game_columns(method, play_games(ctx, saliency))
    if "baselines" not in ctx.shared.get("_reported", set()):
        for name, curves in baseline_games(ctx).items():
            out.update(game_columns(f"baseline_{name}", curves))
        ctx.shared.setdefault("_reported", set()).add("baselines")
    if ctx.scene is not None:
        union = ctx.union_mask
        out[f"{method}_pointing"] = None if union is None else point(saliency, union)
        out[f"{method}_inside_share"] = None if union is None else inside_share(saliency, union)
        out["gt_union_area"] = None if union is None else float(union.float().mean())
    if layer_maps:
        rows = Rows()
        agg = saliency.float().flatten()
        for name, m in layer_maps.items():
            m = m.float()
            small = F.interpolate(m[None, None], size=ctx.trace.latent_size, mode="bilinear", align_corners=False)[0, 0]
            row = {"method": method, "layer": name, "resolution": f"{m.shape[-2]}x{m.shape[-1]}", "spearman_with_sum": fa.spearman(small.flatten(), agg)}
            if ctx.scene is not None and ctx.union_mask is not None:
                row["pointing"] = point(m, ctx.union_mask)
                row["inside_share"] = inside_share(m, ctx.union_mask)
            rows.append(row)
        out["layers"] = rows
    return out


# ---------------------------------------------------------------------------- the analyses
def analyse_traces(ctx: Context) -> dict:
    path = ctx.folder.trace_path(ctx.row.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.trace.save(path)
    return {"trace_bytes": path.stat().st_size}


def analyse_concepts(ctx: Context) -> dict:
    scores = concept_scores_mod.concept_scores(ctx.trace)
    ctx.shared["concepts"] = scores
    texts = [w.text for w in heatmaps.prompt_words(ctx.trace) if w.token_indices]
    classes = words.word_classes(texts, ctx.row.truth)
    rows = Rows()
    for j, (label, text, cls) in enumerate(zip(scores.labels, texts, classes)):
        rows.append(
            {
                "word": text,
                "label": label,
                "position": j,
                "word_class": cls,
                "emergence_step": scores.emergence_step[j],
                "peak_step": scores.peak_step[j],
                "spearman_rho": scores.spearman_rho[j],
                "mean_share": float(scores.share[:, j].mean()),
                "step_sum": scores.step_sum[j],
            }
        )
    top = max(range(len(texts)), key=lambda j: scores.step_sum[j]) if texts else None
    return {
        "concept_words": len(texts),
        "concept_top_word": texts[top] if top is not None else None,
        "words": rows,
        "concept_curves": {
            "classes": classes,
            "normalized": [_round(scores.normalized[:, j].tolist(), 5) for j in range(len(texts))],
            "share": [_round(scores.share[:, j].tolist(), 5) for j in range(len(texts))],
        },
    }


def _first_at_least(curve: list[float], level: float) -> int | None:
    return next((s for s, v in enumerate(curve) if v >= level), None)


def analyse_recovery(ctx: Context) -> dict:
    view = recovery.trace_recovery(ctx.trace, "latent", ctx.settings.recovery_tol)
    fraction = view.recovered_fraction[:, 0].tolist()
    out = {
        "r1_median_recovery_step": float(view.recovery_step[0].float().median()),
        "r1_step_50": _first_at_least(fraction, 0.5),
        "r1_step_90": _first_at_least(fraction, 0.9),
        "r1_curves": {"recovered_fraction": _round(fraction), "mean_change": _round(view.mean_change[:, 0].tolist())},
    }
    if ctx.scene is not None and ctx.union_mask is not None:
        inside = latent_mask(ctx.union_mask, ctx.trace.latent_size)
        if inside.any() and (~inside).any():
            rec = view.recovered[:, 0].float()
            change = view.change[:, 0]
            curves = out["r1_curves"]
            curves["recovered_objects"] = _round(rec[:, inside].mean(1).tolist())
            curves["recovered_background"] = _round(rec[:, ~inside].mean(1).tolist())
            curves["change_objects"] = _round(change[:, inside].mean(1).tolist())
            curves["change_background"] = _round(change[:, ~inside].mean(1).tolist())
            out["r1_step_50_objects"] = _first_at_least(curves["recovered_objects"], 0.5)
            out["r1_step_50_background"] = _first_at_least(curves["recovered_background"], 0.5)
    return out


def analyse_rise(ctx: Context) -> dict:
    from explain.methods.rise import df_rise

    result = df_rise(ctx.denoiser, ctx.trace, ctx.step, **ctx.settings.rise.kwargs())
    saliency = result.display()  # ReLU + min-max, as the paper's game orders it
    ctx.shared["rise"] = saliency
    return {"rise_step": ctx.step, "rise_masks": result.n_masks, **saliency_analysis(ctx, "rise", saliency)}


def analyse_cam(ctx: Context) -> dict:
    from explain.methods.cam import df_cam

    result = df_cam(ctx.denoiser, ctx.trace, ctx.step, **ctx.settings.cam.kwargs())
    ctx.shared["cam"] = result.latent
    return {"cam_step": ctx.step, "cam_layers": len(result.layers), **saliency_analysis(ctx, "cam", result.latent, result.layers)}


def _randomized_denoiser(ctx: Context):
    from explain.adapters.diffusers import from_pipeline
    from explain.adapters.diffusers.families import family_of

    if "randomized" not in ctx.cache:  # one re-initialised copy per process, seeded: the same everywhere
        ctx.cache["randomized"] = fa.randomized_copy(family_of(ctx.pipe).denoiser(ctx.pipe), seed=0)
    return from_pipeline(ctx.pipe, ctx.trace, model=ctx.cache["randomized"])


def analyse_sanity(ctx: Context) -> dict:
    """Model randomisation (Adebayo et al. 2018) with the core's existing check: every parameter
    re-initialised at once. Issue 12's suite (cascading randomisation, a null model) replaces it."""
    from explain.methods.cam import df_cam
    from explain.methods.rise import df_rise

    methods = {
        "rise": lambda den: df_rise(den, ctx.trace, ctx.step, **ctx.settings.rise.kwargs()).display(),
        "cam": lambda den: df_cam(den, ctx.trace, ctx.step, **ctx.settings.cam.kwargs()).latent,
    }
    chosen = [m for m in methods if m in ctx.settings.analyses] or list(methods)
    randomized = _randomized_denoiser(ctx)
    out = {}
    for name in chosen:
        trained = ctx.shared[name] if name in ctx.shared else methods[name](ctx.denoiser)
        other = methods[name](randomized)
        rho = fa.spearman(trained, other)
        out[f"sanity_{name}_spearman"] = rho
        out[f"sanity_{name}_pass"] = None if rho != rho else bool(rho < ctx.settings.sanity_threshold)
    return out


def analyse_pointing(ctx: Context) -> dict:
    """Cross-attention word maps of each object's words against the checker's mask of it."""
    check = ctx.check
    spans = shapes.object_words(ctx.trace, ctx.scene)
    if spans is None:
        raise ValueError("the trace split the caption into other words than the shapes world's grammar; cannot find each object's words")
    rows = Rows()
    half = slice(ctx.trace.num_steps // 2, None)
    for k, (obj, mask) in enumerate(zip(ctx.scene.objects, ctx.object_masks)):
        row = {
            "object": k,
            "shape": obj.shape,
            "color": obj.color,
            "size": obj.size,
            "found": mask is not None,
            "color_ok": check.color_ok[k],
            "shape_ok": check.shape_ok[k],
            "size_ok": check.size_ok[k],
        }
        if mask is not None:
            row["mask_area"] = float(mask.float().mean())
            for steps_name, steps in (("all", None), ("late", half)):
                for variant, relative in (("raw", False), ("relative", True)):
                    heat = heatmaps.word_heatmap(ctx.trace, spans[k], steps, size=tuple(mask.shape), normalize="none", relative=relative)
                    row[f"pointing_{steps_name}_{variant}"] = point(heat, mask)
                    row[f"iou_{steps_name}_{variant}"] = 0.0 if _flat(heat) else heatmaps.mask_iou(heat, mask, 0.5)
        rows.append(row)
    found = [r for r in rows if r["found"]]
    return {
        "gt_objects": len(rows),
        "gt_found": len(found),
        "gt_count_ok": check.count_ok,
        "gt_layout_ok": check.layout_ok,
        "gt_pointing": sum(r["pointing_all_raw"] for r in found) / len(found) if found else None,
        "objects": rows,
    }


def analyse_layers(ctx: Context) -> dict:
    """Per cross-attention layer: the share of attention on the prompt's words, and (ground truth)
    how often each layer's map of an object's words points at it."""
    trace = ctx.trace
    positions = sorted({i for w in heatmaps.prompt_words(trace) for i in w.token_indices})
    spans = shapes.object_words(trace, ctx.scene) if ctx.scene is not None else None
    rows = Rows()
    for name, att in trace.attention_layers.items():
        a = att[:, 0].float()  # [S, T, h, w]
        mass = a.mean((-2, -1))  # [S, T]
        row = {"method": "attention", "layer": name, "resolution": f"{a.shape[-2]}x{a.shape[-1]}", "word_share": float(mass[:, positions].sum(-1).mean())}
        if spans is not None:
            hits = []
            for span, mask in zip(spans, ctx.object_masks):
                if mask is not None:
                    heat = heatmaps.word_heatmap(trace, span, layers=name, size=tuple(mask.shape), normalize="none")
                    hits.append(point(heat, mask))
            row["pointing"] = sum(hits) / len(hits) if hits else None
            row["objects"] = len(hits)
        rows.append(row)
    return {"attention_layers": len(rows), "layers": rows}


R3_SCHEDULES = ("uniform", "early", "latter")


def _schedule_trace(ctx: Context, schedule: str):
    """The prompt generated again at the same seed with ``schedule`` (the sweep's own run is reused)."""
    if schedule == ctx.settings.schedule:
        return ctx.trace
    from explain.run import GenerationRequest, generate_and_trace
    from explain.sweep import plan

    seed = plan.resolve_seed(ctx.row, ctx.settings.sweep_seed, ctx.settings.fixed_seed)
    request = GenerationRequest(
        prompt=ctx.row.prompt, negative_prompt=ctx.row.negative, steps=ctx.settings.steps, guidance=ctx.settings.guidance,
        seed=seed, schedule=schedule, lam=ctx.settings.lam, previews=False, keep_layers=False,
    )
    return generate_and_trace(ctx.pipe, ctx.model_name or ctx.settings.model, request).trace


def analyse_schedules(ctx: Context) -> dict:
    """R3 as the paper measures it (§5.5, §6): the same prompt and seed under uniform, early and
    latter time steps; per word, its per-step min-max concept score summed over the steps (the
    Visual Genome tally's unit), grouped by word class in the aggregate, and how far each
    schedule's final x0 moves from the uniform one's."""
    traces = {name: _schedule_trace(ctx, name) for name in R3_SCHEDULES}
    reference = traces["uniform"].x0[-1, 0].float()
    scale = float(reference.pow(2).mean().sqrt()) or 1.0
    rows = Rows()
    details, out = {}, {}
    for name, trace in traces.items():
        scores = ctx.shared["concepts"] if trace is ctx.trace and "concepts" in ctx.shared else concept_scores_mod.concept_scores(trace)
        texts = [w.text for w in heatmaps.prompt_words(trace) if w.token_indices]
        classes = words.word_classes(texts, ctx.row.truth)
        for j, (text, cls) in enumerate(zip(texts, classes)):
            rows.append({"schedule": name, "word": text, "position": j, "word_class": cls, "step_sum": scores.step_sum[j], "peak_step": scores.peak_step[j], "emergence_step": scores.emergence_step[j]})
        details[name] = {
            "classes": classes,
            "step_sum": _round(scores.step_sum, 5),
            "timesteps": _round(scores.timesteps, 3),
            "normalized": [_round(scores.normalized[:, j].tolist(), 5) for j in range(len(texts))],
        }
        if name != "uniform":
            out[f"r3_{name}_final_change"] = float((trace.x0[-1, 0].float() - reference).pow(2).mean().sqrt()) / scale
    return {**out, "r3_schedules": details, "schedule_words": rows}


def _settle_step(ok: list[bool]) -> int | None:
    """The first step from which ``ok`` stays true to the end; None if it is false at the end."""
    if not ok or not ok[-1]:
        return None
    s = len(ok) - 1
    while s > 0 and ok[s - 1]:
        s -= 1
    return s


def analyse_settle(ctx: Context) -> dict:
    """When each attribute settles in the decoded x0 (the checker on every step's preview), next
    to when its word's attention share emerges and peaks: the ground truth for concept timing."""
    from explain.embedded import checker

    trace = ctx.trace
    if trace.x0_previews is None:
        raise ValueError("the trace has no x0 previews to check")
    scene = ctx.scene
    checks = [checker.check_scene(trace.x0_previews[s, 0].numpy(), scene) for s in range(trace.num_steps)]
    scores = ctx.shared.get("concepts") or concept_scores_mod.concept_scores(trace)
    positions = shapes.object_word_positions(trace, scene)
    if positions is not None and len(scores.labels) != len(trace.words[0]):
        positions = None  # a word without tokens: the score columns no longer line up with the caption's words
    rows = Rows()
    for k, obj in enumerate(scene.objects):
        row = {"object": k, "shape": obj.shape, "color": obj.color, "size": obj.size}
        for attr in ("color", "shape", "size"):
            row[f"settle_{attr}"] = _settle_step([getattr(c, f"{attr}_ok")[k] for c in checks])
            j = positions[k].get(attr) if positions else None
            row[f"emergence_{attr}"] = scores.emergence_step[j] if j is not None else None
            row[f"peak_{attr}"] = scores.peak_step[j] if j is not None else None
        rows.append(row)
    return {"settle_layout": _settle_step([c.layout_ok for c in checks]), "settle_count": _settle_step([c.count_ok for c in checks]), "objects": rows}


TIMING_EVERY = 3  # start steps tested: every third (the issue-12 benchmark's spacing)


def analyse_causal_timing(ctx: Context) -> dict:
    """Issue 12's causal concept timing: each prompt word removed from step s on (the prompt
    re-encoded without it, since a causal text encoder's later tokens still carry a masked word),
    for s every `TIMING_EVERY` steps; its decision step is the first s from which removing it
    no longer changes the result (`explain.methods.timing.decision_step`)."""
    from explain.adapters.diffusers import from_pipeline
    from explain.methods import defaults, timing

    prompt_words = [w for w in heatmaps.prompt_words(ctx.trace) if w.token_indices]
    texts = [w.text for w in prompt_words]
    if not texts:
        return {"timing_words_tested": 0}
    classes = words.word_classes(texts, ctx.row.truth)
    steps = list(range(0, ctx.trace.num_steps, TIMING_EVERY))
    # the prompt without one word, the rest as the user wrote it
    edited = [words.edited_prompt(ctx.trace.prompts[0], texts, k) for k in range(len(texts))]
    counterfactuals = [from_pipeline(ctx.pipe, ctx.trace, prompt=e) for e in edited]
    result = timing.concept_timing(
        ctx.denoiser, ctx.trace, [[w] for w in prompt_words], steps=steps, keep_finals=False, counterfactuals=counterfactuals, **defaults.TIMING.kwargs()
    )  # fmt: skip
    rows = Rows(
        {"word": text, "position": j, "word_class": cls, "decision_step": result.decision_step[j], "causal_peak_step": result.peak_step[j], "effect_whole_run": float(result.effect[j, 0])}
        for j, (text, cls) in enumerate(zip(texts, classes))
    )  # fmt: skip
    return {"timing_words_tested": len(texts), "timing_steps_tested": len(steps), "timing": rows}


def analyse_concept_onset(ctx: Context) -> dict:
    """Issue 12's causal concept onset: each prompt word swapped for a contrasting value of its
    kind (`explain.sweep.words.contrast`: the opposite hue, the other size, the opposite
    relation), or removed when it has none, and the x0 prediction at every traced step compared
    with the unedited one in decoded pixels; the onset step is when that effect first reaches
    half its largest value (`explain.methods.timing.concept_onset`). One guided evaluation per
    word and step."""
    from explain.adapters.diffusers import from_pipeline, vae_decoder
    from explain.methods import defaults, timing

    prompt_words = [w for w in heatmaps.prompt_words(ctx.trace) if w.token_indices]
    texts = [w.text for w in prompt_words]
    if not texts:
        return {"onset_words_tested": 0}
    classes = words.word_classes(texts, ctx.row.truth)
    edits, prompts = map(list, zip(*words.counterfactual_prompts(ctx.trace.prompts[0], texts)))
    counterfactuals = [from_pipeline(ctx.pipe, ctx.trace, prompt=p) for p in prompts]
    decode = vae_decoder(ctx.pipe.vae) if getattr(ctx.pipe, "vae", None) is not None else None
    result = timing.concept_onset(ctx.denoiser, ctx.trace, [[w] for w in prompt_words], counterfactuals=counterfactuals, decode=decode, **defaults.ONSET.kwargs())
    rows = Rows(
        {"word": text, "position": j, "word_class": cls, "edit": edit, "edited_prompt": prompt, "onset_step": result.onset_step[j], "onset_peak_step": result.peak_step[j], "largest_effect": float(result.effect[j].max())}
        for j, (text, cls, edit, prompt) in enumerate(zip(texts, classes, edits, prompts))
    )  # fmt: skip
    return {"onset_words_tested": len(texts), "onset_words_swapped": sum(e.startswith("swap") for e in edits), "onset": rows}


# ---------------------------------------------------------------------------- registry
ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add (or replace: a hook being wired) an analysis; the registry's order is the run order."""
    ANALYSES[analysis.name] = analysis
    return analysis


for _a in (
    Analysis("traces", analyse_traces, "save each prompt's trace (safetensors) under traces/", cost="disk per prompt: ~0.9 MB on the embedded model, ~8 MB at an SD1.5-sized 64x64 latent with 20 steps (x_t/x0 previews included); the run says the measured figure"),
    Analysis("concepts", analyse_concepts, "concept scores per word: attention share, per-step min-max, emergence and peak steps, word classes (words.csv)", cost="negligible"),
    Analysis("recovery", analyse_recovery, "R1: recovered fraction of the latent per step, recovery steps (inside vs outside objects with ground truth)", cost="negligible"),
    Analysis("rise", analyse_rise, "DF-RISE at the explanation step, insertion/deletion AUC against every baseline (+ pointing with ground truth)", frozenset({"denoiser"}), cost="n_masks denoiser calls + games"),
    Analysis("cam", analyse_cam, "DF-CAM at the explanation step, games against every baseline, per-layer statistics (layers.csv)", frozenset({"denoiser", "grad"}), cost="one forward + backward + games"),
    Analysis("sanity", analyse_sanity, "model randomisation check of the DF-RISE / DF-CAM maps (Spearman trained vs re-initialised < 0.3 passes)", frozenset({"denoiser", "grad"}), cost="the maps again with a random model"),
    Analysis("pointing", analyse_pointing, "ground truth: each object's word heatmap against the checker's mask of it (pointing, IoU), attribute checks (objects.csv)", frozenset({"truth"}), cost="negligible"),
    Analysis("layers", analyse_layers, "per cross-attention layer: word share, and pointing with ground truth (layers.csv)", frozenset({"layers"}), cost="keeps per-layer attention in memory"),
    Analysis("schedules", analyse_schedules, "R3 as the paper measures it: the prompt again at the same seed with early and latter time steps; per word class, the concept tally and per-step curves under each schedule (schedule_words.csv)", cost="two more generations"),
    Analysis("settle", analyse_settle, "ground truth: the step from which each attribute stays correct in the decoded x0, next to its word's emergence/peak", frozenset({"truth", "previews"}), cost="decodes x0 every step"),
    # ---- hooks: issue 12 (branch `validity`) brings these; the report reads the columns named here
    Analysis("sanity_suite", None, "issue 12's sanity suite (cascading randomisation + null model) for every map; columns sanity_<map>_pass", hook="issue 12: explain/methods/sanity.py"),
    Analysis("causal_timing", analyse_causal_timing, "causal decision step of each word: the prompt re-encoded without it from step s on, s every 3 steps (timing.csv; the report's decision-step distribution per word class)", frozenset({"denoiser"}), cost="about (words x steps/2) more generations per prompt"),
    Analysis("concept_onset", analyse_concept_onset, "causal onset step of each word: swapped for a contrasting value (or removed), the effect on each step's x0 prediction in decoded pixels (onset.csv; the report's onset-step column per word class)", frozenset({"denoiser"}), cost="words x steps guided evaluations per prompt (no re-runs)"),
    Analysis("r3", None, "issue 12's R3 schedule comparison (uniform vs early vs latter); columns r3_*", hook="issue 12: R1/R3 measurements"),
):
    register(_a)

GROUND_TRUTH = ("pointing", "settle")
DEFAULT_ANALYSES = ("concepts", "recovery")
PAPER_ANALYSES = ("concepts", "rise", "cam")


def parse_analyses(text: str, ground_truth: bool, protocol: str = "default") -> tuple[str, ...]:
    """``"concepts,rise"``, ``"default"`` or ``"all"`` (every available analysis) to names in run order."""
    text = (text or "default").strip()
    if text == "default":
        chosen = set(PAPER_ANALYSES if protocol == "paper" else DEFAULT_ANALYSES)
        if ground_truth:
            chosen |= set(GROUND_TRUTH)
    elif text == "all":
        chosen = {n for n, a in ANALYSES.items() if a.available and n != "traces" and (ground_truth or "truth" not in a.needs)}
    else:
        chosen = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(n for n in chosen if n not in ANALYSES)
    if unknown:
        raise ValueError(f"unknown analysis {', '.join(unknown)}; choose from {', '.join(ANALYSES)} (or 'default', 'all')")
    for name in sorted(chosen):
        a = ANALYSES[name]
        if not a.available:
            raise AnalysisUnavailable(f"the analysis {name!r} is not available yet: it lands with {a.hook}")
        if "truth" in a.needs and not ground_truth:
            raise ValueError(f"the analysis {name!r} needs ground truth: shapes-world rows (--shapes-world N, or a prompt file with 'scene' fields)")
    return tuple(n for n in ANALYSES if n in chosen)


def needs(names) -> set[str]:
    return set().union(*(ANALYSES[n].needs for n in names)) if names else set()


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
