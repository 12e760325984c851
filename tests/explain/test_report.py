import json
import re
import shutil

import pytest
import torch

from explain import explanations, render, report as report_module
from explain.report import build_report, settings_rows, strict_json
from explain.trace import Trace

from tests.explain.synthetic import synthetic_trace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def strict_load(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's JSON.parse and most other parsers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def inline_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert match, "the page carries its explorer data inline"
    return strict_load(match.group(1))


def fake_method(trace, method="DF-RISE", step=2, insertion=(0.1, 0.3), deletion=(0.5, 0.2), sanity=(None, explanations.NOT_MEASURED)):
    fractions = [0.0, 0.5, 1.0]
    games = [
        explanations.Game("insertion", fractions, [1.0, 0.4, 0.0], [1.0, 0.7, 0.0], insertion[0], insertion[1]),
        explanations.Game("deletion", fractions, [0.0, 0.8, 1.0], [0.0, 0.3, 1.0], deletion[0], deletion[1]),
    ]
    heat = torch.zeros(trace.image_size)
    heat[: heat.shape[0] // 2] = 1.0
    return explanations.MethodMap(
        method=method, method_id="df_rise", step=step, timestep=float(trace.timesteps[step]), heat=heat,
        saliency=torch.rand(trace.latent_size), settings={"n_masks": 64, "similarity": "structure"}, games=games,
        sanity=sanity[0], sanity_line=sanity[1], caption=f"{method} at step {step}: a test map", seconds=1.5,
    )


def test_report_writes_every_part_and_a_self_contained_page(tmp_path):
    tr = synthetic_trace(steps=6, negative=True)
    tr.prompts = ["a red circle above a blue square <b>"]  # markup in the prompt must be escaped
    messages = []
    rep = build_report(tr, tmp_path / "out", progress=messages.append, extra_settings={"generation seconds": 1.25})
    out = tmp_path / "out"
    for name in ("index.html", "final.png", "step_grid.png", "heatmaps.png", "concepts.png", "recovery.png",
                 "recovery_curves.png", "negative_heatmaps.png", "concepts.json", "recovery.json", "trace.safetensors"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 100
    words = sorted(p.name for p in (out / "words").iterdir())
    assert words == ["00_red.png", "01_circle.png", "02_above.png", "03_blue.png", "04_square.png"]  # "a" is skipped

    page = rep.html_path.read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "generation seconds" in page and "1.25" in page
    # self-contained: every picture is embedded, nothing is fetched from elsewhere
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page)
    assert "<link" not in page and "@import" not in page and "fetch(" not in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 7  # final, steps, words, concepts, R1 ×2, negative
    # the score table has one row per prompt word, duplicates included
    for label in ("red", "circle", "above", "a (2)", "blue", "square"):
        assert f"<td>{label}</td>" in page
    assert "Spearman" in page and "emergence" in page and "ours" in page
    assert messages[0].startswith("rendering") and "writing the HTML" in messages
    assert rep.seconds["total"] > 0

    scores = json.loads((out / "concepts.json").read_text())
    assert scores["labels"][:3] == ["a", "red", "circle"] and len(scores["share"]) == 6
    rec = json.loads((out / "recovery.json").read_text())
    assert rec["space"] == "latent" and len(rec["recovered_fraction"][0]) == 6
    again = Trace.load(out / "trace.safetensors")
    assert again.prompts == tr.prompts and again.num_steps == 6


def test_report_can_link_images_instead_of_embedding(tmp_path):
    rep = build_report(synthetic_trace(steps=3), tmp_path, embed_images=False, save_trace=False)
    page = rep.html_path.read_text()
    assert '<img src="step_grid.png"' in page and "data:image" not in page
    assert (tmp_path / "frames" / "x0_002.png").is_file() and "frames/x0_002.png" in page
    assert not (tmp_path / "trace.safetensors").exists()
    assert "negative_heatmaps.png" not in rep.files


def test_report_needs_attention(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.attention = None
    with pytest.raises(ValueError, match="no cross-attention, so there is nothing to explain"):
        build_report(tr, tmp_path)
    with pytest.raises(IndexError, match="item 2 is outside the batch"):
        build_report(synthetic_trace(steps=3), tmp_path, item=2)


def test_report_without_prompt_words_still_shows_steps_and_recovery(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.words = [[]]  # prompts given as embeddings: positions have no words
    rep = build_report(tr, tmp_path, save_trace=False)
    page = rep.html_path.read_text()
    assert "names no prompt words" in page
    assert "step_grid.png" in rep.files and "recovery.png" in rep.files
    assert "heatmaps.png" not in rep.files and "concepts.json" not in rep.files
    assert "attention" not in inline_data(page)


# ---------------------------------------------------------------------------- issue 16
def test_report_shows_the_traces_warnings_before_anything_else(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.meta["notes"] = ["the embedded model never saw 'grean' (in the prompt); their maps mean nothing", "words were cut off: <x>"]
    page = build_report(tr, tmp_path, save_trace=False).html_path.read_text()
    assert "never saw &#x27;grean&#x27;" in page and "cut off: &lt;x&gt;" in page
    assert page.index('id="notes"') < page.index('id="explorer"') < page.index("What is recovered")


def test_word_heatmaps_appear_once_in_even_rows_and_every_step_is_shown(tmp_path, monkeypatch):
    grids = []
    real = render.labeled_grid

    def spy(cells, *args, **kwargs):
        grids.append([sum(c is not None for c in row) for row in cells])
        return real(cells, *args, **kwargs)

    step_counts = []
    real_steps = render.step_grid
    monkeypatch.setattr(render, "labeled_grid", spy)
    monkeypatch.setattr(render, "step_grid", lambda trace, **kw: step_counts.append(render.pick_steps(trace.num_steps, kw.get("count"))) or real_steps(trace, **kw))
    tr = synthetic_trace(steps=20)
    rep = build_report(tr, tmp_path, save_trace=False, skip_words=())  # all 7 words
    page = rep.html_path.read_text()
    assert step_counts == [list(range(20))]  # the static grid shows all 20 steps
    assert len(inline_data(page)["frames"]["x0"]) == 20  # and the scrubber every step
    step_grid_rows, heat_rows = grids[0], grids[1]
    assert step_grid_rows == [10, 10, 10, 10]
    assert heat_rows == [7, 7, 7, 7]  # all steps + three thirds, every word in each row: nobody alone on a row
    assert page.count("words/") == 0 and page.count("heatmaps.png") == 1  # one heatmap figure, not also one per word


def test_settings_are_deduplicated_and_below_the_fold(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.meta.update(guidance_scale=7.5, guidance=7.5, schedule="uniform", lam=60, notes=["x"], height=32, width=32)
    rows = dict(settings_rows(tr))
    assert "guidance_scale" not in rows and rows["guidance"] == "7.5"
    assert "lam" not in rows and "λ" not in rows and "notes" not in rows
    assert rows["image size"] == "32×32 px" and "height" not in rows
    tr.meta["schedule"] = "early"
    assert dict(settings_rows(tr))["λ"] == "60"
    page = build_report(tr, tmp_path, save_trace=False).html_path.read_text()
    assert page.index('id="settings"') > page.index("Definitions") > page.index('id="explorer"')
    assert page.count("<td>guidance</td>") == 1


def test_every_json_the_report_writes_is_strict_even_for_a_diverged_run(tmp_path):
    tr = synthetic_trace(steps=4)
    tr.attention[1] = float("nan")  # an fp16 run that overflowed at one step
    tr.x0[1] = float("nan")
    method = fake_method(tr, insertion=(float("nan"), 0.3))
    rep = build_report(tr, tmp_path, save_trace=False, methods=[method])
    for name in ("concepts.json", "recovery.json", "methods.json"):
        strict_load((tmp_path / name).read_text())  # raises on a bare NaN
    assert "null" in (tmp_path / "recovery.json").read_text()  # the NaNs are there, as null
    inline_data(rep.html_path.read_text())
    assert strict_load(strict_json({"a": float("inf"), "b": [float("nan"), 1.5]})) == {"a": None, "b": [None, 1.5]}
    assert strict_load((tmp_path / "methods.json").read_text())[0]["games"][0]["auc"] is None


def test_df_rise_and_df_cam_sections_show_maps_games_and_verdicts(tmp_path):
    tr = synthetic_trace(steps=4)
    rise = fake_method(tr, "DF-RISE", 2)
    cam = fake_method(tr, "DF-CAM", 1, insertion=(0.4, 0.3), sanity=(True, "passes the sanity checks: yes — measured"))
    rep = build_report(tr, tmp_path, save_trace=False, methods=[rise, cam])
    page = rep.html_path.read_text()
    assert "DF-RISE at step 2" in page and "DF-CAM at step 1" in page
    assert "beats random: yes" in page and "passes the sanity checks: not measured for this model" in page
    assert "beats random: no" in page and "passes the sanity checks: yes" in page
    assert {"df-rise_step2.png", "df-rise_step2_games.png", "df-cam_step1.png", "df-cam_step1_games.png"} <= set(rep.files)
    assert [m["method"] for m in json.loads((tmp_path / "methods.json").read_text())] == ["DF-RISE", "DF-CAM"]


def test_the_page_works_without_javascript_and_prints_the_static_figures(tmp_path):
    page = build_report(synthetic_trace(steps=3), tmp_path, save_trace=False).html_path.read_text()
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert ".interactive{display:none}" in css and "html.js .static{display:none}" in css  # no JS: the static figures
    assert re.search(r"@media print\{[^@]*\.interactive\{display:none!important\}", css)  # printed: the static figures
    static = page[page.index('<div class="static">') :]
    assert "step_grid" in static[: static.index("</div>\n")] or 'alt="step grid"' in static


@pytest.mark.browser
def test_browser_interactive_report_scrubs_selects_words_and_ranks_them_under_the_pointer(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no system Chromium: apt-get install chromium (Playwright's own browser download is not used)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -r requirements-dev.txt")
    sync_api.expect.set_options(timeout=20_000)  # the machine is shared: give each check time
    tr = synthetic_trace(steps=6)
    tr.x0_previews = torch.zeros(6, 1, 32, 32, 3, dtype=torch.uint8)
    for s in range(6):
        tr.x0_previews[s, ..., 0] = 40 * s  # red channel encodes the step
    rep = build_report(tr, tmp_path / "r", save_trace=False, methods=[fake_method(tr)])
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors, requests = [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(rep.html_path.as_uri())
            expect = sync_api.expect
            expect(page.locator("#explorer")).to_be_visible()
            expect(page.locator(".static").first).to_be_hidden()
            expect(page.locator("#step-label")).to_contain_text("step 5 of 5")

            # scrub: the keyboard moves the slider, the label and x0 follow
            page.locator("#step").focus()
            for _ in range(3):
                page.keyboard.press("ArrowLeft")
            expect(page.locator("#step-label")).to_contain_text("step 2 of 5")
            red = page.evaluate("""() => { const img = document.getElementById('x-0'); const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                return g.getImageData(3, 3, 1, 1).data[0]; }""")
            assert red == 80  # x0 of step 2

            # select a word: its button is marked and the heatmap says so
            page.locator(".word-btn", has_text="blue").click()
            expect(page.locator(".word-btn.active")).to_have_text("blue")
            expect(page.locator("#heat")).to_have_attribute("data-word", "blue")
            expect(page.locator("#heat")).to_have_attribute("data-step", "2")

            # hover: the words that attend there come first
            box = page.locator("#heat").bounding_box()
            page.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.8 * box["height"])
            first = page.locator("#ranking .rank-item").first
            expect(first).to_have_attribute("data-word", re.compile("blue|square"))
            page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.2 * box["height"])
            expect(first).to_have_attribute("data-word", re.compile("red|circle"))

            # the concept chart draws one line per word and a step cursor; play advances the step
            assert page.locator("#concept-chart polyline").count() == 5
            ticks = page.locator("#concept-chart .xtick").evaluate_all("els => els.map(e => e.textContent)")
            assert ticks and all(t.isdigit() for t in ticks)
            page.locator("#play").click()
            expect(page.locator("#step-label")).to_contain_text("step 5 of 5")  # played on from step 2 to the end
            expect(page.locator("#play")).to_have_text("▶ play")
            expect(page.locator("#df-rise-step2")).to_be_visible()
            page.screenshot(path=str(shot), full_page=True)

            # printed, the page shows the static figures instead of the explorer
            page.emulate_media(media="print")
            expect(page.locator("#explorer")).to_be_hidden()
            expect(page.locator(".static").first).to_be_visible()
            assert not errors, errors
            assert all(u.startswith(("file:", "data:")) for u in requests), requests

            # a trace without prompt words: the scrubber still works, the word parts are hidden
            tr.words = [[]]
            wordless = build_report(tr, tmp_path / "wordless", save_trace=False)
            other = browser.new_page()
            other.on("pageerror", lambda exc: errors.append(str(exc)))
            other.goto(wordless.html_path.as_uri())
            expect(other.locator("#step-label")).to_contain_text("step 5 of 5")
            expect(other.locator("#word-panel")).to_be_hidden()
            expect(other.locator("#concept-part")).to_be_hidden()
            assert not errors, errors

            # without JavaScript: the static figures
            plain = browser.new_context(java_script_enabled=False).new_page()
            plain.goto(rep.html_path.as_uri())
            expect(plain.locator("#explorer")).to_be_hidden()
            expect(plain.locator('img[alt="step grid"]')).to_be_visible()
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
