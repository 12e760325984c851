#!/usr/bin/env python
"""Masks needed: how many masks each DF-RISE variant needs for its map to agree (Spearman ρ >=
0.9) with a 1,024-mask reference drawn from another mask seed (issue 12).

    nice python benchmarks/bench_rise_masks.py --n 3

Held-out prompts as in validity_common (embedded model, step 14 of 20). The maps at 8 … 512
masks are prefixes of one seed-0 mask stream (the UNet's answers are cached by input, so a
prefix costs nothing extra); the reference uses seed 1. Fewer masks for the same agreement is
a speed result: at the same map quality the run costs (masks needed) model evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validity_common as vc  # noqa: E402

from explain.adapters.diffusers import from_pipeline  # noqa: E402
from explain.methods import defaults, sanity  # noqa: E402
from explain.methods.rise import df_rise  # noqa: E402

COUNTS = (8, 16, 32, 64, 128, 256, 512)


def cached(den):
    """The denoiser with its model answers cached by input bytes and noise level."""
    store = {}
    inner = den.model_fn

    def model_fn(x, level):
        key = (hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest(), level.timestep, x.shape[0])
        if key not in store:
            store[key] = inner(x, level)
        return store[key]

    return replace(den, model_fn=model_fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--reference", type=int, default=1024)
    p.add_argument("--variants", nargs="*", default=["paper", "grid4-structure-centered", "x0-negmse-centered"])
    args = p.parse_args(argv)
    vc.one_thread()
    log = vc.Tee("rise_masks")
    pipe = vc.load()
    samples = vc.samples(pipe, args.n, log=log)
    table = {v: {n: [] for n in COUNTS} for v in args.variants}
    for k, s in enumerate(samples):
        den = cached(from_pipeline(pipe, s.trace))
        for v in args.variants:
            kw = defaults.VARIANTS[v].kwargs()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = df_rise(den, s.trace, vc.STEP, **{**kw, "n_masks": args.reference, "seed": 1}, batch_size=8).saliency
                for n in COUNTS:
                    m = df_rise(den, s.trace, vc.STEP, **{**kw, "n_masks": n, "seed": 0}, batch_size=8).saliency
                    table[v][n].append(sanity._rho(m, ref))
            log(f"  {k + 1}/{len(samples)} {v}: " + " ".join(f"{n}:{vc.fmt(table[v][n][-1], 2)}" for n in COUNTS))
    log("")
    log(f"Masks needed for Spearman ρ >= 0.9 with a {args.reference}-mask reference (other seed) | embedded shapes-64, step 14, {len(samples)} held-out prompts")
    log(f"  {'variant':28s} " + " ".join(f"{n:>6d}" for n in COUNTS) + "   masks needed (mean ρ)")
    for v in args.variants:
        means = [vc.mean(table[v][n]) for n in COUNTS]
        needed = next((n for n, m in zip(COUNTS, means) if m >= 0.9), None)
        log(f"  {v:28s} " + " ".join(f"{m:6.3f}" for m in means) + f"   {needed if needed else f'> {COUNTS[-1]}'}")
    log(f"  (default n_masks = {defaults.RISE.n_masks}; the paper used 500)")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
