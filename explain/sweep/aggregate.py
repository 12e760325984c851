"""From per-prompt records to the sweep's tables and its aggregate numbers.

Every interval is a 95 % percentile bootstrap over prompts (`bootstrap_mean`, 1,000 resamples,
a fixed seed, so a report is reproducible); curves are bootstrapped step by step with the same
resampled prompts. Definitions of every number live next to it in ``DEFINITIONS`` and appear in
the report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
GAME_KEYS = tuple(f"{mode}_{space}" for mode in ("insertion", "deletion") for space in ("latent", "image"))
OBJECT_PAIRS = (("color", "shape"), ("color", "size"), ("shape", "size"))

DEFINITIONS = {
    "auc": "per prompt: trapezoid area under the game's distance curve over the fraction of latent positions moved "
    "(0..1); a faithful map has a LOW insertion AUC and a HIGH deletion AUC",
    "paper_auc": "the paper's aggregation: mean curve over prompts, min-max normalised, trapezoid (shape only)",
    "beats": "share of prompts whose map's AUC is better than the baseline's on the same prompt (insertion: lower, deletion: higher)",
    "baseline random": "U[0,1) maps, the AUC of each prompt averaged over two seeds (the paper's baseline)",
    "baseline xt_magnitude": "|x_t| averaged over channels: a map that needs no model",
    "baseline xt_detail": "|x_t - blur(x_t)| averaged over channels: a map that needs no model",
    "baseline center": "a Gaussian bump on the image centre (sigma = a quarter of the side)",
    "sanity": "Spearman rank correlation between the map of the trained and of a fully re-initialised denoiser; "
    "passes below the threshold (0.3, issue 12's bar)",
    "emergence_step": "first step from which a word's attention share, min-max scaled over the run, stays >= 0.5 for 3 steps (ours)",
    "peak_step": "the step of a word's largest attention share",
    "onset_step": "causal onset step (the concept_onset analysis: the first step at which swapping the word for a contrasting value changes that step's decoded x0 prediction by half its largest change)",
    "decision_step": "causal decision step (the causal_timing analysis: the first step from which removing the word no longer changes the result)",
    "tally": "the paper's Visual Genome-style tally: the per-step min-max score of each word summed over steps and prompts, by word class",
    "r3 tally": "R3 as the paper measures it: the same prompt and seed under uniform, early and latter time steps (lambda as set); "
    "a class's tally is the per-step min-max score of its words summed over steps and prompts; minus_uniform is the paired per-prompt difference of the class sum",
    "r3 final change": "RMS of the final x0 latent's difference from the uniform schedule's, over the uniform one's RMS",
    "recovered_fraction": "share of latent pixels whose x0 prediction is within 0.25 std of the final latent",
    "settle step": "ground truth: first step from which the checker finds the attribute correct in the decoded x0 to the end",
    "order agreement": "share of attribute pairs of one object (settling at different steps) whose word timing has the same order",
    "pointing": "the map's maximum lies in the mask (a flat map misses); chance = mean mask area",
    "iou": "IoU of the mask and the min-max map cut at 0.5",
}


# ---------------------------------------------------------------------------- statistics
def _finite(values: Iterable) -> np.ndarray:
    arr = np.array([float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    return arr


def bootstrap_mean(values: Iterable, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean and 95 % percentile-bootstrap interval of the finite values (bools count as 0/1)."""
    arr = _finite(values)
    if arr.size == 0:
        return {"n": 0, "mean": None, "ci": [None, None]}
    if arr.size == 1:
        return {"n": 1, "mean": float(arr[0]), "ci": [float(arr[0]), float(arr[0])]}
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n, arr.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n": int(arr.size), "mean": float(arr.mean()), "ci": [float(lo), float(hi)]}


def bootstrap_curve(curves: list[list[float]], n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Step-wise mean and 95 % interval of equally long curves (prompts resampled as wholes)."""
    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    arr = np.array([[np.nan if v is None else v for v in c[:length]] for c in curves], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n, arr.shape[0]))
    means = np.nanmean(arr[idx], axis=1) if arr.shape[0] > 1 else np.repeat(arr, n, 0)
    lo, hi = np.nanpercentile(means, [2.5, 97.5], axis=0)
    return {"n": int(arr.shape[0]), "mean": _list(np.nanmean(arr, 0)), "lo": _list(lo), "hi": _list(hi)}


def _list(a) -> list:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in a]


def describe_steps(values: Iterable, steps: int) -> dict:
    arr = _finite(values).astype(int)
    hist = np.bincount(np.clip(arr, 0, steps), minlength=steps + 1)[: steps + 1] if arr.size else np.zeros(steps + 1, int)
    if arr.size == 0:
        return {"n": 0, "hist": hist.tolist(), "median": None, "q1": None, "q3": None}
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "hist": hist.tolist(), "median": float(med), "q1": float(q1), "q3": float(q3)}


def paper_auc(curves: list[list[float]]) -> float | None:
    from explain.methods.faithfulness import paper_auc as pa

    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return pa([c[:length] for c in curves])


# ---------------------------------------------------------------------------- tables
LEAD = ("id", "index", "line", "status", "prompt", "negative", "seed", "error")


def prompt_table(records: list[dict]) -> list[dict]:
    rows = []
    for r in sorted(records, key=lambda r: r["index"]):
        row = {k: r.get(k) for k in LEAD}
        for key, value in (r.get("truth") or {}).items():
            if value is None or isinstance(value, (bool, int, float, str)):
                row[f"truth_{key}"] = value
        row.update(r.get("columns") or {})
        row["seconds"] = (r.get("run") or {}).get("total_seconds")
        rows.append(row)
    return rows


def other_tables(records: list[dict]) -> dict[str, list[dict]]:
    """Rows of the secondary tables; rows an analysis wrote for the same object are merged."""
    tables: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["index"]):
        for name, rows in (r.get("tables") or {}).items():
            if name == "objects":  # pointing and settle both describe each object: one row per object
                merged: dict[int, dict] = {}
                for row in rows:
                    key = row.get("object")
                    entry = merged.setdefault(key, {})
                    entry.update({k: v for k, v in row.items() if k != "analysis"})
                tables[name].extend(merged.values())
            else:
                tables[name].extend(rows)
    return dict(tables)


def columns_of(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    seen = set()
    for row in rows:
        for k in row:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    lead = [k for k in LEAD if k in seen]
    rest = sorted(k for k in keys if k not in LEAD)
    return lead + rest


# ---------------------------------------------------------------------------- aggregate
def aggregate(records: list[dict], total: int | None = None, settings: dict | None = None) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    usable = [r for r in records if r.get("status") in ("ok", "error") and r.get("columns")]
    counts = {s: sum(1 for r in records if r.get("status") == s) for s in ("ok", "error", "invalid")}
    if total is not None:
        counts["pending"] = max(0, total - len(records))
    counts["total"] = total if total is not None else len(records)
    out: dict[str, Any] = {"counts": counts, "definitions": DEFINITIONS}
    if settings is not None:
        out["settings"] = settings
    out["timing"] = _timing(records)
    out["failures"] = _failures(records)
    tables = other_tables(usable)
    steps = (settings or {}).get("steps") or _guess_steps(usable)
    out["auc"] = _auc(usable)
    out["sanity"] = _sanity(usable, (settings or {}).get("sanity_threshold", 0.3))
    concept_words = with_decisions(with_decisions(tables.get("words", []), tables.get("timing", [])), tables.get("onset", []), "onset_step")
    out["concepts"] = _concepts(usable, concept_words, steps)
    out["recovery"] = _recovery(usable)
    out["ground_truth"] = _ground_truth(usable, tables.get("objects", []))
    out["timing_truth"] = _timing_truth(usable, tables.get("objects", []), steps)
    out["layers"] = _layers(tables.get("layers", []))
    out["r3"] = _r3(usable)
    sizes = [r["columns"]["trace_bytes"] for r in usable if isinstance(r["columns"].get("trace_bytes"), (int, float))]
    if sizes:  # what asking for the traces costs, projected over the whole sweep
        per = float(np.mean(sizes))
        out["traces"] = {"saved": len(sizes), "bytes": int(sum(sizes)), "bytes_per_prompt": per, "projected_bytes": per * counts["total"]}
    out["ok_prompts"] = len(ok)
    return out


def _guess_steps(records) -> int:
    for r in records:
        curves = (r.get("details") or {}).get("r1_curves") or {}
        if curves.get("recovered_fraction"):
            return len(curves["recovered_fraction"])
        cc = (r.get("details") or {}).get("concept_curves") or {}
        if cc.get("normalized"):
            return len(cc["normalized"][0])
    return 0


def _timing(records) -> dict:
    per: dict[str, list[float]] = defaultdict(list)
    per_cpu: dict[str, list[float]] = defaultdict(list)
    totals = []
    for r in records:
        run = r.get("run") or {}
        for k, v in (run.get("seconds") or {}).items():
            per[k].append(v)
        for k, v in (run.get("cpu_seconds") or {}).items():
            per_cpu[k].append(v)
        if run.get("total_seconds") is not None and r.get("status") != "invalid":
            totals.append(run["total_seconds"])
    mean_total = float(np.mean(totals)) if totals else None
    return {
        "seconds_per_prompt": mean_total,
        "prompts_per_hour_per_process": 3600 / mean_total if mean_total else None,
        "seconds_by_part": {k: float(np.mean(v)) for k, v in per.items()},
        "cpu_seconds_by_part": {k: float(np.mean(v)) for k, v in per_cpu.items()},
    }


def _failures(records) -> list[dict]:
    bad = [r for r in records if r.get("status") in ("error", "invalid")]
    return [{"id": r["id"], "line": r.get("line"), "status": r["status"], "error": r.get("error")} for r in sorted(bad, key=lambda r: r["index"])[:50]]


def _auc(records) -> dict:
    methods = [m for m in ("rise", "cam") if any(f"{m}_curves" in (r.get("details") or {}) for r in records)]
    baseline_names = sorted({k[len("baseline_") : -len("_curves")] for r in records for k in (r.get("details") or {}) if k.startswith("baseline_") and k.endswith("_curves")})
    if not methods and not baseline_names:
        return {}

    def per_key(prefix: str) -> dict:
        result = {}
        for key in GAME_KEYS:
            col = f"{prefix}_{key}_auc"
            values = [r["columns"].get(col) for r in records if col in r["columns"]]
            if not values:
                continue
            curves = [(r.get("details") or {}).get(f"{prefix}_curves", {}).get(key) for r in records]
            result[key] = {**bootstrap_mean(values), "paper_auc": paper_auc([c for c in curves if c])}
        return result

    out = {"methods": {}, "baselines": {b: per_key(f"baseline_{b}") for b in baseline_names}}
    for m in methods:
        entry = per_key(m)
        for key, stats in entry.items():
            better = (lambda a, b: a < b) if key.startswith("insertion") else (lambda a, b: a > b)
            stats["beats"] = {}
            for b in baseline_names:
                pairs = [
                    (r["columns"].get(f"{m}_{key}_auc"), r["columns"].get(f"baseline_{b}_{key}_auc"))
                    for r in records
                    if r["columns"].get(f"{m}_{key}_auc") is not None and r["columns"].get(f"baseline_{b}_{key}_auc") is not None
                ]
                stats["beats"][b] = bootstrap_mean([better(a, c) for a, c in pairs])
            stats["beats_all"] = bootstrap_mean(
                [
                    all(better(r["columns"][f"{m}_{key}_auc"], r["columns"][f"baseline_{b}_{key}_auc"]) for b in baseline_names)
                    for r in records
                    if r["columns"].get(f"{m}_{key}_auc") is not None and all(r["columns"].get(f"baseline_{b}_{key}_auc") is not None for b in baseline_names)
                ]
            )
        out["methods"][m] = entry
        if any(f"{m}_pointing" in r["columns"] for r in records):
            out.setdefault("pointing", {})[m] = {
                "pointing": bootstrap_mean(r["columns"].get(f"{m}_pointing") for r in records),
                "inside_share": bootstrap_mean(r["columns"].get(f"{m}_inside_share") for r in records),
            }
    if "pointing" in out:
        out["pointing"]["chance"] = bootstrap_mean(r["columns"].get("gt_union_area") for r in records)
    return out


def _sanity(records, threshold: float) -> dict:
    out = {}
    for m in ("rise", "cam", "attention"):
        col = f"sanity_{m}_spearman"
        values = [r["columns"].get(col) for r in records if col in r["columns"]]
        if values:
            finite = _finite(values)
            out[m] = {
                "spearman": bootstrap_mean(values),
                "median_spearman": float(np.median(finite)) if finite.size else None,
                "pass_rate": bootstrap_mean(r["columns"].get(f"sanity_{m}_pass") for r in records if col in r["columns"]),
                "threshold": threshold,
            }
    return out


def with_decisions(words: list[dict], timing: list[dict], column: str = "decision_step") -> list[dict]:
    """The concept rows with each word's causal ``column`` (the decision step of the
    causal_timing rows, the onset step of the concept_onset rows, of the same prompt and word
    position) added; rows without one are left as they are."""
    decided = {(t["id"], t["position"]): t.get(column) for t in timing}
    return [{**w, column: decided[(w["id"], w["position"])]} if (w.get("id"), w.get("position")) in decided else w for w in words]

def _concepts(records, words: list[dict], steps: int) -> dict:
    if not words:
        return {}
    by_class: dict[str, list[dict]] = defaultdict(list)
    for w in words:
        by_class[w.get("word_class", "other")].append(w)
    per_step: dict[str, list[list[float]]] = defaultdict(list)
    for r in records:
        cc = (r.get("details") or {}).get("concept_curves")
        if not cc:
            continue
        for cls, curve in zip(cc["classes"], cc["normalized"]):
            per_step[cls].append(curve)
    classes = {}
    for cls, ws in sorted(by_class.items()):
        entry = {
            "words": len(ws),
            "emergence": describe_steps((w.get("emergence_step") for w in ws), steps),
            "peak": describe_steps((w.get("peak_step") for w in ws), steps),
            "tally": float(sum(w.get("step_sum") or 0 for w in ws)),
            "mean_share": bootstrap_mean(w.get("mean_share") for w in ws),
            "normalized_per_step": bootstrap_curve(per_step.get(cls, [])),
            "thirds": _thirds(per_step.get(cls, [])),
        }
        if any(w.get("decision_step") is not None for w in ws):
            entry["decision"] = describe_steps((w.get("decision_step") for w in ws), steps)
        if any(w.get("onset_step") is not None for w in ws):
            entry["onset"] = describe_steps((w.get("onset_step") for w in ws), steps)
        classes[cls] = entry
    return {"steps": steps, "classes": classes, "prompts": len({w["id"] for w in words})}


def _thirds(curves: list[list[float]]) -> dict | None:
    """Mean per-step min-max score of a word in the early, middle and late third of the run."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    from explain.methods.heatmaps import step_thirds

    n = min(len(c) for c in curves)
    arr = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=np.float64)
    return {name: bootstrap_mean(np.nanmean(arr[:, part], axis=1)) for name, part in step_thirds(n)}


def _recovery(records) -> dict:
    keys = ("recovered_fraction", "mean_change", "recovered_objects", "recovered_background", "change_objects", "change_background")
    curves = {}
    for key in keys:
        data = [(r.get("details") or {}).get("r1_curves", {}).get(key) for r in records]
        c = bootstrap_curve([d for d in data if d])
        if c:
            curves[key] = c
    if not curves:
        return {}
    numbers = {
        k: bootstrap_mean(r["columns"].get(k) for r in records if k in r["columns"])
        for k in ("r1_step_50", "r1_step_90", "r1_median_recovery_step", "r1_step_50_objects", "r1_step_50_background")
        if any(k in r["columns"] for r in records)
    }
    never = {
        k: float(np.mean([r["columns"].get(k) is None for r in records if k in r["columns"]]))
        for k in ("r1_step_50_objects", "r1_step_50_background")
        if any(k in r["columns"] for r in records)
    }
    return {"curves": curves, "numbers": numbers, "never_reached_share": never}


def _ground_truth(records, objects: list[dict]) -> dict:
    scored = [o for o in objects if "found" in o]
    if not scored:
        return {}
    found = [o for o in scored if o["found"]]
    out = {
        "prompts": len({o["id"] for o in scored}),
        "objects": len(scored),
        "found": len(found),
        "attributes": {
            "color": bootstrap_mean(o.get("color_ok") for o in scored),
            "shape": bootstrap_mean(o.get("shape_ok") for o in scored),
            "size": bootstrap_mean(o.get("size_ok") for o in scored),
            "count": bootstrap_mean(r["columns"].get("gt_count_ok") for r in records if "gt_count_ok" in r["columns"]),
            "layout": bootstrap_mean(r["columns"].get("gt_layout_ok") for r in records if "gt_layout_ok" in r["columns"]),
        },
        "chance_pointing": bootstrap_mean(o.get("mask_area") for o in found),
        "pointing": {},
        "iou": {},
    }
    for steps_name in ("all", "late"):
        for variant in ("raw", "relative"):
            key = f"{steps_name}_{variant}"
            out["pointing"][key] = bootstrap_mean(o.get(f"pointing_{key}") for o in found)
            out["iou"][key] = bootstrap_mean(o.get(f"iou_{key}") for o in found)
    return out


def _timing_truth(records, objects: list[dict], steps: int) -> dict:
    rows = [o for o in objects if "settle_color" in o]
    if not rows:
        return {}
    settle = {a: describe_steps((o.get(f"settle_{a}") for o in rows), steps) for a in ("color", "shape", "size")}
    never = {a: float(np.mean([o.get(f"settle_{a}") is None for o in rows])) for a in ("color", "shape", "size")}
    agreement = {}
    for timing in ("emergence", "peak", "decision"):
        if not any(o.get(f"{timing}_color") is not None for o in rows):
            continue
        per_pair = {}
        pooled = []
        for a, b in OBJECT_PAIRS:
            verdicts = []
            for o in rows:
                sa, sb, ta, tb = o.get(f"settle_{a}"), o.get(f"settle_{b}"), o.get(f"{timing}_{a}"), o.get(f"{timing}_{b}")
                if None in (sa, sb, ta, tb) or sa == sb:
                    continue
                verdicts.append((sa < sb) == (ta < tb) and ta != tb)
            per_pair[f"{a}<>{b}"] = bootstrap_mean(verdicts)
            pooled += verdicts
        agreement[timing] = {"pooled": bootstrap_mean(pooled), "pairs": per_pair}
    layout = describe_steps((r["columns"].get("settle_layout") for r in records if "settle_layout" in r["columns"]), steps)
    return {"objects": len(rows), "settle": settle, "never_settles": never, "layout": layout, "order_agreement": agreement}


def _r3(records) -> dict:
    """R3 by word class under each schedule: the tally, each prompt's class sum with its paired
    difference from uniform, and the per-step curves, all with bootstrap intervals over prompts."""
    numbers = sorted({k for r in records for k in r["columns"] if k.startswith("r3_")})
    per_prompt = [(r.get("details") or {}).get("r3_schedules") for r in records]
    per_prompt = [p for p in per_prompt if p]
    out: dict[str, Any] = {}
    if numbers:
        out["numbers"] = {k: bootstrap_mean(r["columns"].get(k) for r in records) for k in numbers}
    if not per_prompt:
        return out
    schedules = [name for name in per_prompt[0] if all(name in p for p in per_prompt)]
    classes = sorted({c for p in per_prompt for d in p.values() for c in d["classes"]})
    sums = {name: {c: [] for c in classes} for name in schedules}  # per prompt: Σ step_sum of the class's words
    curves = {name: defaultdict(list) for name in schedules}
    for p in per_prompt:
        for name in schedules:
            d = p[name]
            for c in classes:
                words_of = [j for j, cls in enumerate(d["classes"]) if cls == c]
                sums[name][c].append(sum(d["step_sum"][j] or 0.0 for j in words_of) if words_of else None)
            for cls, curve in zip(d["classes"], d["normalized"]):
                curves[name][cls].append(curve)
    table = {}
    for c in classes:
        entry = {}
        for name in schedules:
            values = sums[name][c]
            entry[name] = {"tally": float(sum(v for v in values if v is not None)), "per_prompt": bootstrap_mean(values)}
            if name != "uniform" and "uniform" in sums:
                diffs = [None if a is None or b is None else a - b for a, b in zip(values, sums["uniform"][c])]
                entry[name]["minus_uniform"] = bootstrap_mean(diffs)
        table[c] = entry
    totals = {name: sum(table[c][name]["tally"] for c in classes) for name in schedules}
    for c in classes:
        for name in schedules:
            table[c][name]["share_of_tally"] = table[c][name]["tally"] / totals[name] if totals[name] else None
    out.update(
        prompts=len(per_prompt),
        schedules=schedules,
        classes=table,
        curves={name: {c: bootstrap_curve(v) for c, v in sorted(curves[name].items())} for name in schedules},
    )
    return out


def _layers(rows: list[dict]) -> dict:
    if not rows:
        return {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row.get("method"), row.get("layer"))].append(row)
    out: dict[str, list] = defaultdict(list)
    for (method, layer), items in groups.items():
        entry = {"layer": layer, "resolution": items[0].get("resolution"), "prompts": len(items)}
        for key in ("word_share", "pointing", "inside_share", "spearman_with_sum"):
            if any(key in i for i in items):
                entry[key] = bootstrap_mean(i.get(key) for i in items)
        out[method].append(entry)
    return dict(out)
