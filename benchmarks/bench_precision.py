"""bf16 against fp32 on the CPU: speed, and whether the maps still say the same thing.

    python benchmarks/bench_precision.py                 # embedded model + SD1.5-shaped UNet at 256²
    python benchmarks/bench_precision.py --models embedded --masks 32 --rounds 2

For each model it prints, measured in one run with fp32 and bf16 interleaved (process CPU time,
median over rounds, 1 thread by default):

* the time of one traced generation (embedded) or one guided UNet forward (SD1.5-shaped, random
  weights, 32×32 latents = 256 px: no SD1.5 weights can be downloaded here);
* rank correlations (Spearman) between the fp32 and bf16 maps of the same run: every word's
  cross-attention heatmap (the smallest over words), DF-RISE (the project's default settings,
  same masks) and DF-CAM (paper layers); image agreement (PSNR of the decoded image, embedded).

`explain.precision.choose_dtype` picks bf16 for ``--dtype auto`` on CPUs with native bf16 only
because these figures hold (>= 0.99 for every map); rerun this when a model family is added.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.methods.defaults import CAM, RISE  # noqa: E402
from explain.methods.faithfulness import spearman  # noqa: E402
from explain.precision import native_cpu_bf16  # noqa: E402

PROMPT = "a large purple triangle above a small cyan circle"  # a held-out combination of the shapes world


def cpu_time(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def min_word_correlation(t32, t16) -> float:
    from explain.methods import heatmaps

    words = [w for w in heatmaps.prompt_words(t32) if w.token_indices]
    return min(spearman(heatmaps.word_heatmap(t32, w.text), heatmaps.word_heatmap(t16, w.text)) for w in words)


def bench_embedded(args) -> dict:
    from explain import embedded
    from explain.adapters.diffusers import from_pipeline, generate
    from explain.methods.cam import df_cam
    from explain.methods.rise import df_rise

    pipes = {torch.float32: embedded.load_pipeline(device="cpu", dtype=torch.float32),
             torch.bfloat16: embedded.load_pipeline(device="cpu", dtype=torch.bfloat16)}
    times = {d: [] for d in pipes}
    traces = {}
    for _ in range(args.rounds):
        for dtype, pipe in pipes.items():
            seconds, (trace, _) = cpu_time(lambda: generate(pipe, PROMPT, steps=20, guidance=embedded.DEFAULT_GUIDANCE, seed=0, previews=False))
            times[dtype].append(seconds)
            traces[dtype] = trace
    t32, t16 = traces[torch.float32], traces[torch.bfloat16]
    step = 14
    rise_kwargs = dict(RISE.kwargs(), n_masks=args.masks)
    maps = {}
    for dtype, pipe in pipes.items():
        den = from_pipeline(pipe, t32)  # the same fp32 run explained by either precision
        maps[dtype] = (df_rise(den, t32, step, **rise_kwargs).saliency, df_cam(den, t32, step, **CAM.kwargs()).latent)
    return {
        "what": "one traced 20-step generation, 64 px",
        "fp32_s": statistics.median(times[torch.float32]),
        "bf16_s": statistics.median(times[torch.bfloat16]),
        "attention": min_word_correlation(t32, t16),
        "rise": spearman(maps[torch.float32][0], maps[torch.bfloat16][0]),
        "cam": spearman(maps[torch.float32][1], maps[torch.bfloat16][1]),
        "image_psnr": psnr(t32.images, t16.images),
    }


def bench_sd15(args) -> dict:
    from sd15_random import random_setup

    from explain.adapters.diffusers.families.unet import UNetFamily
    from explain.attention import head_mean
    from explain.denoiser import NoiseLevel
    from explain.methods.cam import df_cam
    from explain.methods.rise import df_rise

    setups = {d: random_setup("cpu", d, latent=args.latent) for d in (torch.float32, torch.bfloat16)}
    # the bf16 UNet is the fp32 one rounded: same weights, contexts and latent
    u32, _, trace = setups[torch.float32]
    setups[torch.bfloat16][0].load_state_dict({k: v.to(torch.bfloat16) for k, v in u32.state_dict().items()})
    level = NoiseLevel.from_trace(trace, 0)
    x = trace.x_t[0]
    times = {d: [] for d in setups}
    for _ in range(args.rounds):
        for dtype, (_, den, _) in setups.items():
            times[dtype].append(cpu_time(lambda: den.predict(x, level))[0])

    class Pipe:  # the family only needs .unet to install its capture
        def __init__(self, unet):
            self.unet = unet

    attention = {}
    for dtype, (unet, den, _) in setups.items():
        maps = {}
        undo = UNetFamily().install_capture(Pipe(unet), lambda name, probs, grid: maps.setdefault(name, head_mean(probs, dtype=torch.float32)))
        try:
            den.predict(x, level)
        finally:
            for u in undo:
                u()
        attention[dtype] = maps
    corr = min(spearman(attention[torch.float32][k][..., t], attention[torch.bfloat16][k][..., t])
               for k in attention[torch.float32] for t in (1, 5, 20))
    rise_kwargs = dict(RISE.kwargs(), n_masks=args.sd15_masks)
    rise = {d: df_rise(den, trace, 0, **rise_kwargs).saliency for d, (_, den, _) in setups.items()}
    cam = {d: df_cam(den, trace, 0, **CAM.kwargs()).latent for d, (_, den, _) in setups.items()}
    return {
        "what": f"one guided UNet forward (CFG batch 2), {args.latent * 8} px, random weights",
        "fp32_s": statistics.median(times[torch.float32]),
        "bf16_s": statistics.median(times[torch.bfloat16]),
        "attention": corr,
        "rise": spearman(rise[torch.float32], rise[torch.bfloat16]),
        "cam": spearman(cam[torch.float32], cam[torch.bfloat16]),
        "image_psnr": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="embedded,sd15", help="comma-separated: embedded, sd15")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--masks", type=int, default=64, help="DF-RISE masks for the embedded model")
    parser.add_argument("--sd15-masks", type=int, default=8, help="DF-RISE masks for the SD1.5-shaped UNet")
    parser.add_argument("--latent", type=int, default=32, help="SD1.5-shaped latent side (32 = 256 px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU native bf16: {native_cpu_bf16() or 'none'}; torch {torch.__version__}; {args.threads} thread(s)")
    runs = {"embedded": bench_embedded, "sd15": bench_sd15}
    for name in args.models.split(","):
        r = runs[name.strip()](args)
        print(f"\n{name}: {r['what']}")
        print(f"  time      fp32 {r['fp32_s']:.2f} s   bf16 {r['bf16_s']:.2f} s   speed-up {r['fp32_s'] / r['bf16_s']:.2f}x")
        print(f"  Spearman fp32 vs bf16: attention (min over words/layers) {r['attention']:.4f}   DF-RISE {r['rise']:.4f}   DF-CAM {r['cam']:.4f}   (bar 0.99)")
        if r["image_psnr"] is not None:
            print(f"  final image PSNR bf16 vs fp32: {r['image_psnr']:.1f} dB")


if __name__ == "__main__":
    main()
