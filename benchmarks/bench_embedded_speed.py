#!/usr/bin/env python
"""Wall time of one 20-step 64×64 image from the embedded model on the CPU (issue 2: <= 2 s on 2 cores).

    python benchmarks/bench_embedded_speed.py [--threads 2] [--repeats 5]

Prints the median and best of several runs after one warm-up, plus the time to load the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain import embedded  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=embedded.DEFAULT_STEPS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = embedded.load_pipeline(device="cpu")
    load = time.perf_counter() - start

    def once(seed):
        g = torch.Generator().manual_seed(seed)
        t = time.perf_counter()
        pipe(embedded.DEFAULT_PROMPT, num_inference_steps=args.steps, guidance_scale=embedded.DEFAULT_GUIDANCE, generator=g, output_type="np")
        return time.perf_counter() - t

    once(0)
    times = [once(i) for i in range(args.repeats)]
    med = statistics.median(times)
    print(f"load {load:.2f} s; one {args.steps}-step image on {args.threads} CPU threads: median {med:.2f} s, best {min(times):.2f} s ({args.repeats} runs)")
    print(f"target <= 2 s: {'met' if med <= 2.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
