"""Screenshot the example workflows running in the real ComfyUI front end (docs/comfyui_*.png).

    COMFYUI_PATH=/path/to/ComfyUI python scripts/comfyui_screenshot.py [--run] [--dit flux-schnell|sd3]

Starts ComfyUI (``--cpu``) on a free port with this repository linked as a custom node pack and
the integration tests' tiny random-weight SD1 checkpoint (built on first use), opens the
front end in headless Chromium (Playwright; Debian's ``/usr/bin/chromium`` by default), loads
each workflow with ``app.loadGraphData``, optionally queues it (``--run``: every node then shows
its preview, on random weights, so the pictures show the layout, not a model's quality) and
saves a screenshot. Needs the ``comfyui-frontend-package`` ComfyUI pins. ``--dit`` shows a
joint-attention graph instead, on the integration tests' tiny random-weight Flux or SD3 model (its
test loader node is registered in this server only).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Where spandrel (which needs torchvision) is missing, ComfyUI skips UpscaleModelLoader, and the
# front end (1.27) breaks on every combo widget without it. Screenshot environment only.
UPSCALE_STUB = '''
class UpscaleModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (["none"],)}}
    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load"
    CATEGORY = "loaders"
    def load(self, model_name):
        raise RuntimeError("placeholder for the screenshot front end")
NODE_CLASS_MAPPINGS = {"UpscaleModelLoader": UpscaleModelLoader}
'''

SERVER = '''
import sys, types, runpy, os
sys.path.insert(0, {comfyui!r})
import transformers
from transformers import CLIPTextModel
try:
    import torchvision
except Exception:
    tv = types.ModuleType("torchvision"); tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules["torchvision"] = tv; sys.modules["torchvision.transforms"] = tv.transforms
sys.argv = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", "{port}", "--disable-auto-launch",
            "--extra-model-paths-config", {extra!r}, "--output-directory", {out!r}, "--temp-directory", {tmp!r},
            "--input-directory", {inp!r}]
os.chdir({comfyui!r})
runpy.run_path("main.py", run_name="__main__")
'''

# What the screenshots run (small enough for a CPU): 64×64, 6 steps, 16 DF-RISE masks.
SMALL = {
    "CheckpointLoaderSimple": {0: "tiny-sd1.safetensors"},
    "EmptyLatentImage": {0: 64, 1: 64},
    "KSampler": {2: 6},
    "DiffusionExplainRise": {0: 3, 1: 16},
    "DiffusionExplainCam": {0: 3},
    "DiffusionExplainExponentialSigmas": {0: 6, 2: 3},
}


# A joint-attention (DiT) graph: the integration tests' tiny random-weight Flux / SD3 models (built
# with ComfyUI's own classes) through their test loader node, registered only in this server.
DIT_STUB = '''
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import comfyui_dit_models
comfyui_dit_models.TinyDiTLoader.FAMILIES = [{family!r}] + [f for f in comfyui_dit_models.TinyDiTLoader.FAMILIES if f != {family!r}]
NODE_CLASS_MAPPINGS = {{"ExplainTestTinyDiT": comfyui_dit_models.TinyDiTLoader}}
NODE_DISPLAY_NAME_MAPPINGS = {{"ExplainTestTinyDiT": "TEST: tiny random-weight DiT"}}
'''
DIT_FAMILIES = ("flux-schnell", "sd3")


def dit_workflow(family: str) -> dict:
    """Tiny ``family`` DiT → Explain Tap → KSampler → every explanation node (UI format), laid out
    as the txt2img example, at the screenshot size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example_workflows", REPO / "scripts" / "make_example_workflows.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.STOCK["ExplainTestTinyDiT"] = ([], ["family", "with_t5"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    maker.STOCK["EmptySD3LatentImage"] = ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")])
    wf = maker.Workflow()
    loader = wf.add("ExplainTestTinyDiT", (0, 0), {"family": family, "with_t5": True}, size=(320, 100), title=f"TEST: tiny {family}")
    loader, positive, negative, tap = maker._prompting(wf, loader, "a red circle above a blue square", "blurry")
    latent = wf.add("EmptySD3LatentImage", (360, 460), {"width": 64, "height": 64, "batch_size": 1}, size=(300, 110))
    sampler_widgets = {"seed": 42, "steps": 6, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    maker.sample_and_explain(wf, loader, positive, negative, tap, latent, sampler_widgets, previews=6, step=3, n_masks=16, prefix="dit")
    return wf.to_json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"ComfyUI did not answer at {url}")


def screenshot(url: str, workflow: dict, path: Path, run: bool, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2700, "height": 1560})  # big enough that text stays drawn when the graph is fitted
        page.goto(url, wait_until="networkidle")
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        time.sleep(2)
        page.keyboard.press("Escape")  # the template browser opens on a fresh profile
        page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
        time.sleep(2)
        if run:
            page.evaluate("() => window.app.queuePrompt(0)")
            start = time.time()
            while time.time() - start < 900:
                queue = page.evaluate("async () => (await (await fetch('/queue')).json())")
                if time.time() - start > 5 and not queue["queue_running"] and not queue["queue_pending"]:
                    break
                time.sleep(3)
            time.sleep(3)
        page.mouse.click(1350, 1540)
        page.keyboard.press(".")  # fit the graph to the window
        time.sleep(2)
        page.screenshot(path=str(path))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    parser.add_argument("--run", action="store_true", help="queue each workflow before the screenshot")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--checkpoint-cache", type=Path, default=Path(tempfile.gettempdir()) / "diffusion-explain-test-cache")
    parser.add_argument("--dit", default="", help=f"screenshot a DiT graph instead (one of {', '.join(DIT_FAMILIES)}) on the tests' tiny model")
    args = parser.parse_args()
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        parser.error("point --comfyui (or COMFYUI_PATH) at a ComfyUI checkout")
    comfyui = Path(args.comfyui).resolve()
    work = Path(tempfile.mkdtemp(prefix="comfyui-shot-"))
    for sub in ("custom_nodes", "checkpoints", "output", "temp", "input"):
        (work / sub).mkdir()
    (work / "custom_nodes" / "diffusion-explain").symlink_to(REPO, target_is_directory=True)
    (work / "custom_nodes" / "upscale_stub.py").write_text(UPSCALE_STUB)
    if args.dit:
        if args.dit not in DIT_FAMILIES:
            parser.error(f"--dit must be one of {', '.join(DIT_FAMILIES)}")
        stub = DIT_STUB.format(repo=str(REPO), tests=str(REPO / "tests" / "nodes"), family=args.dit)
        (work / "custom_nodes" / "tiny_dit_stub.py").write_text(stub)
    args.checkpoint_cache.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint_cache / "tiny-sd1-explain-test-v1.safetensors"
    if not checkpoint.exists():
        subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(comfyui)!r}]; sys.argv = ['x', '--cpu']\n"
             "from tests.nodes.comfyui_harness import bootstrap, build_tiny_sd1\n"
             f"from pathlib import Path; bootstrap(Path({str(comfyui)!r}), Path({str(work / 'build')!r}))\n"
             f"build_tiny_sd1(Path({str(checkpoint)!r}), Path({str(comfyui)!r}))"],
            check=True,
        )  # fmt: skip
    (work / "checkpoints" / "tiny-sd1.safetensors").symlink_to(checkpoint)
    (work / "extra.yaml").write_text(f"shot:\n  base_path: {work}\n  checkpoints: checkpoints\n  custom_nodes: custom_nodes\n")
    port = free_port()
    server_py = work / "server.py"
    server_py.write_text(SERVER.format(comfyui=str(comfyui), port=port, extra=str(work / "extra.yaml"),
                                       out=str(work / "output"), tmp=str(work / "temp"), inp=str(work / "input")))  # fmt: skip
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(server_py)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/object_info/DiffusionExplainTap", 300)
        args.out.mkdir(parents=True, exist_ok=True)
        names = [f"dit_{args.dit.replace('-', '_')}_explain"] if args.dit else ["txt2img_explain", "sampler_custom_exponential_sigmas"]
        for name in names:
            if args.dit:
                workflow = dit_workflow(args.dit)
            else:
                workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
                for node in workflow["nodes"]:
                    for index, value in SMALL.get(node["type"], {}).items():
                        node["widgets_values"][index] = value
            target = args.out / f"comfyui_{name}.png"
            screenshot(f"http://127.0.0.1:{port}", workflow, target, args.run, args.chromium)
            print(target)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
