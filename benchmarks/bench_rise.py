#!/usr/bin/env python
"""DF-RISE speed: batched masks against a per-mask loop (the official approach), same N, one run.

    python benchmarks/bench_rise.py                        # embedded model on the CPU
    python benchmarks/bench_rise.py --device cuda          # random SD1.5-shaped UNet, 512² (64² latent), fp16
    python benchmarks/bench_rise.py --device cuda --dtype bf16 --masks 128
    python benchmarks/bench_rise.py --device cpu --sd15 --channels-div 8 --latent 16   # dry run of the GPU path

The per-mask loop runs the guided denoiser on one masked latent at a time ([uncond; cond], batch
2), as the official code; the batched run draws the same masks (same seed) and runs as many per
forward pass as the memory budget allows. Both accumulate the same map (their difference is
printed). FLOPs per mask are counted with ``torch.utils.flop_counter.FlopCounterMode``; the
matmul peak is measured in the same run with one large square matmul in the same dtype, and the
"FLOP floor" is FLOPs per mask / that peak.

Targets (issue 4): batched >= 10× the per-mask loop, and >= 60 % of the FLOP floor (on a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15_random as sd  # noqa: E402

from explain.denoiser import NoiseLevel  # noqa: E402
from explain.methods.rise import df_rise  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def embedded_setup(steps: int, step: int):
    """The embedded model and a trace of its default prompt (the tiny random pipeline, with a
    note, when the weights are missing)."""
    from explain import embedded
    from explain.adapters.diffusers import from_pipeline, generate

    if embedded.is_available():
        pipe = embedded.load_pipeline(device="cpu")
        name, guidance = "embedded shapes-64", embedded.DEFAULT_GUIDANCE
    else:
        from explain.testing import tiny_sd_pipeline

        print("note: the embedded model's weights are not there; using the tiny random pipeline")
        pipe, name, guidance = tiny_sd_pipeline(), "tiny random SD", 5.0
    trace, _ = generate(pipe, embedded.DEFAULT_PROMPT, steps=steps, guidance=guidance, seed=0, previews=False)
    return name, pipe.unet, from_pipeline(pipe, trace), trace


def bench(device, dtype, args) -> None:
    n = args.masks or (96 if device.type == "cuda" else 48)

    if device.type == "cuda" or args.sd15:
        unet, denoiser, trace = sd.random_setup(device, dtype, args.latent, args.channels_div)
        name, step = f"random SD1.5-shaped UNet, latent {args.latent}² (image {args.latent * 8}²)" + (
            f", widths / {args.channels_div}" if args.channels_div > 1 else ""
        ), 0
    else:
        name, unet, denoiser, trace = embedded_setup(20, 14)
        step = 14
    level = NoiseLevel.from_trace(trace, step)
    x = trace.x_t[step, 0].to(device)
    batch = args.batch or denoiser.batch_size_for(x, limit=min(n, 32))  # 64 UNet rows fill a GPU

    flops_per_mask = sd.count_flops(lambda: denoiser.predict(x[None], level, "epsilon"))
    peak = sd.matmul_peak(device, dtype)

    def run(batch_size):
        return df_rise(denoiser, trace, step, n_masks=n, batch_size=batch_size, similarity=args.similarity, quantity="epsilon", seed=0)

    # warm-up both shapes (cuDNN autotuning, allocator) on a few masks
    df_rise(denoiser, trace, step, n_masks=min(n, batch), batch_size=batch, similarity=args.similarity)
    df_rise(denoiser, trace, step, n_masks=2, batch_size=1, similarity=args.similarity)
    results = {}
    loop_s = sd.timed(lambda: results.__setitem__("loop", run(1)), device)
    batched_s = sd.timed(lambda: results.__setitem__("batched", run(batch)), device, repeats=2)
    diff = float((results["loop"].saliency - results["batched"].saliency).abs().max())
    scale = float(results["loop"].saliency.abs().max())

    loop_ms, batched_ms = 1000 * loop_s / n, 1000 * batched_s / n
    floor_ms = 1000 * flops_per_mask / peak
    print(f"DF-RISE speed | {name} | {device.type} {str(dtype).replace('torch.', '')} | N = {n} masks, CFG batch of 2 per mask")
    print(f"  per-mask loop (official)   {loop_ms:9.2f} ms/mask")
    print(f"  batched ({batch:4d} per pass)   {batched_ms:9.2f} ms/mask   speed-up {loop_s / batched_s:6.1f}x   (target >= 10x)")
    print(f"  FLOPs per mask             {flops_per_mask / 1e9:9.2f} GFLOP   matmul peak {peak / 1e12:7.2f} TFLOP/s (measured, {str(dtype).replace('torch.', '')})")
    print(
        f"  FLOP floor                 {floor_ms:9.3f} ms/mask   batched reaches {100 * floor_ms / batched_ms:5.1f} % of it, "
        f"the loop {100 * floor_ms / loop_ms:5.1f} %   (target >= 60 %)"
    )
    print(f"  same map either way: max |loop - batched| = {diff:.2e} (map scale {scale:.2e})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32, or several separated by commas (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--masks", type=int, default=None, help="N, the same for both runs (default 48 on cpu, 96 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="masks per forward pass (default: from the memory budget, at most 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sd15", action="store_true", help="random SD1.5-shaped UNet (the default on cuda)")
    p.add_argument("--latent", type=int, default=64, help="latent side of the SD1.5-shaped UNet (64 = 512² images)")
    p.add_argument("--channels-div", type=int, default=1, help="shrink the SD1.5 widths (dry runs on a CPU)")
    p.add_argument("--similarity", default="structure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = sd.prepare_device(args.device)
    if device is None:
        return 1
    names = (args.dtype or ("fp16" if device.type == "cuda" else "fp32")).split(",")
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
        return 2
    for name in names:
        bench(device, DTYPES[name], args)
        sys.stdout.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
