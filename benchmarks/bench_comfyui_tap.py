"""Cost of the ComfyUI Tap: KSampler on the tapped model vs the same model untapped.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfyui_tap.py [--size 128] [--steps 10] [--repeats 3]

Runs headless ComfyUI (as the integration tests do) with the tests' tiny random-weight SD1
checkpoint (SD1 widths, one block per level), so the figure is the tap's overhead on a small
UNet on this machine: attention capture, per-step copies of x_t and x0 to the CPU, and
building the trace. Prints the median seconds of each and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-cache", type=Path, default=Path(tempfile.gettempdir()) / "diffusion-explain-test-cache")
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("point --comfyui (or COMFYUI_PATH) at a ComfyUI checkout")
    from tests.nodes import comfyui_harness as harness

    work = Path(tempfile.mkdtemp(prefix="bench-tap-"))
    comfy_nodes = harness.bootstrap(Path(args.comfyui).resolve(), work)
    import torch

    args.checkpoint_cache.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint_cache / harness.CHECKPOINT_NAME
    if not checkpoint.exists():
        harness.build_tiny_sd1(checkpoint, Path(args.comfyui).resolve())
    (work / "checkpoints" / harness.CHECKPOINT_NAME).symlink_to(checkpoint)
    tap_node = harness.pack_module("nodes.tap_node")
    prompt = "a red circle above a blue square"
    with torch.inference_mode():
        model, clip, _ = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(harness.CHECKPOINT_NAME)[:3]
        positive = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        tapped, handle = tap_node.ExplainTap().tap(model, clip=clip, prompt=prompt, negative_prompt="blurry", unique_id="bench")
        side = args.size // 8
        latent = {"samples": torch.zeros(1, 4, side, side)}

        def sample(m):
            start = time.perf_counter()
            (out,) = comfy_nodes.common_ksampler(m, 1, args.steps, 5.0, "euler", "normal", positive, negative, latent, disable_noise=False)
            return time.perf_counter() - start, out

        sample(model)  # warm-up: loads the model
        plain, tap = [], []
        for _ in range(args.repeats):
            seconds, _ = sample(model)
            plain.append(seconds)
            seconds, out = sample(tapped)
            tap.append(seconds)
        trace = handle.resolve(out)
    p, t = statistics.median(plain), statistics.median(tap)
    print(f"image {args.size}x{args.size}, {args.steps} steps, cfg 5, {torch.get_num_threads()} CPU thread(s), tiny SD1 UNet")
    print(f"untapped KSampler: {p:.3f} s   tapped: {t:.3f} s   ratio {t / p:.2f}")
    print(f"trace: {trace.num_steps} steps, attention {tuple(trace.attention.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
