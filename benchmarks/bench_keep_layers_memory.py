"""What per-layer maps (``keep_layers``) cost in memory, before and after issue 19, in one run.

    python benchmarks/bench_keep_layers_memory.py                  # CPU: SD1.5-shaped random UNet, widths / 4, 256 px, 4 steps
    python benchmarks/bench_keep_layers_memory.py --device cuda    # full SD1.5 widths, 512 px, 50 steps, float16

Part 1 runs an SD1.5-shaped random-weight UNet (`sd15_random.random_unet`) in a diffusers
pipeline under the tap, with random 77-token contexts (full context, as with ``full_context``
or prompt embeddings) and classifier-free guidance, and prints for each storage the formula
(`explain.memory`) beside the bytes measured:

* **before**: every row of the model batch in float32, held on the model's device for the whole
  run, then the conditional rows copied into the trace in float32. Measured by feeding a
  `StepAccumulator` configured as the tap used to (``keep_layers=True``, no row, dtype or device
  options) the very probabilities the capture processors report, and by a run with
  ``layer_dtype=torch.float32`` (the old trace's bytes);
* **after**: the conditional rows as float16, moved to the CPU at each step's end; measured from
  the trace and, for what the device holds, the largest step's pending per-layer maps right
  before the step ends (on a CPU run: held until the step ends). With ``--device cuda`` the
  allocator's peak over the run is printed too (keep_layers off, on, and before).

Part 2 extrapolates the formula to Stable Diffusion 1.5 at 512² (50 steps), SDXL at 1024² (50
steps) with the full 77-token context, and FLUX.1-dev at 1024² (28 steps, 512 T5 tokens,
guidance-distilled: one branch); the layer grids come from the families' own reading of the
published configs, built on the meta device (no weights).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from explain.memory import MapShapes, estimate_memory, legacy_layer_bytes, mb  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


# ---------------------------------------------------------------------------- part 1: measured
def build_pipeline(device: str, dtype: torch.dtype, div: int, latent: int):
    from sd15_random import random_unet

    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("euler")  # tiny VAE and text encoder; the contexts are given as embeddings
    pipe.unet = random_unet(device, dtype, channels_div=div, latent=latent)
    return pipe.to(device=device, dtype=dtype)


def measured_run(pipe, args, latent: int, legacy: bool = False, **tap_options):
    """One traced generation; returns (trace, estimate, largest pending per-layer bytes at a step
    end, bytes the old storage held, CUDA peak over the run or None)."""
    from explain.adapters.diffusers import trace
    from explain.adapters.diffusers.tap import DiffusersTap
    from explain.attention import StepAccumulator

    device = torch.device(args.device)
    dim = pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, dim, generator=g).to(device, pipe.unet.dtype)
    uncond = torch.randn(1, 77, dim, generator=g).to(device, pipe.unet.dtype)
    pending, old = [], {}
    end_step = StepAccumulator.end_step
    record = DiffusersTap._record_attention

    def watched_end_step(acc):
        if acc is not old.get("acc"):  # the tap's accumulators, not the stand-in for the old storage
            pending.append(acc.pending_layer_bytes())
        return end_step(acc)

    def record_too(tap, name, probs, grid, kind="attention"):
        # the old storage: every row, float32, on the device, over the positions the sums keep
        if legacy and kind == "attention" and tap._run is not None and tap._run.current is not None:
            if "acc" not in old:
                old["acc"] = StepAccumulator(latent_size=tap._run.latent_size, tokens=sum(tap._run.kept), keep_layers=True)
            old["acc"].add(name, probs, grid)
        return record(tap, name, probs, grid, kind)

    def step_end(pipeline, index, timestep, callback_kwargs):
        if "acc" in old:
            old["acc"].end_step()
        return callback_kwargs

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with mock.patch.object(StepAccumulator, "end_step", watched_end_step), mock.patch.object(DiffusersTap, "_record_attention", record_too):
        with trace(pipe, previews=False, **tap_options) as tap:
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps, guidance_scale=7.5,
                 height=latent * pipe.vae_scale_factor, width=latent * pipe.vae_scale_factor, output_type="latent",
                 generator=torch.Generator().manual_seed(1), callback_on_step_end=step_end)
            old_bytes = old["acc"].held_layer_bytes() if "acc" in old else None
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return tap.trace, tap.memory_estimate, max(pending, default=0), old_bytes, peak


def part_one(args) -> None:
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    latent = args.size // 2  # the tiny VAE halves the image
    pipe = build_pipeline(args.device, dtype, args.div, latent)
    width = "" if args.div == 1 else f", widths / {args.div}"
    print(f"1. SD1.5-shaped random UNet{width}, latent {latent}² (as SD1.5 at {latent * 8} px), {args.steps} steps, "
          f"guidance 7.5, full 77-token context, {args.device} {args.dtype}")
    after, estimate, pending, old_device, peak_new = measured_run(pipe, args, latent, legacy=True, keep_layers=True,
                                                                  memory_budget_mb=args.budget)
    full, _, _, _, _ = measured_run(pipe, args, latent, keep_layers=True, layer_dtype=torch.float32)
    coarse, coarse_estimate, _, _, _ = measured_run(pipe, args, latent, keep_layers="resolution")
    plain, plain_estimate, _, _, peak_plain = measured_run(pipe, args, latent, keep_layers=False, memory_budget_mb=1e9)
    shapes = estimate.shapes
    legacy = legacy_layer_bytes(shapes, guided=True)
    layer_bytes = lambda t: sum(m.nbytes for m in t.attention_layers.values())  # noqa: E731
    grids = Counter(shapes.layer_grids.values())
    print(f"   {len(shapes.layer_grids)} cross-attention layers: " + ", ".join(f"{n} at {h}×{w}" for (h, w), n in sorted(grids.items(), reverse=True)))
    rows = [
        ("before: per-layer maps on the device during the run (all rows, float32)", legacy["device"], old_device),
        ("before: per-layer maps in the trace (conditional rows, float32)", legacy["trace"], layer_bytes(full)),
        ("after:  per-layer maps in the trace (conditional rows, float16, on the CPU)", estimate.layers, layer_bytes(after)),
        ("after:  per-layer maps on the device at once (one step, float32; held until the step ends)", estimate.layers_device, pending),
        ("keep_layers='resolution': maps in the trace (float16)", coarse_estimate.layers, layer_bytes(coarse)),
        ("no layers: mean maps in the trace (attention + attention_negative, float32)", plain_estimate.maps,
         plain.attention.nbytes + plain.attention_negative.nbytes),
    ]
    print(f"   {'':88s} {'formula':>10s} {'measured':>10s}")
    for label, formula, measured in rows:
        print(f"   {label:88s} {mb(formula):>7s} MB {mb(measured) if measured is not None else '-':>7s} MB")
    total_before, total_after = legacy["device"] + legacy["trace"], estimate.layers_device + estimate.layers
    print(f"   per-layer maps, device + host: before {mb(total_before)} MB, after {mb(total_after)} MB "
          f"({total_before / total_after:.1f}× less); in the trace alone {legacy['trace'] / estimate.layers:.1f}× less")
    if peak_new is not None:
        print(f"   CUDA allocator peak over the run: keep_layers=False {mb(peak_plain)} MB, keep_layers=True {mb(peak_new)} MB "
              f"(this run also fed the old storage: {mb(old_device)} MB of it)")
    print(f"   estimate printed by the tap: {estimate.describe()}")


# ---------------------------------------------------------------------------- part 2: extrapolated
def model_grids(kind: str, latent: int) -> dict[str, tuple[int, int]]:
    """The families' layer grids for a full-size config, built on the meta device."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from sd15_random import SD15_UNET

    from explain.adapters.diffusers.families import flux, unet

    with torch.device("meta"):
        if kind == "flux":
            family, pipe = flux.FAMILY, SimpleNamespace(transformer=FluxTransformer2DModel(**FLUX_DEV))
        else:
            config = SD15_UNET if kind == "sd15" else SDXL_UNET
            family, pipe = unet.FAMILY, SimpleNamespace(unet=UNet2DConditionModel(**config))
    undo = family.install_capture(pipe, lambda *a: None)
    try:
        return family.layer_grids(pipe, (latent, latent))
    finally:
        for u in reversed(undo):
            u()


def part_two() -> None:
    print("\n2. Extrapolated by the formula (one image; per-layer maps as float16 after, float32 before)")
    cases = [
        ("SD1.5 512², 50 steps, 77 tokens, CFG", "sd15", 64, 50, 77, True),
        ("SDXL 1024², 50 steps, 77 tokens, CFG", "sdxl", 128, 50, 77, True),
        ("FLUX.1-dev 1024², 28 steps, 512 T5 tokens", "flux", 128, 28, 512, False),
    ]
    header = ("model", "no layers", "before: device", "before: trace", "after: device", "after: trace", "'resolution'")
    print("   " + f"{header[0]:44s}" + "".join(f"{h:>16s}" for h in header[1:]))
    for label, kind, latent, steps, tokens, guided in cases:
        grids = model_grids(kind, latent)
        shapes = MapShapes(latent_size=(latent, latent), layer_grids=grids, steps=steps, images=1, tokens=tokens,
                           negative_tokens=tokens if guided else 0, keep_layers=True)
        after = estimate_memory(shapes)
        coarse = estimate_memory(replace(shapes, keep_layers="resolution"))
        legacy = legacy_layer_bytes(shapes, guided)
        cells = [after.maps, legacy["device"], legacy["trace"], after.layers_device, after.layers, coarse.layers]
        print("   " + f"{label:44s}" + "".join(f"{_gb(c):>16s}" for c in cells))
        print(f"   {'':44s}  {len(grids)} layers; the run's per-step sums on the device: {_gb(after.maps_device)}")
    print("   no layers = the trace's mean maps (attention + attention_negative, float32); device = what the per-layer "
          "maps keep on the model's device (before: all of them until the trace is built; after: one step)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--div", type=int, default=None, help="divide every UNet width (default 4 on the CPU, 1 on CUDA)")
    parser.add_argument("--size", type=int, default=None, help="image side in px through the tiny VAE (latent = size / 2; default 64 CPU, 128 CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="default 4 on the CPU, 50 on CUDA")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--budget", type=float, default=None, help="memory_budget_mb for the measured keep_layers run")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    args.div = args.div or (1 if cuda else 4)
    args.size = args.size or (128 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 4)
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    torch.set_num_threads(1)
    part_one(args)
    part_two()


if __name__ == "__main__":
    main()
