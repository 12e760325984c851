"""The sweep's outputs a researcher reads: CSV tables (Parquet too when pyarrow is installed),
``report.json`` (every aggregate number, with definitions) and ``report.html`` (one small
self-contained page: tables and inline SVG charts, no images, no scripts).
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from explain.sweep import aggregate as agg
from explain.sweep.manifest import atomic_write_json, atomic_write_text, clean_json

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
TABLE_FILES = {"results": "results", "words": "words", "objects": "objects", "layers": "layers"}


# ---------------------------------------------------------------------------- tables
def _cell(value):
    if isinstance(value, float):
        return repr(round(value, 8))
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = agg.columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet(path: Path, rows: list[dict]) -> Path:
    try:  # optional: the CSV tables are always written
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("Parquet tables need pyarrow: pip install pyarrow (or pip install 'diffusion-explain[sweep]')") from None

    columns = agg.columns_of(rows)
    data = {c: [_parquet_value(r.get(c)) for r in rows] for c in columns}
    table = pa.table({c: pa.array(v, from_pandas=True) if _uniform(v) else pa.array([None if x is None else str(x) for x in v]) for c, v in data.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, str(tmp))
    tmp.replace(path)
    return path


def _parquet_value(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _uniform(values) -> bool:
    kinds = {type(v) for v in values if v is not None}
    return len(kinds) <= 1 or kinds <= {int, float}


def write_tables(folder, records: list[dict]) -> dict[str, Path]:
    tables = {"results": agg.prompt_table(records), **agg.other_tables(records)}
    written = {}
    for name, rows in tables.items():
        if not rows and name != "results":
            continue
        written[f"{name}.csv"] = write_csv(folder.root / f"{name}.csv", rows)
        if parquet_available():
            written[f"{name}.parquet"] = write_parquet(folder.root / f"{name}.parquet", rows)
    return written


def write_outputs(folder, rows, records: list[dict], settings: dict) -> Path:
    """Tables, report.json and report.html for the records of ``rows``; returns the HTML's path."""
    written = write_tables(folder, records)
    summary = agg.aggregate(records, total=len(rows), settings=settings)
    summary["files"] = sorted(written)
    atomic_write_json(folder.root / "report.json", summary, indent=1)
    page = render_html(summary)
    return atomic_write_text(folder.root / "report.html", page)


# ---------------------------------------------------------------------------- formatting
def _esc(x) -> str:
    return html.escape(str(x))


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def _ci(stats: dict | None, pct: bool = False, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    f = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: _num(v, digits))
    lo, hi = stats["ci"]
    return f"{f(stats['mean'])} <small>[{f(lo)}, {f(hi)}] n={stats['n']}</small>"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def line_chart(series: list[dict], title: str, xlabel: str = "step", ylabel: str = "", width: int = 460, height: int = 230, ymin=None, ymax=None) -> str:
    """An inline SVG of curves ``{"label", "mean", "lo", "hi"}`` with their interval bands."""
    series = [s for s in series if s and s.get("mean")]
    if not series:
        return ""
    left, right, top, bottom = 46, 120, 22, 34
    pw, ph = width - left - right, height - top - bottom
    values = [v for s in series for k in ("mean", "lo", "hi") for v in (s.get(k) or []) if v is not None]
    lo_v = min(values) if ymin is None else ymin
    hi_v = max(values) if ymax is None else ymax
    if hi_v - lo_v < 1e-12:
        hi_v = lo_v + 1
    n = max(len(s["mean"]) for s in series)

    def x(i):
        return left + (pw * i / max(n - 1, 1))

    def y(v):
        return top + ph * (1 - (v - lo_v) / (hi_v - lo_v))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart">']
    parts.append(f'<text x="{left}" y="14" class="title">{_esc(title)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    for frac in (0, 0.5, 1):
        v = lo_v + frac * (hi_v - lo_v)
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">{_num(v, 2)}</text>')
    for i in sorted({0, (n - 1) // 2, n - 1}):
        parts.append(f'<text x="{x(i):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">{i}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" class="tick">{_esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="10" y="{top + ph / 2}" transform="rotate(-90 10 {top + ph / 2})" text-anchor="middle" class="tick">{_esc(ylabel)}</text>')
    for k, s in enumerate(series):
        color = s.get("color") or PALETTE[k % len(PALETTE)]
        mean = s["mean"]
        if s.get("lo") and s.get("hi"):
            up = [(x(i), y(v)) for i, v in enumerate(s["hi"]) if v is not None]
            down = [(x(i), y(v)) for i, v in enumerate(s["lo"]) if v is not None][::-1]
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in up + down)
            parts.append(f'<polygon points="{pts}" fill="{color}" opacity="0.18" stroke="none"/>')
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(mean) if v is not None)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        parts.append(f'<text x="{left + pw + 6}" y="{top + 12 + 14 * k}" class="legend" fill="{color}">{_esc(s["label"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(hist: list[int], title: str, width: int = 220, height: int = 110, color: str = "#1f77b4") -> str:
    """Bars of a step histogram (the last bin is "never" when the values can be None)."""
    if not hist or not sum(hist):
        return ""
    left, top, bottom = 8, 18, 18
    pw, ph = width - 2 * left, height - top - bottom
    m = max(hist)
    bw = pw / len(hist)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart">', f'<text x="{left}" y="12" class="title">{_esc(title)}</text>']
    for i, v in enumerate(hist):
        h = ph * v / m
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="{color}"><title>step {i}: {v}</title></rect>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="tick">0</text><text x="{left + pw}" y="{height - 4}" text-anchor="end" class="tick">{len(hist) - 1}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- sections
def _settings_section(s: dict) -> str:
    settings = s.get("settings") or {}
    keys = ("protocol", "model", "steps", "guidance", "schedule", "explain_step", "sweep_seed", "fixed_seed", "game_space", "baselines", "analyses", "subsets", "rise", "cam")
    rows = [[_esc(k), _esc(json.dumps(settings[k]) if isinstance(settings.get(k), (dict, list)) else settings.get(k))] for k in keys if k in settings]
    c = s["counts"]
    t = s.get("timing") or {}
    count_line = f"{c['total']} prompts: {c['ok']} ok, {c['error']} failed, {c['invalid']} invalid rows, {c.get('pending', 0)} pending."
    speed = ""
    if t.get("seconds_per_prompt"):
        cpu = t.get("cpu_seconds_by_part") or {}
        parts = ", ".join(f"{_esc(k)} {v:.2f} s" + (f" ({cpu[k]:.2f} s CPU)" if k in cpu else "") for k, v in t["seconds_by_part"].items())
        speed = f"<p>Mean {t['seconds_per_prompt']:.2f} s wall per prompt per process ({t['prompts_per_hour_per_process']:.0f} prompts/hour/process), by part: {parts}.</p>"
    tr = s.get("traces")
    if tr:
        speed += f"<p>Traces (asked for): {tr['saved']} saved under traces/, {tr['bytes'] / 1e6:.1f} MB, {tr['bytes_per_prompt'] / 1e6:.2f} MB per prompt; about {tr['projected_bytes'] / 1e9:.2f} GB for the {c['total']} prompts.</p>"
    fails = ""
    if s.get("failures"):
        fails = "<details><summary>failed and invalid rows</summary>" + _table(["id", "line", "status", "error"], [[_esc(f["id"]), _esc(f["line"]), _esc(f["status"]), _esc(f["error"])] for f in s["failures"]]) + "</details>"
    return f"<h2>Sweep</h2><p>{count_line}</p>{speed}{fails}" + _table(["setting", "value"], rows, "settings")


def _auc_section(s: dict) -> str:
    auc = s.get("auc") or {}
    if not auc:
        return ""
    keys = [k for k in agg.GAME_KEYS if any(k in v for group in ("methods", "baselines") for v in auc.get(group, {}).values())]
    header = ["map"] + [f"{k.replace('_', ' ')} AUC" for k in keys]
    rows = []
    for group in ("methods", "baselines"):
        for name, entry in auc.get(group, {}).items():
            label = {"rise": "DF-RISE", "cam": "DF-CAM"}.get(name, f"baseline: {name}")
            rows.append([f"<b>{_esc(label)}</b>" if group == "methods" else _esc(label)] + [_ci(entry.get(k)) + (f"<br><small>paper AUC {_num(entry[k].get('paper_auc'))}</small>" if entry.get(k) else "") for k in keys])
    out = "<h2>Faithfulness: insertion / deletion</h2><p>Per-prompt AUC of the distance to the untouched prediction (low insertion, high deletion is good), mean with 95 % bootstrap interval; below each, the paper's aggregated AUC of the mean curve.</p>" + _table(header, rows, "auc")
    brow = []
    for name, entry in auc.get("methods", {}).items():
        for k in keys:
            if k not in entry:
                continue
            beats = entry[k].get("beats", {})
            brow.append([_esc({"rise": "DF-RISE", "cam": "DF-CAM"}.get(name, name)), _esc(k.replace("_", " "))] + [_ci(beats.get(b), pct=True) for b in auc.get("baselines", {})] + [_ci(entry[k].get("beats_all"), pct=True)])
    if brow:
        out += "<h3>Share of prompts where the map beats the baseline on the same prompt</h3>" + _table(["map", "game"] + [_esc(b) for b in auc.get("baselines", {})] + ["all baselines"], brow, "auc")
    if auc.get("pointing"):
        p = auc["pointing"]
        out += "<h3>Pointing of the saliency maps (ground truth: any object's mask)</h3>" + _table(
            ["map", "pointing", "map mass inside objects"],
            [[_esc(m), _ci(v["pointing"], pct=True), _ci(v["inside_share"], pct=True)] for m, v in p.items() if m != "chance"] + [["chance (objects' share of the image)", _ci(p.get("chance"), pct=True), ""]],
        )
    return out


def _sanity_section(s: dict) -> str:
    san = s.get("sanity") or {}
    if not san:
        return ""
    rows = [[_esc(m), _ci(v["spearman"]), _num(v.get("median_spearman")), _ci(v["pass_rate"], pct=True)] for m, v in san.items()]
    thr = next(iter(san.values()))["threshold"]
    return (
        f"<h2>Sanity: model randomisation</h2><p>Spearman correlation of each map with the same method's map from a fully re-initialised denoiser; a map passes below {thr}. "
        "(Issue 12's suite, with cascading randomisation and a null model, replaces this check when it lands.)</p>" + _table(["map", "Spearman trained vs random", "median", "pass rate"], rows)
    )


def _concepts_section(s: dict) -> str:
    c = s.get("concepts") or {}
    if not c:
        return ""
    classes = c["classes"]
    rows = []
    hists = []
    for k, (cls, e) in enumerate(classes.items()):
        em, pk = e["emergence"], e["peak"]
        rows.append(
            [_esc(cls), str(e["words"]), f"{_num(em['median'], 1)} <small>[{_num(em['q1'], 1)}, {_num(em['q3'], 1)}]</small>", f"{_num(pk['median'], 1)} <small>[{_num(pk['q1'], 1)}, {_num(pk['q3'], 1)}]</small>"]
            + ([f"{_num(e['decision']['median'], 1)}"] if "decision" in e else (["–"] if any("decision" in v for v in classes.values()) else []))
            + ([f"{_num(e['onset']['median'], 1)}"] if "onset" in e else (["–"] if any("onset" in v for v in classes.values()) else []))
            + [_num(e["tally"], 1), _ci(e["mean_share"])]
        )
        color = PALETTE[k % len(PALETTE)]
        hists.append(histogram_chart(em["hist"][:-1], f"{cls}: emergence step", color=color))
    has_decision = any("decision" in v for v in classes.values())
    has_onset = any("onset" in v for v in classes.values())
    header = (
        ["word class", "words", "emergence step, median [IQR]", "peak step, median [IQR]"]
        + (["lock-in step (causal), median"] if has_decision else [])
        + (["onset step (causal), median"] if has_onset else [])
        + ["tally (Σ per-step min-max)", "mean attention share"]
    )
    chart = line_chart(
        [{"label": cls, **e["normalized_per_step"]} for cls, e in classes.items() if e.get("normalized_per_step")],
        "mean per-step min-max concept score by word class (what each step carries)",
        ylabel="score",
        width=560,
    )
    thirds = [(cls, e["thirds"]) for cls, e in classes.items() if e.get("thirds")]
    third_table = ""
    if thirds:
        names = list(thirds[0][1])
        third_table = "<h3>What each part of the run carries: mean per-step min-max score of a word, by class</h3>" + _table(
            ["word class", *names], [[_esc(cls), *(_ci(t.get(n)) for n in names)] for cls, t in thirds]
        )
    return (
        f"<h2>Concepts over the steps</h2><p>{c['prompts']} prompts. Emergence and peak are attention-share timings (labelled for what they are: "
        "when a word's attention rises, not when the model decides it); "
        + ("the lock-in step is causal: the first step from which removing the word no longer changes the result (the causal_timing analysis); " if has_decision else "the causal_timing analysis adds each word's causal lock-in step; ")
        + ("the onset step is causal too: the first step at which swapping the word for a contrasting value changes that step's x0 prediction by half its largest change (the concept_onset analysis). "
           "Neither is evidence of when a concept is decided yet: on the embedded model the onset orders attribute pairs as their ground-truth settle steps in 61 % of held-out pairs, "
           "better than lock-in (50 %) and attention peaks (39 %) but below the 80 % bar and below the kind-only prior 'colours settle first' (74 %) (README, evidence).</p>" if has_onset else "the concept_onset analysis adds each word's causal onset step.</p>")
        + _table(header, rows)
        + chart
        + third_table
        + '<div class="hists">'
        + "".join(hists)
        + "</div>"
    )


def _recovery_section(s: dict) -> str:
    r = s.get("recovery") or {}
    if not r:
        return ""
    curves = r["curves"]
    labels = {"recovered_fraction": "whole latent", "recovered_objects": "objects", "recovered_background": "background"}
    chart = line_chart([{"label": labels[k], **curves[k]} for k in labels if k in curves], "R1: share of the latent already recovered (x0 within tolerance of the final)", ylabel="recovered", ymin=0, ymax=1)
    labels2 = {"mean_change": "whole latent", "change_objects": "objects", "change_background": "background"}
    chart2 = line_chart([{"label": labels2[k], **curves[k]} for k in labels2 if k in curves], "R1: mean |x0_s - x0_(s-1)| per step", xlabel="step (from 1)", ylabel="change")
    rows = [[_esc(k), _ci(v, digits=2)] for k, v in r.get("numbers", {}).items()]
    rows += [[_esc(f"{k}: never reaches 50 %"), f"{100 * v:.1f} %"] for k, v in r.get("never_reached_share", {}).items()]
    return "<h2>R1: what each step recovers</h2>" + chart + chart2 + _table(["number", "mean [95 % CI]"], rows)


def _r3_section(s: dict) -> str:
    r = s.get("r3") or {}
    if not r.get("classes") and not r.get("numbers"):
        return ""
    out = "<h2>R3: what the time steps carry under uniform, early and latter sampling</h2>"
    if r.get("classes"):
        names = r["schedules"]
        header = ["word class"] + [f"{_esc(n)}: tally (share)" for n in names] + [f"{_esc(n)}: per-prompt class sum" for n in names] + [f"{_esc(n)} minus uniform" for n in names if n != "uniform"]
        rows = []
        for cls, e in r["classes"].items():
            share = lambda n: f" <small>({100 * e[n]['share_of_tally']:.1f} %)</small>" if e[n].get("share_of_tally") is not None else ""
            rows.append(
                [_esc(cls)]
                + [_num(e[n]["tally"], 1) + share(n) for n in names]
                + [_ci(e[n]["per_prompt"], digits=2) for n in names]
                + [_ci(e[n].get("minus_uniform"), digits=2) for n in names if n != "uniform"]
            )
        out += (
            f"<p>{r['prompts']} prompts, each generated at its seed under every schedule (the paper's §5.5 tally, by word class; "
            "intervals: 95 % bootstrap over prompts, the difference paired prompt by prompt).</p>" + _table(header, rows)
        )
        for name in names:
            out += line_chart([{"label": c, **v} for c, v in r["curves"][name].items() if v], f"{name}: mean per-step min-max concept score by word class", ylabel="score", width=360, height=200)
    if r.get("numbers"):
        out += _table(["number", "mean [95 % CI]"], [[_esc(k), _ci(v)] for k, v in r["numbers"].items()])
    return out


def _truth_section(s: dict) -> str:
    g = s.get("ground_truth") or {}
    t = s.get("timing_truth") or {}
    if not g and not t:
        return ""
    out = "<h2>Ground truth (shapes world)</h2>"
    if g:
        a = g["attributes"]
        out += f"<p>{g['prompts']} scenes, {g['objects']} objects, {g['found']} found by the attribute checker in the generated images (only found objects are scored).</p>"
        out += _table(["attribute correct in the generated image", "share"], [[_esc(k), _ci(v, pct=True)] for k, v in a.items()])
        rows = [[_esc(k.replace("_", " ")), _ci(g["pointing"][k], pct=True), _ci(g["iou"][k])] for k in g["pointing"]]
        rows.append(["chance (mean mask area)", _ci(g["chance_pointing"], pct=True), ""])
        out += "<h3>Cross-attention word maps of each object's words vs the checker's mask</h3>" + _table(["steps, map", "pointing", "IoU@0.5"], rows)
    if t:
        rows = [[_esc(a), f"{_num(v['median'], 1)} <small>[{_num(v['q1'], 1)}, {_num(v['q3'], 1)}]</small>", f"{100 * t['never_settles'][a]:.1f} %"] for a, v in t["settle"].items()]
        out += "<h3>When attributes settle in the decoded x0</h3>" + _table(["attribute", "settle step, median [IQR]", "never settles"], rows)
        out += '<div class="hists">' + "".join(histogram_chart(v["hist"][:-1], f"{a}: settle step", color=PALETTE[k]) for k, (a, v) in enumerate(t["settle"].items())) + "</div>"
        if t.get("order_agreement"):
            header = ["word timing", "pooled"] + [_esc(p) for p in next(iter(t["order_agreement"].values()))["pairs"]]
            rows = [[_esc(k), _ci(v["pooled"], pct=True)] + [_ci(x, pct=True) for x in v["pairs"].values()] for k, v in t["order_agreement"].items()]
            out += "<h3>Does the word timing order the attributes as they settle?</h3><p>Share of attribute pairs of one object that settle at different steps whose word timing has the same order (a tie counts as a miss).</p>" + _table(header, rows)
    return out


def _layers_section(s: dict) -> str:
    layers = s.get("layers") or {}
    if not layers:
        return ""
    out = "<h2>Per-layer statistics</h2>"
    for method, entries in layers.items():
        keys = [k for k in ("word_share", "pointing", "inside_share", "spearman_with_sum") if any(k in e for e in entries)]
        rows = [[_esc(e["layer"]), _esc(e["resolution"]), str(e["prompts"])] + [_ci(e.get(k), pct=k in ("pointing", "inside_share", "word_share")) for k in keys] for e in entries]
        out += f"<h3>{_esc({'cam': 'DF-CAM layers', 'attention': 'cross-attention layers'}.get(method, method))}</h3>" + _table(["layer", "resolution", "prompts"] + [k.replace("_", " ") for k in keys], rows)
    return out


def _definitions_section(s: dict) -> str:
    return "<h2>Definitions</h2><dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in s["definitions"].items()) + "</dl>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f4f4f4;text-align:left}small{color:#666}.chart{margin:.4em .6em .4em 0}.chart .title{font-size:11px;font-weight:600}
.chart .tick,.chart .legend{font-size:10px}.hists{display:flex;flex-wrap:wrap}dt{font-weight:600;margin-top:.4em}dd{margin-left:1.2em}
"""


def render_html(summary: dict) -> str:
    s = clean_json(summary)
    body = "".join(
        f(s)
        for f in (_settings_section, _auc_section, _sanity_section, _concepts_section, _recovery_section, _r3_section, _truth_section, _layers_section, _definitions_section)
    )
    return f'<!doctype html><html><head><meta charset="utf-8"><title>diffusion-explain sweep</title><style>{STYLE}</style></head><body><h1>diffusion-explain: sweep report</h1>{body}</body></html>\n'
