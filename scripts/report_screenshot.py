"""Make docs/report_interactive.png: the interactive HTML report of the embedded model, opened
from disk in headless Chromium, scrubbed to a step, a word picked and a pixel hovered.

    python scripts/report_screenshot.py [--out docs/report_interactive.png] [--step 6] [--word red]
                                        [--rise]   # also DF-RISE at the middle step

Runs ``python -m explain report`` (the README's quick start) into a temporary folder, then
drives Debian's Chromium with Playwright; prints the report's build time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "report_interactive.png"))
    parser.add_argument("--prompt", default="a large red circle above a small blue square")
    parser.add_argument("--seed", default="1")
    parser.add_argument("--step", type=int, default=6, help="the step the scrubber is moved to")
    parser.add_argument("--word", default="red", help="the word picked in the explorer")
    parser.add_argument("--rise", action="store_true", help="include DF-RISE (--rise) in the report")
    parser.add_argument("--keep", default=None, help="keep the report in this folder")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no system Chromium: apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-shot-"))
    cmd = [sys.executable, "-m", "explain", "report", args.prompt, "--seed", args.seed, "--out", str(folder)] + (["--rise"] if args.rise else [])
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr)
    print([line for line in run.stderr.splitlines() if "report written" in line][-1])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1240, "height": 1100})
        page.goto((folder / "index.html").as_uri())
        expect(page.locator("#explorer")).to_be_visible()
        page.locator("#step").fill(str(args.step))
        page.locator(".word-btn", has_text=args.word).first.click()
        expect(page.locator("#heat")).to_have_attribute("data-step", str(args.step))
        box = page.locator("#heat").bounding_box()
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.3 * box["height"])
        expect(page.locator("#ranking .rank-item").first).to_be_visible()
        page.wait_for_timeout(300)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=False)
        browser.close()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
