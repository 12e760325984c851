#!/usr/bin/env python
"""DF-CAM speed: every layer from one forward + backward pass, against one pass per layer.

    python benchmarks/bench_cam.py                       # embedded model on the CPU (the paper's layer set)
    python benchmarks/bench_cam.py --device cuda         # random SD1.5-shaped UNet, 512², fp16: the paper's 43 modules
    python benchmarks/bench_cam.py --device cpu --sd15 --channels-div 8 --latent 16   # dry run of the GPU path

"one pass per layer" is already far cheaper than the official code, which ran a whole
generation (20-30 steps) per layer; the printout also extrapolates that cost. Both ways give the
same per-layer maps (the largest difference is printed).
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
from explain.methods.cam import df_cam, paper_layers  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sd15", action="store_true")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--channels-div", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="generation length, for the official cost estimate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = sd.prepare_device(args.device)
    if device is None:
        return 1
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]

    if device.type == "cuda" or args.sd15:
        unet, denoiser, trace = sd.random_setup(device, dtype, args.latent, args.channels_div)
        name, step = f"random SD1.5-shaped UNet, latent {args.latent}²", 0
    else:
        from bench_rise import embedded_setup

        name, unet, denoiser, trace = embedded_setup(args.steps, 14)
        step = 14
    layers = paper_layers(denoiser.modules)

    df_cam(denoiser, trace, step, layers=layers)  # warm-up
    df_cam(denoiser, trace, step, layers=layers[:1])
    together = {}
    one_s = sd.timed(lambda: together.__setitem__("r", df_cam(denoiser, trace, step, layers=layers)), device, repeats=2)
    alone = {}

    def per_layer():
        for layer in layers:
            alone[layer] = df_cam(denoiser, trace, step, layers=[layer]).layers[layer]

    per_s = sd.timed(per_layer, device)
    diff = max(float((together["r"].layers[k] - alone[k]).abs().max() / alone[k].abs().max().clamp_min(1e-12)) for k in layers)
    level = NoiseLevel.from_trace(trace, step)
    forward_s = sd.timed(lambda: denoiser.predict(trace.x_t[step, 0:1].to(device), level), device, repeats=3)

    print(f"DF-CAM speed | {name} | {device.type} {str(dtype).replace('torch.', '')} | {len(layers)} layers (the paper's set)")
    print(f"  all layers, one forward + backward   {1000 * one_s:9.1f} ms")
    print(f"  one pass per layer                   {1000 * per_s:9.1f} ms   ({per_s / one_s:5.1f}x slower)")
    print(
        f"  official (one {args.steps}-step generation per layer, estimated from one guided forward = "
        f"{1000 * forward_s:.1f} ms)   {len(layers) * args.steps * forward_s:9.2f} s   ({len(layers) * args.steps * forward_s / one_s:5.0f}x slower)"
    )
    print(f"  same maps either way: largest relative difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
