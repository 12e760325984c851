#!/usr/bin/env python
"""Quality of the embedded model on captions it never saw, scored by the attribute checker.

    python benchmarks/bench_embedded_quality.py            # 240 held-out captions, 20 steps
    python benchmarks/bench_embedded_quality.py --n 48 --grid docs/embedded_samples.png
    python benchmarks/bench_embedded_quality.py --model dit          # the MMDiT (shapes-dit-64)
    python benchmarks/bench_embedded_quality.py --model /work/dit-train/run1 --json run1.json

First the checker scores the generator's own images (it must reach >= 98 % on every
attribute, or its verdicts on the model mean little); then the model generates one image per
held-out caption (attribute combinations excluded from training by construction, see
`explain.embedded.world.is_held_out`) with the default scheduler, steps and guidance, and the checker
scores colour, shape, size, object count and position / relation. Bars (issue 2): colour >= 90 %,
shape >= 80 %, position/relation >= 85 %, count >= 90 %; for the DiT (issue 14) colour >= 95 %.
``--model`` takes ``unet`` (the default), ``dit`` or a folder; an SD3 folder is called as the DiT
is (64 px, ``max_sequence_length=0``, its own default steps and guidance).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain import embedded  # noqa: E402

from explain.embedded import checker, world  # noqa: E402

BARS = {"color": 0.90, "shape": 0.80, "position_relation": 0.85, "count": 0.90}
DIT_BARS = {"color": 0.95, "shape": 0.80, "position_relation": 0.85, "count": 0.90}


def is_dit(pipe) -> bool:
    return hasattr(pipe, "transformer")


def checker_self_score(n: int) -> dict:
    scores = checker.Scores()
    for s in world.scenes(n, seed=11, split="any"):
        scores.add(checker.check_scene(world.render(s)[0], s))
    return scores.as_dict()


def generate(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch: int) -> np.ndarray:
    out = []
    extra = dict(embedded.call_kwargs(pipe), height=embedded.IMAGE_SIZE, width=embedded.IMAGE_SIZE) if is_dit(pipe) else {}
    for i in range(0, len(captions), batch):
        g = torch.Generator(device=pipe.device).manual_seed(seed + i)
        chunk = captions[i : i + batch]
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np", **extra).images)
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def save_grid(path: Path, truth: np.ndarray, images: np.ndarray, per_row: int = 8) -> None:
    from PIL import Image

    rows = []
    for i in range(0, len(images) - len(images) % per_row, per_row):
        rows.append(np.concatenate(list(truth[i : i + per_row]), 1))
        rows.append(np.concatenate(list(images[i : i + per_row]), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).resize((per_row * 128, len(rows) * 128), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=240, help="held-out captions to generate (>= 200 for the issue's figure)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's (20)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="unet (default), dit, or a model folder")
    p.add_argument("--shift", type=float, default=None, help="DiT only: sample with this flow-scheduler shift instead of the saved one")
    p.add_argument("--grid", default=None, help="write a PNG grid: ground truth rows above generated rows")
    p.add_argument("--json", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    self_scores = checker_self_score(500)
    print("checker on generator images:", json.dumps({k: round(v, 4) for k, v in self_scores.items()}))

    pipe = embedded.load_pipeline(args.model)
    dit = is_dit(pipe)
    bars = DIT_BARS if dit else BARS
    if args.steps is None:
        args.steps = embedded.DIT_DEFAULT_STEPS if dit else embedded.DEFAULT_STEPS
    if args.guidance is None:
        args.guidance = embedded.DIT_DEFAULT_GUIDANCE if dit else embedded.DEFAULT_GUIDANCE
    if args.shift is not None:
        if not dit:
            p.error("--shift applies to a DiT (flow-matching) model only")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
    info = embedded.training_info(args.model)
    seen = info.get("samples_seen")
    print(f"model: {type(pipe).__name__} from {embedded.model_dir_for(args.model)}" + (f", {seen} training samples seen" if seen else ""))
    held = world.scenes(args.n, seed=2024, split="held_out")
    assert all(world.is_held_out(s.key) for s in held)
    start = time.time()
    images = generate(pipe, [s.caption for s in held], args.steps, args.guidance, args.seed, args.batch)
    seconds = time.time() - start
    scores = checker.Scores()
    by_layout: dict[int, checker.Scores] = {}
    for img, s in zip(images, held):
        check = checker.check_scene(img, s)
        scores.add(check)
        by_layout.setdefault(len(s.objects), checker.Scores()).add(check)
    result = scores.as_dict()
    shift = f", shift {pipe.scheduler.config.shift}" if dit else ""
    print(f"model on {args.n} held-out captions ({args.steps} steps, guidance {args.guidance}{shift}, {seconds:.0f} s):")
    for key in ("color", "shape", "size", "count", "position_relation"):
        bar = bars.get(key)
        verdict = "" if bar is None else ("  (bar %.0f %%: %s)" % (bar * 100, "met" if result[key] >= bar else "NOT met"))
        print(f"  {key:18s} {result[key] * 100:5.1f} %{verdict}")
    for n_obj, sc in sorted(by_layout.items()):
        d = sc.as_dict()
        print(f"  {n_obj} object(s), {d['images']} images: " + ", ".join(f"{k} {d[k] * 100:.0f} %" for k in ("color", "shape", "count", "position_relation")))
    if args.grid:
        truth = np.stack([world.render(s)[0] for s in held])
        save_grid(Path(args.grid), truth, images)
        print("grid written to", args.grid)
    if args.json:
        layouts = {n_obj: sc.as_dict() for n_obj, sc in sorted(by_layout.items())}
        record = {"checker_self": self_scores, "model": result, "by_objects": layouts, "samples_seen": seen, "args": vars(args), "seconds": seconds}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if all(result[k] >= v for k, v in bars.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
