"""The HTML report: one self-contained page that explains one generation, with its PNGs, JSON
scores and the trace itself in the same folder.

`build_report(trace, out_dir)` writes

* ``index.html``: one file that opens offline from disk or as a mailed attachment (inline CSS
  and JavaScript, images as ``data:`` URIs, maps as inline arrays; nothing is fetched). With
  JavaScript it is an explorer: a step scrubber (with play) over x_t, the x0 prediction and the
  chosen word's heatmap, a word selector, hovering a pixel ranks the prompt's words there, and
  concept and recovery curves follow the step. Without JavaScript, and when printed, it shows
  the same content as static figures. Either way: the prompt's warnings (words the model never
  saw, words cut off), the R1 recovery view, the score table, the DF-RISE / DF-CAM sections
  (with their insertion / deletion games and verdicts) when they were computed, the
  definitions, and the settings last;
* ``final.png``, ``step_grid.png`` (every step), ``heatmaps.png`` (all steps, then early /
  middle / late thirds, one row each), ``words/<n>_<word>.png`` (one overlay per word),
  ``concepts.png`` (the share view), ``recovery.png``, ``recovery_curves.png``,
  ``negative_heatmaps.png`` when the trace has negative-prompt attention, and
  ``<method>_step<k>.png`` / ``<method>_step<k>_games.png`` per DF-RISE / DF-CAM map;
* ``concepts.json``, ``recovery.json``, ``methods.json`` (when maps were computed),
  ``trace.safetensors``. Every JSON is strict: a non-finite number (a run that diverged) is
  ``null``, never a bare ``NaN``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from explain import render
from explain.methods import concepts, heatmaps, recovery
from explain.trace import Trace

FUNCTION_WORDS = ("a", "an", "the", "of", "and", ",", "on", "in", "at", "to", "is")
SETTING_ORDER = ("model", "pipeline", "scheduler", "steps", "guidance", "seed", "image size", "schedule", "λ", "prediction_type")
FRAME_SIDE = 256  # step frames in the explorer are reduced to at most this side (pixels stay sharp)


@dataclass
class Report:
    html_path: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.html_path.parent


# ---------------------------------------------------------------------------- small helpers
def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug or "word"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _png_uri(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(render.as_uint8_image(image)).save(buffer, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, ±inf) as ``None`` and tensors / arrays as lists."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return finite_or_none(value.item())
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, indent: int | None = 1) -> str:
    """JSON any strict parser reads: non-finite numbers become ``null`` (`finite_or_none`)."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False, ensure_ascii=False)


def _content_words(trace: Trace, item: int, skip: Sequence[str], negative: bool = False) -> list:
    words = [w for w in heatmaps.prompt_words(trace, item, negative) if w.token_indices]
    kept = [w for w in words if w.text.lower() not in {s.lower() for s in skip}]
    return kept or words  # a prompt of only function words still gets its maps


def _unique_labels(words) -> list[str]:
    labels, seen = [], {}
    for w in words:
        n = seen.get(w.text, 0) + 1
        seen[w.text] = n
        labels.append(w.text if n == 1 else f"{w.text} ({n})")
    return labels


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(finite_or_none(value), ensure_ascii=False)
    return str(value)


def trace_notes(trace: Trace) -> list[str]:
    """The warnings recorded with the trace (`explain.run` stores them in ``meta["notes"]``)."""
    notes = trace.meta.get("notes") or []
    return [str(n) for n in (notes if isinstance(notes, (list, tuple)) else [notes]) if str(n).strip()]


# ---------------------------------------------------------------------------- build
def build_report(
    trace: Trace,
    out_dir: str | Path,
    *,
    item: int = 0,
    skip_words: Sequence[str] = FUNCTION_WORDS,
    grid_steps: int | None = None,
    recovery_steps: int = 6,
    tol: float = 0.25,
    overlay_mode: str = "paper",
    embed_images: bool = True,
    save_trace: bool = True,
    extra_settings: dict | None = None,
    methods: Sequence = (),
    palette: dict | None = None,
    progress: Callable[[str], None] | None = None,
    onset=None,
) -> Report:
    """Explain ``trace`` (batch item ``item``) into ``out_dir`` and return where everything is.

    ``skip_words`` are left out of the heatmaps and curves (the score table keeps every word);
    ``grid_steps`` limits the static step grid (default: every step); ``extra_settings`` are
    shown with the trace's own settings (timings, say); ``methods`` are DF-RISE / DF-CAM maps
    (`explain.explanations.MethodMap`) to include; ``onset`` the causal onset of the prompt's
    words (`explain.explanations.OnsetView`); ``palette`` maps colour words to RGB for the
    curves (`explain.render.word_colors`); ``embed_images=False`` links the PNGs instead of
    embedding them (a smaller page that needs its folder).
    """
    say = progress or (lambda message: None)
    heatmaps.check_item(trace, item)
    if trace.attention is None:
        raise ValueError("this trace has no cross-attention, so there is nothing to explain; record it with an attention tap")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(html_path=out / "index.html")
    t_all = time.perf_counter()

    @contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - start

    def save(name: str, image) -> Path:
        path = render.save_png(image, out / name)
        report.files[name] = path
        return path

    def write_json(name: str, value) -> None:
        (out / name).write_text(strict_json(value), encoding="utf-8")
        report.files[name] = out / name

    image = render.final_image(trace, item)
    display = _enlarge(image)
    save("final.png", image)

    say("rendering the step grid")
    with timed("step grid"):
        save("step_grid.png", render.step_grid(trace, item=item, count=grid_steps))

    words = _content_words(trace, item, skip_words)
    scores = plot_scores = None
    if words:
        say("computing word heatmaps")
        with timed("heatmaps"):
            _heatmap_figures(trace, item, words, image, display, overlay_mode, skip_words, save)
        say("scoring concepts")
        with timed("concepts"):
            scores = concepts.concept_scores(trace, item=item)
            write_json("concepts.json", scores.to_json())
            plot_scores = concepts.concept_scores(trace, words, item=item)
            save("concepts.png", render.concept_curves(plot_scores, "share", "share of the prompt words' attention", palette=palette))
    else:
        say("the trace has no prompt words (embeddings without text?): no word heatmaps or concept scores")

    say("computing the recovery view (R1)")
    with timed("recovery"):
        space = "preview" if trace.x0_previews is not None else "latent"
        view = recovery.trace_recovery(trace, space=space, tol=tol)
        write_json("recovery.json", view.to_json())
        save("recovery.png", render.recovery_grid(view, trace, item=item, count=recovery_steps))
        save("recovery_curves.png", render.recovery_curves(view, item=item))

    method_files = []
    if methods:
        say("rendering the model-based maps (DF-RISE, DF-CAM, guidance)")
        with timed("methods"):
            method_files = [_method_figures(m, trace, item, display, save) for m in methods]
            write_json("methods.json", [m.to_json() for m in methods])

    if onset is not None:
        say("rendering the causal onset")
        with timed("onset"):
            write_json("onset.json", onset.to_json())
            save("onset.png", render.onset_curves(onset.onset, palette=palette))

    if save_trace:
        say("saving the trace")
        with timed("trace"):
            report.files["trace.safetensors"] = trace.save(out / "trace.safetensors")

    say("writing the HTML")
    with timed("html"):
        data = _explorer_data(trace, item, words, display, plot_scores, view, palette, embed_images, out, report)
        page = _page(trace, item, report, scores, view, method_files, methods, extra_settings or {}, embed_images, data, onset)
        report.html_path.write_text(page, encoding="utf-8")
    report.seconds["total"] = time.perf_counter() - t_all
    return report


def _enlarge(image: np.ndarray, side: int = FRAME_SIDE) -> np.ndarray:
    factor = max(1, -(-side // max(image.shape[:2])))  # small images are enlarged by whole pixels
    return render.resize(image, (image.shape[0] * factor, image.shape[1] * factor), nearest=True)


def _heatmap_figures(trace, item, words, image, display, overlay_mode, skip_words, save) -> None:
    whole = heatmaps.word_heatmaps(trace, words, item=item)
    thirds = heatmaps.step_thirds(trace.num_steps)
    rows = [whole] + ([heatmaps.word_heatmaps(trace, words, steps=s, item=item) for _, s in thirds] if len(thirds) > 1 else [])
    labels = ["all steps"] + ([label for label, _ in thirds] if len(thirds) > 1 else [])
    save("heatmaps.png", render.heatmap_grid(image, rows, row_labels=labels, mode=overlay_mode))
    for n, (label, heat) in enumerate(whole.items()):
        save(f"words/{n:02d}_{_slug(label)}.png", render.overlay(display, heat, overlay_mode))
    if trace.attention_negative is not None and item < len(trace.negative_words) and trace.negative_words[item]:
        negative_words = _content_words(trace, item, skip_words, negative=True)
        if negative_words:
            neg = heatmaps.word_heatmaps(trace, negative_words, item=item, negative=True)
            save("negative_heatmaps.png", render.heatmap_grid(image, neg, mode=overlay_mode, columns=6, title="negative prompt, all steps"))


def _method_figures(method, trace, item, display, save) -> dict:
    slug = _slug(method.method)
    name = f"{slug}_step{method.step}.png"
    final_overlay = render.overlay(display, method.heat)
    x0 = _enlarge(render._preview(trace, "x0", method.step, item))
    x0 = render.resize(x0, display.shape[:2], nearest=True)
    pair = np.concatenate([final_overlay, np.full((display.shape[0], 8, 3), 255, np.uint8), render.overlay(x0, method.heat)], axis=1)
    save(name, render.with_colorbar(pair, low="0 (least)", high="1 (most)", label=f"{method.method}, min-max (left: on the final image; right: on x0 at step {method.step})"))
    files = {"maps": name}
    if method.games:
        curves, fractions = {}, method.games[0].fractions
        for g in method.games:
            curves[f"{g.mode} ({method.method})"] = g.curve
            curves[f"{g.mode} (random)"] = g.random_curve
        games = f"{slug}_step{method.step}_games.png"
        save(games, render.game_curves(curves, fractions, title=f"{method.method} at step {method.step}: insertion / deletion ({method.games[0].space} distance)"))
        files["games"] = games
    return files


# ---------------------------------------------------------------------------- explorer data
def _frame_uris(trace, item, kind, embed, out, report) -> list[str]:
    frames = []
    for s in range(trace.num_steps):
        picture = render._preview(trace, kind, s, item)
        if max(picture.shape[:2]) > FRAME_SIDE:
            scale = FRAME_SIDE / max(picture.shape[:2])
            picture = render.resize(picture, (round(picture.shape[0] * scale), round(picture.shape[1] * scale)))
        if embed:
            frames.append(_png_uri(picture))
        else:
            name = f"frames/{kind}_{s:03d}.png"
            report.files[name] = render.save_png(picture, out / name)
            frames.append(name)
    return frames


def _attention_payload(trace: Trace, item: int, words) -> dict:
    """Every word's merged attention at every step, ``[S, W, h, w]`` at latent resolution, as
    bytes: one scale per step, so words compare at a pixel (the hover ranking) and steps keep
    their own range."""
    maps = torch.stack([torch.stack([trace.attention[s, item, list(w.token_indices)].float().mean(0) for w in words]) for s in range(trace.num_steps)])
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    scale = maps.flatten(1).amax(1).clamp_min(1e-12)
    q = (maps / scale.view(-1, 1, 1, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    h, w = maps.shape[-2:]
    return {"h": int(h), "w": int(w), "scale": [float(v) for v in scale], "data": base64.b64encode(q.numpy().tobytes()).decode("ascii")}


def _explorer_data(trace, item, words, display, plot_scores, view, palette, embed, out, report) -> dict:
    labels = _unique_labels(words)
    colors = [render.hex_color(c) for c in render.word_colors(labels, palette)]
    data = {
        "prompt": trace.prompts[item],
        "steps": [{"t": float(trace.timesteps[s]), "sigma": float(trace.sigmas[s])} for s in range(trace.num_steps)],
        "decoded": trace.x0_previews is not None,
        "display": [int(display.shape[0]), int(display.shape[1])],
        "final": _png_uri(display) if embed else "final.png",
        "frames": {"x_t": _frame_uris(trace, item, "x_t", embed, out, report), "x0": _frame_uris(trace, item, "x0", embed, out, report)},
        "words": [{"label": label, "color": color, "tokens": list(w.token_indices)} for label, color, w in zip(labels, colors, words)],
        "recovery": {"fraction": view.recovered_fraction[:, item].tolist(), "change": [None] + view.mean_change[:, item].tolist(), "space": view.space},
    }
    if words:
        data["attention"] = _attention_payload(trace, item, words)
        data["concepts"] = {kind: getattr(plot_scores, kind).double().tolist() for kind in ("share", "normalized", "mass")}
        data["emergence"] = list(plot_scores.emergence_step)
        data["default_word"] = 0
    return data


# ---------------------------------------------------------------------------- HTML
_CSS = """
:root{--ink:#222;--muted:#555;--line:#ddd;--soft:#f4f4f8;--accent:#3558d4}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1160px;margin:1.5em auto;padding:0 1em;color:var(--ink)}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid var(--line)}
.prompt{font-size:1.2em;background:var(--soft);padding:.5em .8em;border-radius:6px}
.notes{background:#fff4e0;border:1px solid #e8b04a;border-radius:6px;padding:.5em .8em;margin:.8em 0}
.notes li{margin:.2em 0}
.facts{color:var(--muted);font-size:.92em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid var(--line);padding:.25em .6em;text-align:left}
th{background:var(--soft)} td.num{text-align:right;font-variant-numeric:tabular-nums} td:first-child{white-space:nowrap}
img{max-width:100%} img.pixel,canvas.pixel{image-rendering:pixelated} img.final{width:192px}
.note{color:var(--muted);font-size:.9em} dt{font-weight:600;margin-top:.4em} dd{margin-left:1.2em}
.verdict{margin:.4em 0;padding:.4em .7em;border-left:4px solid #999;background:var(--soft)}
.verdict.yes{border-color:#2a9d3a} .verdict.no{border-color:#c23b22}
.top{display:flex;gap:1.5em;align-items:flex-start} .top>div:last-child{flex:1}
.interactive{display:none} html.js .interactive{display:block} html.js .static{display:none}
.panels{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
.panel{text-align:center;font-size:.85em} .frame{position:relative;width:256px}
.panel img,.panel canvas{width:256px;height:256px;image-rendering:pixelated;display:block;border:1px solid var(--line);cursor:crosshair}
.controls{display:flex;gap:.8em;align-items:center;flex-wrap:wrap;margin:.6em 0}
.controls input[type=range]{flex:1;min-width:240px}
button{font:inherit;border:1px solid var(--line);background:#fff;border-radius:5px;padding:.2em .6em;cursor:pointer}
button.active{border-color:var(--accent);box-shadow:0 0 0 1px var(--accent);font-weight:600}
.word-btn .sw,.rank .sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-.05em}
.bar{height:10px;width:256px;margin-top:3px;background:linear-gradient(to right,#00007f,#0000ff,#007fff,#00ffff,#7fff7f,#ffff00,#ff7f00,#ff0000,#7f0000)}
.barlabels{display:flex;justify-content:space-between;width:256px;font-size:.75em;color:var(--muted)}
.rank{flex:1 1 200px;min-width:200px;font-size:.88em} .rank ol{padding-left:1.3em;margin:.3em 0}
.rank .meter{display:inline-block;height:.6em;background:#999;margin-left:.4em;vertical-align:middle}
.crosshair{position:absolute;width:9px;height:9px;border:2px solid #fff;outline:1px solid #000;border-radius:50%;pointer-events:none;display:none;transform:translate(-50%,-50%)}
svg text{font-size:11px;fill:var(--muted)} svg .axis{stroke:#999} svg .grid{stroke:#eee}
details summary{cursor:pointer;color:var(--muted)}
@media print{.interactive{display:none!important} html.js .static,.static{display:block!important} body{max-width:none} h2{break-after:avoid} img{break-inside:avoid}}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  document.documentElement.classList.add("js");
  var $ = function (id) { return document.getElementById(id); };
  var S = D.steps.length, W = D.words.length;
  var state = { step: S - 1, word: D.default_word || 0, range: "step", base: "final", kind: "share", hover: null, timer: null };
  var att = null;
  if (D.attention) {
    var bin = atob(D.attention.data), q = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) q[i] = bin.charCodeAt(i);
    att = { h: D.attention.h, w: D.attention.w, n: D.attention.h * D.attention.w, q: q, scale: D.attention.scale };
  }
  function stepsInRange() {
    if (state.range === "all") return range(0, S);
    if (state.range === "upto") return range(0, state.step + 1);
    return [state.step];
  }
  function range(a, b) { var r = []; for (var i = a; i < b; i++) r.push(i); return r; }
  function meanMap(k, steps) {  // word k's attention averaged over steps, [h*w]
    var out = new Float32Array(att.n);
    steps.forEach(function (s) {
      var off = (s * W + k) * att.n, sc = att.scale[s] / 255;
      for (var p = 0; p < att.n; p++) out[p] += att.q[off + p] * sc;
    });
    for (var p = 0; p < att.n; p++) out[p] /= steps.length;
    return out;
  }
  function jet(x) {
    var c = function (v) { return Math.max(0, Math.min(1, v)); };
    return [c(1.5 - Math.abs(4 * x - 3)), c(1.5 - Math.abs(4 * x - 2)), c(1.5 - Math.abs(4 * x - 1))];
  }
  var pixelCache = {};
  function pixels(src, H, Wd) {
    if (pixelCache[src]) return pixelCache[src];
    pixelCache[src] = new Promise(function (resolve) {
      var img = new Image();
      img.onload = function () {
        var c = document.createElement("canvas"); c.width = Wd; c.height = H;
        var g = c.getContext("2d"); g.imageSmoothingEnabled = false; g.drawImage(img, 0, 0, Wd, H);
        resolve(g.getImageData(0, 0, Wd, H).data);
      };
      img.src = src;
    });
    return pixelCache[src];
  }
  var drawId = 0;
  function drawHeat() {
    if (!att) return;
    var H = D.display[0], Wd = D.display[1], canvas = $("heat");
    canvas.width = Wd; canvas.height = H;
    var map = meanMap(state.word, stepsInRange()), lo = Infinity, hi = -Infinity;
    for (var p = 0; p < att.n; p++) { lo = Math.min(lo, map[p]); hi = Math.max(hi, map[p]); }
    var span = hi - lo > 1e-12 ? hi - lo : 1, src = state.base === "x0" ? D.frames.x0[state.step] : D.final, id = ++drawId;
    pixels(src, H, Wd).then(function (base) {
      if (id !== drawId) return;  // a newer draw started
      var g = canvas.getContext("2d"), out = g.createImageData(Wd, H), h = att.h, w = att.w;
      for (var y = 0; y < H; y++) {
        var fy = Math.max(0, Math.min(h - 1, (y + 0.5) * h / H - 0.5)), y0 = Math.floor(fy), y1 = Math.min(h - 1, y0 + 1), ty = fy - y0;
        for (var x = 0; x < Wd; x++) {
          var fx = Math.max(0, Math.min(w - 1, (x + 0.5) * w / Wd - 0.5)), x0 = Math.floor(fx), x1 = Math.min(w - 1, x0 + 1), tx = fx - x0;
          var v = (map[y0 * w + x0] * (1 - tx) + map[y0 * w + x1] * tx) * (1 - ty) + (map[y1 * w + x0] * (1 - tx) + map[y1 * w + x1] * tx) * ty;
          var m = (v - lo) / span, a = Math.pow(Math.max(0, m), 0.8), col = jet(m), i = (y * Wd + x) * 4;
          out.data[i] = (1 - a) * base[i] + a * 255 * col[0];
          out.data[i + 1] = (1 - a) * base[i + 1] + a * 255 * col[1];
          out.data[i + 2] = (1 - a) * base[i + 2] + a * 255 * col[2];
          out.data[i + 3] = 255;
        }
      }
      g.putImageData(out, 0, 0);
      canvas.dataset.word = D.words[state.word].label;
      canvas.dataset.step = String(state.step);
    });
  }
  function pct(v) { return (100 * v).toFixed(v < 0.1 ? 1 : 0) + "%"; }
  function drawRanking() {
    var box = $("ranking");
    box.textContent = "";
    if (!att) return;
    if (!state.hover) {
      var hint = document.createElement("p"); hint.className = "note";
      hint.textContent = "Hover over an image to rank the prompt's words at that pixel.";
      box.appendChild(hint); return;
    }
    var p = state.hover.row * att.w + state.hover.col, steps = stepsInRange(), values = [];
    for (var k = 0; k < W; k++) {
      var v = 0;
      steps.forEach(function (s) { v += att.q[(s * W + k) * att.n + p] * att.scale[s] / 255; });
      values.push({ k: k, v: v / steps.length });
    }
    var total = values.reduce(function (a, b) { return a + b.v; }, 0) || 1;
    values.sort(function (a, b) { return b.v - a.v; });
    var title = document.createElement("p");
    title.textContent = "At pixel (" + state.hover.x + ", " + state.hover.y + "), " + rangeText() + ":";
    box.appendChild(title);
    var ol = document.createElement("ol");
    values.forEach(function (e) {
      var li = document.createElement("li"), sw = document.createElement("span"), meter = document.createElement("span");
      li.className = "rank-item"; li.dataset.word = D.words[e.k].label;
      sw.className = "sw"; sw.style.background = D.words[e.k].color;
      meter.className = "meter"; meter.style.width = Math.round(120 * e.v / total) + "px"; meter.style.background = D.words[e.k].color;
      li.appendChild(sw); li.appendChild(document.createTextNode(D.words[e.k].label + " " + pct(e.v / total)));
      li.appendChild(meter); ol.appendChild(li);
    });
    box.appendChild(ol);
    var foot = document.createElement("p"); foot.className = "note";
    foot.textContent = "Share of the listed words' attention at this pixel (cross-attention, mean over heads and layers).";
    box.appendChild(foot);
  }
  function rangeText() {
    if (state.range === "all") return "all steps";
    if (state.range === "upto") return "steps 0-" + state.step;
    return "step " + state.step;
  }
  function onHover(ev) {
    var r = ev.currentTarget.getBoundingClientRect();
    var u = (ev.clientX - r.left) / r.width, v = (ev.clientY - r.top) / r.height;
    if (u < 0 || u >= 1 || v < 0 || v >= 1 || !att) return;
    state.hover = { col: Math.floor(u * att.w), row: Math.floor(v * att.h), x: Math.floor(u * D.display[1]), y: Math.floor(v * D.display[0]) };
    document.querySelectorAll(".crosshair").forEach(function (c) { c.style.display = "block"; c.style.left = (u * 100) + "%"; c.style.top = (v * 100) + "%"; });
    drawRanking();
  }
  function svgEl(name, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function lineChart(svg, series, opts) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var Wc = 640, Hc = opts.height || 240, m = { l: 52, r: 12, t: 10, b: 34 };
    svg.setAttribute("viewBox", "0 0 " + Wc + " " + Hc);
    var ymax = opts.ymax, ymin = opts.ymin || 0;
    if (ymax === undefined) {
      ymax = -Infinity;
      series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null && isFinite(v)) ymax = Math.max(ymax, v); }); });
      if (!isFinite(ymax) || ymax <= ymin) ymax = ymin + 1;
    }
    var X = function (s) { return m.l + (S > 1 ? s / (S - 1) : 0.5) * (Wc - m.l - m.r); };
    var Y = function (v) { return Hc - m.b - (v - ymin) / (ymax - ymin) * (Hc - m.t - m.b); };
    for (var i = 0; i <= 4; i++) {
      var v = ymin + (ymax - ymin) * i / 4;
      svg.appendChild(svgEl("line", { x1: m.l, x2: Wc - m.r, y1: Y(v), y2: Y(v), "class": "grid" }));
      var t = svgEl("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }); t.textContent = +v.toPrecision(2); svg.appendChild(t);
    }
    var every = Math.max(1, Math.ceil(S / 12));
    for (var s = 0; s < S; s += every) {
      var tx = svgEl("text", { x: X(s), y: Hc - m.b + 15, "text-anchor": "middle", "class": "xtick" }); tx.textContent = s; svg.appendChild(tx);
    }
    var xl = svgEl("text", { x: (m.l + Wc - m.r) / 2, y: Hc - 4, "text-anchor": "middle" }); xl.textContent = "step"; svg.appendChild(xl);
    var yl = svgEl("text", { x: 12, y: (Hc - m.b + m.t) / 2, "text-anchor": "middle", transform: "rotate(-90 12 " + (Hc - m.b + m.t) / 2 + ")", "class": "ylabel" });
    yl.textContent = opts.ylabel; svg.appendChild(yl);
    series.forEach(function (sr) {
      var pts = [];
      sr.values.forEach(function (v, s) { if (v !== null && isFinite(v)) pts.push(X(s + (sr.offset || 0)).toFixed(1) + "," + Y(v).toFixed(1)); });
      var line = svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: sr.color, "stroke-width": sr.bold ? 3 : 1.5, opacity: sr.bold ? 1 : 0.75, "data-word": sr.label });
      if (sr.onclick) { line.style.cursor = "pointer"; line.addEventListener("click", sr.onclick); }
      var title = svgEl("title", {}); title.textContent = sr.label; line.appendChild(title);
      svg.appendChild(line);
    });
    svg.appendChild(svgEl("line", { x1: X(state.step), x2: X(state.step), y1: m.t, y2: Hc - m.b, stroke: "#333", "stroke-dasharray": "3,3", "class": "cursor" }));
    svg.onclick = function (ev) {
      var r = svg.getBoundingClientRect(), x = (ev.clientX - r.left) / r.width * Wc;
      setStep(Math.round((x - m.l) / (Wc - m.l - m.r) * (S - 1)));
    };
  }
  var KIND_LABEL = { share: "share of the prompt words' attention", normalized: "per-step min-max across words (paper)", mass: "attention mass (raw)" };
  function drawCharts() {
    if (D.concepts) {
      var series = D.words.map(function (w, k) {
        return { label: w.label, color: w.color, bold: k === state.word, values: D.concepts[state.kind].map(function (row) { return row[k]; }),
                 onclick: function (ev) { ev.stopPropagation(); setWord(k); } };
      });
      lineChart($("concept-chart"), series, { ylabel: KIND_LABEL[state.kind] });
    }
    lineChart($("recovery-chart"), [{ label: "recovered", color: "#2a9d3a", bold: true, values: D.recovery.fraction }], { ylabel: "matches final", ymin: 0, ymax: 1, height: 150 });
  }
  function setStep(s) {
    state.step = Math.max(0, Math.min(S - 1, s));
    $("step").value = state.step;
    $("x-t").src = D.frames.x_t[state.step];
    $("x-0").src = D.frames.x0[state.step];
    var st = D.steps[state.step];
    $("step-label").textContent = "step " + state.step + " of " + (S - 1) + " · t = " + Math.round(st.t) + " · σ = " + (+st.sigma.toPrecision(3)) +
      " · " + pct(D.recovery.fraction[state.step] || 0) + " of pixels already match the final image";
    drawHeat(); drawRanking(); drawCharts();
  }
  function setWord(k) {
    state.word = k;
    document.querySelectorAll(".word-btn").forEach(function (b) { b.classList.toggle("active", +b.dataset.index === k); });
    $("heat-title").textContent = "'" + D.words[k].label + "'";
    drawHeat(); drawCharts();
  }
  function buildWordButtons() {
    var box = $("words");
    D.words.forEach(function (w, k) {
      var b = document.createElement("button"), sw = document.createElement("span");
      b.className = "word-btn"; b.dataset.index = k; sw.className = "sw"; sw.style.background = w.color;
      b.appendChild(sw); b.appendChild(document.createTextNode(w.label));
      b.addEventListener("click", function () { setWord(k); });
      box.appendChild(b);
    });
  }
  function toggleGroup(name, key) {
    document.querySelectorAll("[data-" + name + "]").forEach(function (b) {
      b.addEventListener("click", function () {
        state[key] = b.dataset[name];
        document.querySelectorAll("[data-" + name + "]").forEach(function (o) { o.classList.toggle("active", o === b); });
        drawHeat(); drawRanking(); drawCharts();
      });
    });
  }
  function play() {
    var button = $("play");
    if (state.timer) { clearInterval(state.timer); state.timer = null; button.textContent = "▶ play"; return; }
    if (state.step >= S - 1) setStep(0);
    button.textContent = "❚❚ pause";
    state.timer = setInterval(function () {
      if (state.step >= S - 1) { play(); return; }
      setStep(state.step + 1);
    }, 450);
  }
  $("step").max = S - 1;
  $("step").addEventListener("input", function (ev) { setStep(+ev.target.value); });
  $("play").addEventListener("click", play);
  ["x-t", "x-0", "heat"].forEach(function (id) {
    $(id).addEventListener("mousemove", onHover);
    $(id).addEventListener("mouseleave", function () {
      state.hover = null; drawRanking();
      document.querySelectorAll(".crosshair").forEach(function (c) { c.style.display = "none"; });
    });
  });
  if (att) { buildWordButtons(); toggleGroup("range", "range"); toggleGroup("base", "base"); toggleGroup("kind", "kind"); setWord(state.word); }
  else { ["word-panel", "word-controls", "range-controls", "concept-part"].forEach(function (id) { $(id).style.display = "none"; }); }
  setStep(S - 1);
})();
"""


def _img(report: Report, name: str, embed: bool, css_class: str = "", alt: str = "") -> str:
    path = report.files[name]
    src = _data_uri(path) if embed else html.escape(name)
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img src="{src}" alt="{html.escape(alt or name)}"{cls}>'


def settings_rows(trace: Trace, extra: dict | None = None) -> list[tuple[str, str]]:
    """The run's settings, each once: ``guidance`` (not also ``guidance_scale``), one image size,
    λ only for the early / latter schedules; the prompts and notes are shown elsewhere."""
    meta = dict(trace.meta)
    for key in ("notes", "prompt", "negative_prompt"):
        meta.pop(key, None)
    if "guidance_scale" in meta:
        meta.setdefault("guidance", meta["guidance_scale"])
        meta.pop("guidance_scale")
    if "height" in meta or "width" in meta:
        meta["image size"] = f"{meta.pop('width', '?')}×{meta.pop('height', '?')} px"
    lam = meta.pop("lam", None)
    if meta.get("schedule", "uniform") != "uniform" and lam is not None:
        meta["λ"] = lam
    meta = {k: v for k, v in meta.items() if v not in (None, "")}
    rows = [(k, _format(meta.pop(k))) for k in SETTING_ORDER if k in meta]
    rows += [(k, _format(v)) for k, v in sorted(meta.items()) if not isinstance(v, (dict, list)) or len(json.dumps(finite_or_none(v))) < 200]
    rows.append(("latent size", f"{trace.latent_size[1]}×{trace.latent_size[0]}"))
    rows.append(("timesteps", ", ".join(f"{float(t):.0f}" for t in trace.timesteps)))
    rows += [(k, _format(v)) for k, v in (extra or {}).items()]
    return rows


def _facts(trace: Trace) -> str:
    meta = trace.meta
    parts = [str(meta["model"])] if meta.get("model") else []
    parts.append(f"{trace.num_steps} steps")
    for key, label in (("seed", "seed"), ("guidance", "guidance"), ("guidance_scale", "guidance")):
        if key in meta and not (key == "guidance_scale" and "guidance" in meta):
            parts.append(f"{label} {_format(meta[key])}")
    schedule = meta.get("schedule")
    if schedule:
        parts.append(f"{schedule} schedule" + (f" (λ {meta['lam']})" if schedule != "uniform" and "lam" in meta else ""))
    return " · ".join(parts)


def _verdict_html(lines: list[str], good: bool | None) -> str:
    cls = {True: " yes", False: " no", None: ""}[good]
    return f'<div class="verdict{cls}">' + "<br>".join(html.escape(line) for line in lines) + "</div>"


def _explorer_html() -> str:
    return """
<section class="interactive" id="explorer">
<h2>Step by step</h2>
<div class="controls">
  <button id="play" type="button">▶ play</button>
  <input type="range" id="step" min="0" value="0" step="1" aria-label="step">
  <span id="step-label"></span>
</div>
<div class="panels">
  <div class="panel"><div>x<sub>t</sub>, the noisy latent entering the step</div><div class="frame"><img id="x-t" class="pixel" alt="x_t"><span class="crosshair"></span></div></div>
  <div class="panel"><div>x0, the model's prediction of the clean image</div><div class="frame"><img id="x-0" class="pixel" alt="x0"><span class="crosshair"></span></div></div>
  <div class="panel" id="word-panel"><div>where <strong id="heat-title"></strong> is looked for</div><div class="frame"><canvas id="heat" class="pixel" width="256" height="256"></canvas><span class="crosshair"></span></div>
    <div class="bar"></div><div class="barlabels"><span>0 least</span><span>min-max</span><span>1 most</span></div></div>
  <div class="rank" id="ranking"></div>
</div>
<div class="controls" id="word-controls">
  <span>word:</span><span id="words"></span>
</div>
<div class="controls" id="range-controls">
  <span>attention of:</span>
  <button data-range="step" class="active" type="button">this step</button><button data-range="upto" type="button">steps up to this one</button><button data-range="all" type="button">all steps</button>
  <span>on:</span>
  <button data-base="final" class="active" type="button">the final image</button><button data-base="x0" type="button">x0 at this step</button>
</div>
<div id="concept-part">
<h3>Which concepts matter when</h3>
<div class="controls"><span>curve:</span>
  <button data-kind="share" class="active" type="button">share</button><button data-kind="normalized" type="button">normalized (paper)</button><button data-kind="mass" type="button">mass</button>
  <span class="note">click a line to pick its word, or the chart to pick a step</span></div>
<svg id="concept-chart" width="100%" style="max-width:720px"></svg>
</div>
<h3>How much of the image is already there (R1)</h3>
<svg id="recovery-chart" width="100%" style="max-width:720px"></svg>
</section>
"""


def _page(trace, item, report, scores, view, method_files, methods, extra, embed, data, onset=None) -> str:
    e = html.escape
    prompt = trace.prompts[item]
    negative = trace.negative_prompts[item] if item < len(trace.negative_prompts) else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>diffusion-explain: {e(prompt)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>How the model made this image</h1>",
        f'<p class="prompt">{e(prompt)}</p>',
    ]
    if negative:
        parts.append(f'<p class="note">negative prompt: {e(negative)}</p>')
    notes = trace_notes(trace)
    if notes:
        parts.append('<div class="notes" id="notes"><strong>⚠ Read this first</strong><ul>' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul></div>")
    parts.append('<div class="top">')
    parts.append(f"<div>{_img(report, 'final.png', embed, 'pixel final', 'final image')}</div>")
    parts.append(f'<div><p class="facts">{e(_facts(trace))}</p>'
                 '<p class="note">Scrub through the denoising steps below, pick a word to see where the model looks for it, '
                 "and hover over an image to rank the prompt's words at that pixel. Settings and definitions are at the end.</p></div>")
    parts.append("</div>")

    parts.append(_explorer_html())

    parts.append('<div class="static">')
    parts.append("<h2>Denoising steps</h2>")
    parts.append(
        '<p class="note">Each pair of rows: the noisy latent x<sub>t</sub> entering each step, and below it the model\'s '
        "prediction of the finished image (x0) at that step, what it \"thinks\" the image will be.</p>"
    )
    parts.append(_img(report, "step_grid.png", embed, alt="step grid"))
    if scores is not None:
        parts.append("<h2>Where each word is looked for</h2>")
        parts.append(
            '<p class="note">Cross-attention of each prompt word (conditional branch, mean over heads and layers, '
            "sub-word tokens averaged), averaged over all steps (top row) and over the early, middle and late thirds, "
            "upsampled to the image and min-max normalised; red = most attention. Overlay: (1 − m<sup>0.8</sup>)·image + "
            "m<sup>0.8</sup>·jet(m), as in the paper.</p>"
        )
        parts.append(_img(report, "heatmaps.png", embed, alt="word heatmaps"))
        parts.append("<h2>Which concepts matter when</h2>")
        parts.append(_img(report, "concepts.png", embed, alt="concept curves, share"))
    parts.append("</div>")

    if scores is None:
        parts.append("<h2>Words</h2>")
        parts.append('<p class="note">This trace names no prompt words (the prompt was given as embeddings), so there are no word heatmaps or concept scores.</p>')
    else:
        from explain.explanations import sanity_verdict

        passes, line = sanity_verdict("word_heatmap", trace.meta.get("model"))
        parts.append("<h2>Scores per word</h2>")
        parts.append(_verdict_html([f"word heatmaps: {line}"], passes))
        parts.append(
            "<table><tr><th>word</th><th>tokens</th><th>mean share</th><th>peak step</th><th>emergence step</th>"
            "<th>Spearman ρ (step, share)</th><th>Σ normalised</th></tr>"
        )
        num = lambda v, fmt: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)  # noqa: E731
        for row in scores.table():
            parts.append(
                f"<tr><td>{e(row['word'])}</td><td>{e(', '.join(map(str, row['tokens'])))}</td>"
                f"<td class=num>{num(row['mean_share'], '.3f')}</td><td class=num>{row['peak_step']}</td>"
                f"<td class=num>{row['emergence_step']}</td><td class=num>{num(row['spearman_rho'], '+.2f')}</td><td class=num>{num(row['step_sum'], '.2f')}</td></tr>"
            )
        parts.append("</table>")
        if "negative_heatmaps.png" in report.files:
            parts.append("<h3>Negative prompt: where its words are looked for</h3>")
            parts.append(_img(report, "negative_heatmaps.png", embed, alt="negative prompt heatmaps"))

    if onset is not None:
        parts += _onset_html(onset, report, embed)

    parts.append("<h2>What is recovered at each step (R1)</h2>")
    from explain.explanations import sanity_verdict

    passes, line = sanity_verdict("recovery", trace.meta.get("model"))
    parts.append(_verdict_html([f"R1 recovery view: {line}"], passes))
    parts.append(
        f'<p class="note">Computed on the {"decoded x0 previews" if view.space == "preview" else "latents"}. '
        "Row 2: where this step changed the prediction (one colour scale for all steps, so panels compare). Row 3: green "
        f"where the prediction already matches the final image (mean absolute difference ≤ {view.tol} × the final's "
        "standard deviation). Bottom: the step from which each pixel stays matched.</p>"
    )
    parts.append(_img(report, "recovery.png", embed, alt="recovery view"))
    parts.append(_img(report, "recovery_curves.png", embed, alt="recovery curves"))

    for method, files in zip(methods, method_files):
        parts += _method_html(method, files, report, embed)

    parts.append("<h2>Definitions</h2><dl>")
    for key, text in (scores.definitions() if scores is not None else {}).items():
        parts.append(f"<dt>{e(key)}</dt><dd>{e(text)}</dd>")
    for key, text in view.to_json()["definitions"].items():
        parts.append(f"<dt>recovery: {e(key)}</dt><dd>{e(text)}</dd>")
    if methods:
        parts.append("<dt>beats random</dt><dd>The map's insertion AUC is below the random map's and its deletion AUC above it "
                     "(distance of the x0 prediction from the unperturbed one as latent positions are inserted or removed in the map's order).</dd>")
        parts.append("<dt>passes the sanity checks</dt><dd>What the sanity benchmark measured once for this method on this model "
                     "(the map must change when the model's weights are randomised, and must not be reproduced by a model that ignores its input); "
                     "\"not measured\" when it never ran for this model.</dd>")
    parts.append("</dl>")

    parts.append('<h2 id="settings">Settings</h2><table id="settings-table"><tr><th>setting</th><th>value</th></tr>')
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in settings_rows(trace, extra)]
    parts.append("</table>")
    files = [n for n in report.files if not n.startswith(("words/", "frames/"))] + ["index.html"]
    parts.append(f'<p class="note">Files in this folder: {e(", ".join(files))}. '
                 "Open the trace again with <code>python -m explain open trace.safetensors</code>.</p>")
    # inside <script> nothing may close the tag or open a comment: "<" only ever appears escaped
    payload = strict_json(data, indent=None).replace("<", "\\u003c")
    parts.append(f'<script type="application/json" id="report-data">{payload}</script>')
    parts.append(f"<script>{_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _onset_html(onset, report, embed) -> list[str]:
    e = html.escape
    parts = ['<h2 id="onset">When each word starts to shape the prediction (causal onset)</h2>']
    parts.append(_verdict_html([f"causal onset: {onset.evidence}"], None))
    parts.append(
        '<p class="note">At every step the traced x<sub>t</sub> is denoised twice: with the prompt, and with one word swapped for '
        "a contrasting value of its kind (another colour, the other size, the opposite relation; removed where it has none). "
        f"The effect is the mean squared difference of the two x0 predictions ({e(onset.onset.space)}); the onset is the first "
        f"step whose effect reaches {onset.onset.threshold:g} × the word's largest. Attention shares (above) say where a word is "
        "looked for; this says when editing it changes what the model predicts.</p>"
    )
    parts.append(_img(report, "onset.png", embed, alt="causal onset curves"))
    parts.append("<table><tr><th>word</th><th>edit</th><th>onset step</th><th>peak step</th><th>largest effect</th><th>edited prompt</th></tr>")
    for row in onset.table():
        parts.append(
            f"<tr><td>{e(row['word'])}</td><td>{e(row['edit'])}</td><td class=num>{row['onset_step']}</td>"
            f"<td class=num>{row['peak_step']}</td><td class=num>{row['largest_effect']:.3g}</td><td>{e(row['edited_prompt'])}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f'<p class="note">{len(onset.edits)} words × {onset.onset.effect.shape[1]} steps, one guided evaluation each; {onset.seconds:.1f} s.</p>')
    return parts


def _method_html(method, files, report, embed) -> list[str]:
    e = html.escape
    slug = _slug(method.method)
    parts = [f'<h2 id="{slug}-step{method.step}">{e(method.method)} at step {method.step}</h2>']
    good = False if False in (method.beats_random, method.sanity) else True if method.beats_random and method.sanity else None
    parts.append(_verdict_html(method.verdict_lines(), good))
    parts.append(f'<p class="note">{e(method.caption)}</p>')
    parts.append(_img(report, files["maps"], embed, alt=f"{method.method} map"))
    if "games" in files:
        parts.append(_img(report, files["games"], embed, alt=f"{method.method} insertion and deletion games"))
        parts.append("<table><tr><th>game</th><th>AUC (map)</th><th>AUC (random map)</th><th>better is</th><th>beats random</th></tr>")
        for g in method.games:
            verdict = {True: "yes", False: "no", None: "—"}[g.beats_random]
            parts.append(f"<tr><td>{e(g.mode)} ({e(g.space)})</td><td class=num>{g.auc:.4g}</td><td class=num>{g.random_auc:.4g}</td>"
                         f"<td>{'lower' if g.mode == 'insertion' else 'higher'}</td><td>{verdict}</td></tr>")
        parts.append("</table>")
    settings = ", ".join(f"{k} = {v}" for k, v in method.settings.items())
    parts.append(f'<p class="note">Settings: {e(settings)} (from explain.methods.defaults unless changed); {method.seconds:.1f} s.</p>')
    return parts
