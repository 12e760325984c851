"""Make docs/gradio_app.png: the running app with a real result of the embedded model.

    python scripts/gradio_screenshot.py [--out docs/gradio_app.png] [--tab Words]

Launches the app, drives Debian's Chromium with Playwright (headless): generates the default
prompt, opens a tab and saves a full-page screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "gradio_app.png"))
    parser.add_argument("--tab", default="Words", help="the explanation tab to show (Steps, Words, Concepts, Recovery (R1))")
    parser.add_argument("--prompt", default="a large red circle above a small blue square")
    parser.add_argument("--seed", default="1", help="seed (1 draws the default prompt right with the current weights)")
    parser.add_argument("--word", default="red", help="the word chip to select on the Words tab")
    parser.add_argument("--steps", default="0:6", help="the Words tab's step range, FROM:TO")
    parser.add_argument("--rise", action="store_true", help="also run DF-RISE (its verdict shows on the DF-RISE tab)")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no system Chromium: apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    import gradio_app as app  # MODELS and build_app, as the Space entry has them

    app.MODELS.get("embedded")
    demo = app.build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#seed input").fill(args.seed)
            page.locator("#generate").click()
            expect(page.locator("#summary")).to_contain_text(args.prompt, timeout=300_000)
            page.get_by_role("tab", name=args.tab).click()
            if args.tab == "Words":
                expect(page.locator("#word-heatmap img")).to_be_visible(timeout=60_000)
                first, last = args.steps.split(":")
                # the one range control: the upper thumb first, so the lower one never passes it
                page.locator("#step-range input.hi").fill(last)
                page.locator("#step-range input.lo").fill(first)
                page.locator("#word-chips").get_by_text(args.word, exact=True).click()
                expect(page.get_by_text(f"'{args.word}', steps {first}-{last}")).to_be_visible(timeout=60_000)
            if args.tab == "DF-RISE" or args.rise:
                page.get_by_role("tab", name="DF-RISE").click()
                page.locator("#run-rise").click()
                expect(page.locator("#rise-verdict")).to_contain_text("beats random", timeout=300_000)
            shown = {"Steps": "#x0 img", "Recovery (R1)": "#recovery-grid img", "Concepts": "#concept-plot svg", "DF-RISE": "#rise-map img"}
            if args.tab in shown:
                expect(page.locator(shown[args.tab]).first).to_be_visible(timeout=60_000)
            page.wait_for_timeout(1500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(args.out)


if __name__ == "__main__":
    main()
