"""The HTML report: one self-contained page that explains one generation, with its PNGs, JSON
scores and the trace itself in the same folder.

`build_report(trace, out_dir)` writes

* ``index.html``: prompt, settings, final image, step grid, word heatmaps (whole run and
  early / middle / late thirds), concept curves and score table, the R1 recovery view and
  the definitions of every number shown; images are embedded (``data:`` URIs) so the file
  alone can be mailed or archived, and also saved next to it;
* ``final.png``, ``step_grid.png``, ``heatmaps.png``, ``heatmaps_by_step.png``,
  ``words/<n>_<word>.png`` (one overlay per word), ``concepts.png``, ``concepts_share.png``,
  ``recovery.png``, ``recovery_curves.png`` and ``negative_heatmaps.png`` when the trace
  has negative-prompt attention;
* ``concepts.json``, ``recovery.json``, ``trace.safetensors``.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from explain import render
from explain.methods import concepts, heatmaps, recovery
from explain.trace import Trace

FUNCTION_WORDS = ("a", "an", "the", "of", "and", ",", "on", "in", "at", "to", "is")
SETTING_ORDER = ("model", "pipeline", "scheduler", "steps", "guidance", "seed", "height", "width", "schedule", "lam", "prediction_type")


@dataclass
class Report:
    html_path: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.html_path.parent


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug or "word"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _content_words(trace: Trace, item: int, skip: Sequence[str], negative: bool = False) -> list:
    words = [w for w in heatmaps.prompt_words(trace, item, negative) if w.token_indices]
    kept = [w for w in words if w.text.lower() not in {s.lower() for s in skip}]
    return kept or words  # a prompt of only function words still gets its maps


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def build_report(
    trace: Trace,
    out_dir: str | Path,
    *,
    item: int = 0,
    skip_words: Sequence[str] = FUNCTION_WORDS,
    grid_steps: int = 8,
    recovery_steps: int = 6,
    tol: float = 0.25,
    overlay_mode: str = "paper",
    embed_images: bool = True,
    save_trace: bool = True,
    extra_settings: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Explain ``trace`` (batch item ``item``) into ``out_dir`` and return where everything is.

    ``skip_words`` are left out of the heatmap grids and curves (the score table keeps every
    word); ``extra_settings`` are shown with the trace's own settings (timings, say).
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
        report.seconds[name] = time.perf_counter() - start

    def save(name: str, image) -> Path:
        path = render.save_png(image, out / name)
        report.files[name] = path
        return path

    image = render.final_image(trace, item)
    factor = max(1, -(-256 // max(image.shape[:2])))  # small images are enlarged by whole pixels
    display = render.resize(image, (image.shape[0] * factor, image.shape[1] * factor), nearest=True)
    save("final.png", image)

    say("rendering the step grid")
    with timed("step grid"):
        save("step_grid.png", render.step_grid(trace, item=item, count=grid_steps))

    words = _content_words(trace, item, skip_words)
    word_files: list[tuple[str, str]] = []
    scores = None
    if words:
        say("computing word heatmaps")
        with timed("heatmaps"):
            word_files = _heatmap_figures(trace, item, words, image, display, overlay_mode, skip_words, save)
        say("scoring concepts")
        with timed("concepts"):
            scores = concepts.concept_scores(trace, item=item)
            (out / "concepts.json").write_text(json.dumps(scores.to_json(), indent=1))
            report.files["concepts.json"] = out / "concepts.json"
            shown = [w.text for w in words]
            picked = [j for j, label in enumerate(scores.labels) if label.split(" (")[0] in shown]
            plot_scores = _subset(scores, picked) if picked else scores
            save("concepts.png", render.concept_curves(plot_scores, "normalized", "concept curves: per-step min-max across prompt words (paper Fig. 9/11)"))
            save("concepts_share.png", render.concept_curves(plot_scores, "share", "share of the prompt words' attention"))
    else:
        say("the trace has no prompt words (embeddings without text?): no word heatmaps or concept scores")

    say("computing the recovery view (R1)")
    with timed("recovery"):
        space = "preview" if trace.x0_previews is not None else "latent"
        view = recovery.trace_recovery(trace, space=space, tol=tol)
        (out / "recovery.json").write_text(json.dumps(view.to_json(), indent=1))
        report.files["recovery.json"] = out / "recovery.json"
        save("recovery.png", render.recovery_grid(view, trace, item=item, count=recovery_steps))
        save("recovery_curves.png", render.recovery_curves(view, item=item))

    if save_trace:
        say("saving the trace")
        with timed("trace"):
            report.files["trace.safetensors"] = trace.save(out / "trace.safetensors")

    say("writing the HTML")
    with timed("html"):
        page = _page(trace, item, report, scores, view, word_files, extra_settings or {}, embed_images)
        report.html_path.write_text(page, encoding="utf-8")
    report.seconds["total"] = time.perf_counter() - t_all
    return report


def _heatmap_figures(trace, item, words, image, display, overlay_mode, skip_words, save) -> list[tuple[str, str]]:
    whole = heatmaps.word_heatmaps(trace, words, item=item)
    save("heatmaps.png", render.heatmap_grid(image, whole, mode=overlay_mode, columns=min(len(whole), 6), title="all steps"))
    thirds = heatmaps.step_thirds(trace.num_steps)
    by_range = [heatmaps.word_heatmaps(trace, words, steps=s, item=item) for _, s in thirds]
    save("heatmaps_by_step.png", render.heatmap_grid(image, by_range, row_labels=[label for label, _ in thirds], mode=overlay_mode))
    word_files = []
    for n, (label, heat) in enumerate(whole.items()):
        name = f"words/{n:02d}_{_slug(label)}.png"
        save(name, render.overlay(display, heat, overlay_mode))
        word_files.append((label, name))
    if trace.attention_negative is not None and item < len(trace.negative_words) and trace.negative_words[item]:
        negative_words = _content_words(trace, item, skip_words, negative=True)
        if negative_words:
            neg = heatmaps.word_heatmaps(trace, negative_words, item=item, negative=True)
            save("negative_heatmaps.png", render.heatmap_grid(image, neg, mode=overlay_mode, columns=min(len(neg), 6), title="negative prompt, all steps"))
    return word_files


def _subset(scores: concepts.ConceptScores, columns: list[int]) -> concepts.ConceptScores:
    pick = lambda xs: [xs[j] for j in columns]  # noqa: E731
    return concepts.ConceptScores(
        labels=pick(scores.labels),
        token_indices=pick(scores.token_indices),
        steps=scores.steps,
        timesteps=scores.timesteps,
        mass=scores.mass[:, columns],
        share=scores.share[:, columns],
        normalized=scores.normalized[:, columns],
        emergence_step=pick(scores.emergence_step),
        peak_step=pick(scores.peak_step),
        spearman_rho=pick(scores.spearman_rho),
        step_sum=pick(scores.step_sum),
        threshold=scores.threshold,
        persist=scores.persist,
        negative=scores.negative,
    )


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.prompt{font-size:1.2em;background:#f4f4f8;padding:.5em .8em;border-radius:6px}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%} img.pixel{image-rendering:pixelated;width:256px}
.words{display:flex;flex-wrap:wrap;gap:.8em} .words figure{margin:0;text-align:center;font-size:.85em}
.words img{width:160px;image-rendering:pixelated}
.note{color:#555;font-size:.9em} dt{font-weight:600;margin-top:.4em} dd{margin-left:1.2em}
"""


def _img(report: Report, name: str, embed: bool, css_class: str = "", alt: str = "") -> str:
    path = report.files[name]
    src = _data_uri(path) if embed else html.escape(name)
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img src="{src}" alt="{html.escape(alt or name)}"{cls}>'


def _settings_rows(trace: Trace, extra: dict) -> list[tuple[str, str]]:
    meta = dict(trace.meta)
    rows = [(k, _format(meta.pop(k))) for k in SETTING_ORDER if k in meta]
    rows += [(k, _format(v)) for k, v in sorted(meta.items()) if not isinstance(v, (dict, list)) or len(json.dumps(v)) < 200]
    rows.append(("latent size", f"{trace.latent_size[0]}×{trace.latent_size[1]}"))
    rows.append(("timesteps", ", ".join(f"{float(t):.0f}" for t in trace.timesteps)))
    rows += [(k, _format(v)) for k, v in extra.items()]
    return rows


def _page(trace, item, report, scores, view, word_files, extra, embed) -> str:
    e = html.escape
    prompt = trace.prompts[item]
    negative = trace.negative_prompts[item] if item < len(trace.negative_prompts) else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>diffusion-explain: {e(prompt)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>How the model made this image</h1>",
        f'<p class="prompt">{e(prompt)}</p>',
    ]
    if negative:
        parts.append(f'<p class="note">negative prompt: {e(negative)}</p>')
    parts.append('<div style="display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap">')
    parts.append(f"<div>{_img(report, 'final.png', embed, 'pixel', 'final image')}</div>")
    parts.append("<div><table><tr><th>setting</th><th>value</th></tr>")
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _settings_rows(trace, extra)]
    parts.append("</table></div></div>")

    parts.append("<h2>Denoising steps</h2>")
    parts.append(
        '<p class="note">Top: the noisy latent x<sub>t</sub> entering each step. Bottom: the model\'s prediction '
        "of the finished image (x0) at that step, what it \"thinks\" the image will be.</p>"
    )
    parts.append(_img(report, "step_grid.png", embed, alt="step grid"))

    if scores is None:
        parts.append("<h2>Words</h2>")
        parts.append('<p class="note">This trace names no prompt words (the prompt was given as embeddings), so there are no word heatmaps or concept scores.</p>')
    else:
        parts.append("<h2>Where each word is looked for</h2>")
        parts.append(
            '<p class="note">Cross-attention of each prompt word (conditional branch, mean over heads and layers, '
            "sub-word tokens averaged), averaged over the steps, upsampled to the image and min-max normalised; "
            "red = most attention. Overlay: (1 − m<sup>0.8</sup>)·image + m<sup>0.8</sup>·jet(m), as in the paper.</p>"
        )
        parts.append(_img(report, "heatmaps.png", embed, alt="word heatmaps"))
        parts.append('<div class="words">')
        for label, name in word_files:
            parts.append(f"<figure>{_img(report, name, embed, alt=label)}<figcaption>{e(label)}</figcaption></figure>")
        parts.append("</div>")
        parts.append("<h3>Early, middle and late steps</h3>")
        parts.append(_img(report, "heatmaps_by_step.png", embed, alt="word heatmaps by step range"))
        if "negative_heatmaps.png" in report.files:
            parts.append("<h3>Negative prompt</h3>")
            parts.append(_img(report, "negative_heatmaps.png", embed, alt="negative prompt heatmaps"))

        parts.append("<h2>Which concepts matter when</h2>")
        parts.append(_img(report, "concepts.png", embed, alt="concept curves, normalised"))
        parts.append(_img(report, "concepts_share.png", embed, alt="concept curves, share"))
        parts.append(
            "<table><tr><th>word</th><th>tokens</th><th>mean share</th><th>peak step</th><th>emergence step</th>"
            "<th>Spearman ρ (step, share)</th><th>Σ normalised</th></tr>"
        )
        for row in scores.table():
            rho = "—" if row["spearman_rho"] is None else f"{row['spearman_rho']:+.2f}"
            parts.append(
                f"<tr><td>{e(row['word'])}</td><td>{e(', '.join(map(str, row['tokens'])))}</td>"
                f"<td class=num>{row['mean_share']:.3f}</td><td class=num>{row['peak_step']}</td>"
                f"<td class=num>{row['emergence_step']}</td><td class=num>{rho}</td><td class=num>{row['step_sum']:.2f}</td></tr>"
            )
        parts.append("</table>")

    parts.append("<h2>What is recovered at each step (R1)</h2>")
    parts.append(
        f'<p class="note">Computed on the {"decoded x0 previews" if view.space == "preview" else "latents"}. '
        "Row 2: where this step changed the prediction. Row 3: green where the prediction already matches the "
        f"final image (mean absolute difference ≤ {view.tol} × the final's standard deviation). Bottom: the step from "
        "which each pixel stays matched.</p>"
    )
    parts.append(_img(report, "recovery.png", embed, alt="recovery view"))
    parts.append(_img(report, "recovery_curves.png", embed, alt="recovery curves"))

    parts.append("<h2>Definitions</h2><dl>")
    for key, text in (scores.definitions() if scores is not None else {}).items():
        parts.append(f"<dt>{e(key)}</dt><dd>{e(text)}</dd>")
    for key, text in view.to_json()["definitions"].items():
        parts.append(f"<dt>recovery: {e(key)}</dt><dd>{e(text)}</dd>")
    parts.append("</dl>")
    files = [n for n in report.files if not n.startswith("words/")] + ["index.html"]
    parts.append(f'<p class="note">Files in this folder: {e(", ".join(files))}. '
                 "Open the trace again with <code>python -m explain open trace.safetensors</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
