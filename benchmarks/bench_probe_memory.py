"""How much memory one latent really costs in a CPU UNet forward, against the estimate DF-RISE
batches by (`explain.adapters.diffusers.families.unet.unet_item_bytes`).

    python benchmarks/bench_probe_memory.py                # SD1.5-shaped, widths / 4, 256 and 512 px
    python benchmarks/bench_probe_memory.py --div 1        # full SD1.5 widths (slow, ~4 GB)

Each configuration runs in its own process (peak RSS only grows): build a random-weight
SD1.5-shaped UNet, warm it up on a tiny latent, then run one guided forward ([uncond; cond]) of
``batch`` latents and report (peak RSS − RSS before) / batch beside the estimate, for diffusers'
default SDPA processor (a fused kernel that never holds the N×N scores) and for the classic
``AttnProcessor`` (which does). The batch DF-RISE picks under its 2 GiB CPU budget follows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import resource, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
torch.set_num_threads(1)
from sd15_random import random_unet
from explain.adapters.diffusers.families.unet import unet_item_bytes
from explain.denoiser import CPU_MEMORY_BUDGET, CPU_MAX_BATCH
latent, batch, proc, div = {latent}, {batch}, {proc!r}, {div}
unet = random_unet("cpu", torch.float32, channels_div=div, latent=latent)
if proc == "classic":
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())
ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
with torch.no_grad():
    unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=ctx.expand(2, -1, -1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unet(torch.randn(2 * batch, 4, latent, latent), 500, encoder_hidden_states=ctx.expand(2 * batch, -1, -1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est = unet_item_bytes(unet, torch.zeros(1, 4, latent, latent), 2, None)
print((peak - base) * 1024 / batch, est, min(CPU_MAX_BATCH, max(1, CPU_MEMORY_BUDGET // est)))
"""


def run(latent: int, batch: int, proc: str, div: int) -> tuple[float, int, int]:
    code = PROBE.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), latent=latent, batch=batch, proc=proc, div=div)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    measured, estimate, chosen = out.stdout.split()
    return float(measured), int(estimate), int(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--div", type=int, default=4, help="divide every width by this (1 = real SD1.5 widths)")
    parser.add_argument("--latents", default="32,64", help="latent sides (32 = 256 px, 64 = 512 px)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"SD1.5-shaped UNet, widths / {args.div}, fp32, guided forward (2 branches), batch {args.batch}, 1 thread")
    print(f"{'px':>5} {'processor':>10} {'measured MB/latent':>19} {'estimate MB/latent':>19} {'ratio':>6} {'DF-RISE batch':>14}")
    for latent in (int(v) for v in args.latents.split(",")):
        for proc in ("sdpa", "classic"):
            measured, estimate, chosen = run(latent, args.batch, proc, args.div)
            print(f"{latent * 8:>5} {proc:>10} {measured / 2**20:>19.0f} {estimate / 2**20:>19.0f} {estimate / max(measured, 1):>6.2f} {chosen:>14}")


if __name__ == "__main__":
    main()
