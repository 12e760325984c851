#!/usr/bin/env python
"""R1 and R3 as measurements (issue 12).

    nice python benchmarks/bench_r1r3.py --n 30

Held-out prompts as in validity_common (embedded model, 20 steps, guidance 5).

* **R1** (`explain.methods.recovery.region_recovery`): the per-step x0 change and the recovered
  share inside the objects (as the checker finds them in the final image) vs outside; the
  number is the *lead* (mean over steps of recovered inside - outside; > 0: objects first) and
  the half-change steps. Also inside vs outside the default DF-RISE map's top 20 % at step 14
  ("saliency region"), and, as the baseline, a random region of the same size.
* **R3** (`explain.methods.schedule_effects.compare_schedules`): the same seed with the paper's
  early and latter time steps (λ = 60) against uniform ones: low- vs high-frequency energy of
  the image difference, layout correlation and object-mask IoU.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validity_common as vc  # noqa: E402

from explain.adapters.diffusers import from_pipeline, generate  # noqa: E402
from explain.embedded import checker  # noqa: E402
from explain.methods import defaults  # noqa: E402
from explain.methods.recovery import region_recovery, trace_recovery  # noqa: E402
from explain.methods.rise import df_rise  # noqa: E402
from explain.methods.schedule_effects import compare_schedules  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--lam", type=int, default=60)
    p.add_argument("--no-rise", action="store_true", help="skip the saliency-region R1 (DF-RISE)")
    args = p.parse_args(argv)
    vc.one_thread()
    log = vc.Tee("r1r3")
    pipe = vc.load()
    samples = vc.samples(pipe, args.n, log=log)
    r1_obj, r1_sal, r1_rand, r3 = [], [], [], {"early": [], "latter": []}
    for k, s in enumerate(samples):
        tr = s.trace
        view = trace_recovery(tr, "latent")
        r1_obj.append(region_recovery(view, torch.from_numpy(s.union)))
        g = torch.Generator().manual_seed(500 + k)
        r1_rand.append(region_recovery(view, torch.rand(*tr.latent_size, generator=g), top=max(0.05, min(0.95, r1_obj[-1].region_share))))
        if not args.no_rise:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sal = df_rise(from_pipeline(pipe, tr), tr, vc.STEP).saliency
            r1_sal.append(region_recovery(view, sal, top=0.2))
        images = {"uniform": s.image}
        masks = {"uniform": s.union}
        for schedule in ("early", "latter"):
            _, imgs = generate(pipe, s.scene.caption, steps=vc.STEPS, guidance=vc.GUIDANCE, seed=s.index, previews=False, output_type="np", schedule=schedule, lam=args.lam)
            img = (np.clip(imgs[0], 0, 1) * 255).round().astype(np.uint8)
            found = checker.detect_objects(img)
            images[schedule] = img
            masks[schedule] = np.stack([d.mask for d in found]).any(0) if found else np.zeros(img.shape[:2], bool)
        cmp = compare_schedules(images, masks=masks)
        for schedule in ("early", "latter"):
            r3[schedule].append(cmp.differences[schedule])
        log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: R1 lead objects {r1_obj[-1].lead:+.3f}; R3 high-share early {cmp.differences['early'].high_share:.2f} latter {cmp.differences['latter'].high_share:.2f}")

    def r1_line(label, rs):
        leads = [r.lead for r in rs]
        log(
            f"  {label:40s} lead {np.mean(leads):+.3f} (> 0 on {vc.share([v > 0 for v in leads])}); half-change step inside "
            f"{np.mean([r.half_step_inside for r in rs]):.2f} vs outside {np.mean([r.half_step_outside for r in rs]):.2f}; region share {np.mean([r.region_share for r in rs]):.2f}"
        )

    log("")
    log(f"R1 | embedded shapes-64 | {len(samples)} held-out prompts, 20 steps | recovered = within 0.25 std of the final latent")
    r1_line("objects (checker) vs rest", r1_obj)
    r1_line("random region of the same size (baseline)", r1_rand)
    if r1_sal:
        r1_line(f"default DF-RISE top 20 % at step {vc.STEP} vs rest", r1_sal)
    cum_in = np.mean([r.cumulative_inside.numpy() for r in r1_obj], 0)
    cum_out = np.mean([r.cumulative_outside.numpy() for r in r1_obj], 0)
    log("  share of the run's x0 change done by step s (objects | rest): " + " ".join(f"{s + 1}:{a:.2f}|{b:.2f}" for s, (a, b) in enumerate(zip(cum_in, cum_out)) if s % 3 == 0))
    log("")
    log(f"R3 | same seed, the paper's exponential steps (λ = {args.lam}) vs uniform | image differences (0..1 pixels), high band > 0.25 Nyquist")
    for schedule, ds in r3.items():
        iou = [d.mask_iou for d in ds if d.mask_iou is not None]
        log(
            f"  {schedule:7s} rms {np.mean([d.rms for d in ds]):.3f}  high-frequency share {np.mean([d.high_share for d in ds]):.3f}  "
            f"layout correlation {np.mean([d.layout_correlation for d in ds]):.3f}  object-mask IoU {np.mean(iou):.3f}"
        )
    log(f"  (defaults: {defaults.RISE})")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
