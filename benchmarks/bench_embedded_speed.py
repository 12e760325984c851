#!/usr/bin/env python
"""Wall time of one 20-step 64×64 image from the embedded model on the CPU (issue 2: <= 2 s on 2 cores).

    python benchmarks/bench_embedded_speed.py [--threads 2] [--repeats 5] [--model unet|dit|FOLDER]
    python benchmarks/bench_embedded_speed.py --threads 1 --model unet --model dit   # the ratio, in one run

Prints the median and best of several runs after one warm-up, plus the time to load the model,
and the process CPU time per image (wall time is noisy on a shared machine). An SD3 (DiT) model
is called with ``max_sequence_length=0`` at 64 px and its own default guidance.
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


def measure(model, args) -> float:
    start = time.perf_counter()
    pipe = embedded.load_pipeline(model, device="cpu")
    load = time.perf_counter() - start
    dit = hasattr(pipe, "transformer")
    guidance = embedded.DIT_DEFAULT_GUIDANCE if dit else embedded.DEFAULT_GUIDANCE
    extra = dict(embedded.call_kwargs(pipe), height=embedded.IMAGE_SIZE, width=embedded.IMAGE_SIZE) if dit else {}

    def once(seed):
        g = torch.Generator().manual_seed(seed)
        t, c = time.perf_counter(), time.process_time()
        pipe(embedded.DEFAULT_PROMPT, num_inference_steps=args.steps, guidance_scale=guidance, generator=g, output_type="np", **extra)
        return time.perf_counter() - t, time.process_time() - c

    once(0)
    runs = [once(i) for i in range(args.repeats)]
    times = [w for w, _ in runs]
    med = statistics.median(times)
    cpu = statistics.median(c for _, c in runs)
    print(f"{type(pipe).__name__} from {embedded.model_dir_for(model)}")
    print(f"  load {load:.2f} s; one {args.steps}-step image on {args.threads} CPU threads (guidance {guidance}): "
          f"median {med:.2f} s, best {min(times):.2f} s, process CPU {cpu:.2f} s ({args.repeats} runs)")
    print(f"  target <= 2 s: {'met' if med <= 2.0 else 'NOT met'}")
    return cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=embedded.DEFAULT_STEPS)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="unet (default), dit, or a model folder; give it twice (e.g. --model unet --model dit) for their ratio in one run",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.model or [None]
    cpu = [measure(m, args) for m in models]
    if len(models) > 1:
        print("process CPU time ratios to the first model: " + ", ".join(f"{m}: {c / cpu[0]:.2f}" for m, c in zip(models[1:], cpu[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
