#!/usr/bin/env python
"""Do word heatmaps point at the right object? Pointing game and mIoU on the shapes world.

    python benchmarks/bench_pointing.py                  # embedded model, both protocols
    python benchmarks/bench_pointing.py --n 100 --protocol noised --timesteps 100,300,500
    python benchmarks/bench_pointing.py --model tiny --n 4   # plumbing check (random weights: numbers meaningless)

Each object's heatmap is the cross-attention of the caption words that name it (size, colour
and shape words merged, `explain.embedded.world.object_word_indices`; sub-word tokens averaged),
upsampled bilinearly to the image size.

Two heatmap variants: ``raw`` (the attention itself) and ``relative`` (each pixel's attention
divided by its summed attention over all prompt words, DAAM's ``normalize=True``).

* **pointing**: the heatmap's maximum pixel lies inside the object's mask (ties: any maximal
  pixel inside). Target >= 90 %.
* **mIoU@0.5**: mean over objects of the IoU between the mask and the min-max normalised
  heatmap cut at 0.5; **best-threshold mIoU** also tries cuts 0.1..0.9 and reports the single
  cut that is best over the whole set (an upper bound, stated as such).

Protocols:

* ``noised``: ground-truth images of held-out and training scenes are encoded by the VAE (the
  posterior mean), noised to timestep t with the model's own alpha_bar
  (``x_t = sqrt(a) x0 + sqrt(1 - a) eps``), and denoised for **one** step with the caption
  (classifier-free guidance as in generation) under the attention tap; the masks are the
  renderer's exact object masks. Reported per t.
* ``generated``: the model generates an image from the caption (default steps and guidance)
  under the tap; the attribute checker (`explain.embedded.checker`) segments the generated image and
  matches its detections to the caption's objects; objects it cannot find are counted as
  missing, not scored. Heatmaps average all steps. This tests the explanation on the model's
  own images, whatever their quality.

A flat heatmap (all pixels equal) is reported as a miss, whatever the mask. "chance pointing"
is the mean share of the image the masks cover: what a uniformly random maximum would score.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.cli import load_model  # noqa: E402
from explain.embedded import world  # noqa: E402
from explain.methods import heatmaps  # noqa: E402

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


class Tally:
    def __init__(self):
        self.hits = 0
        self.objects = 0
        self.missing = 0
        self.ious = {th: [] for th in THRESHOLDS}
        self.areas = []

    def add(self, heat: torch.Tensor, mask: torch.Tensor) -> None:
        self.objects += 1
        self.areas.append(float(mask.float().mean()))
        flat = float(heat.max() - heat.min()) <= 1e-9
        self.hits += int(not flat and heatmaps.pointing_hit(heat, mask))
        for th in THRESHOLDS:
            self.ious[th].append(0.0 if flat else heatmaps.mask_iou(heat, mask, th))

    def line(self) -> str:
        if not self.objects:
            return f"no objects scored (missing {self.missing})"
        miou = float(np.mean(self.ious[0.5]))
        best_th = max(THRESHOLDS, key=lambda th: np.mean(self.ious[th]))
        extra = f", {self.missing} objects not found by the checker" if self.missing else ""
        return (
            f"pointing {100 * self.hits / self.objects:5.1f} % ({self.hits}/{self.objects}), "
            f"mIoU@0.5 {miou:.3f}, best-threshold mIoU {np.mean(self.ious[best_th]):.3f} @ {best_th}; "
            f"chance pointing (mean mask area) {100 * np.mean(self.areas):.1f} %{extra}"
        )


def image_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def object_words(trace, item: int, scene: world.Scene) -> list[list[int]]:
    """Indices into the trace's word list of each object's words, checked against the caption."""
    words = [w.text.lower() for w in trace.words[item]]
    caption = [w.lower() for w in world.caption_words(scene.caption)]
    spans = world.object_word_indices(scene)
    if words == caption:
        return spans
    # The tap split the prompt differently: find each object's words in order by text.
    out, start = [], 0
    for span in spans:
        wanted = [caption[i] for i in span]
        found = []
        for text in wanted:
            j = words.index(text, start)
            found.append(j)
            start = j + 1
        out.append(found)
    return out


def encode(pipe, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(pipe.device, pipe.vae.dtype)
    latent = pipe.vae.encode(x).latent_dist.mean
    return latent * pipe.vae.config.scaling_factor


VARIANTS = {"raw": False, "relative": True}


def run_noised(pipe, scenes: list[world.Scene], timesteps: list[int], guidance: float, batch: int, seed: int) -> dict[tuple, Tally]:
    from explain.adapters.diffusers import trace as tap

    size = image_size(pipe)
    tallies = {(t, v): Tally() for t in timesteps for v in VARIANTS}
    alphas = pipe.scheduler.alphas_cumprod
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        rendered = [world.render(s, size) for s in chunk]
        x0 = encode(pipe, np.stack([img for img, _ in rendered]))
        g = torch.Generator().manual_seed(seed + start)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        for t in timesteps:
            a = float(alphas[t])
            x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
            with tap(pipe, previews=False) as tr:
                pipe([s.caption for s in chunk], latents=x_t, timesteps=[t], guidance_scale=guidance, output_type="latent")
            trace = tr.trace
            for b, (scene, (_, masks)) in enumerate(zip(chunk, rendered)):
                for k, idx in enumerate(object_words(trace, b, scene)):
                    for variant, relative in VARIANTS.items():
                        heat = heatmaps.word_heatmap(trace, idx, item=b, size=(size, size), normalize="none", relative=relative)
                        tallies[(t, variant)].add(heat, torch.from_numpy(masks[k]))
    return tallies


def run_generated(pipe, scenes: list[world.Scene], steps: int, guidance: float, seed: int) -> dict[tuple, Tally]:
    from explain.adapters.diffusers import generate
    from explain.embedded import checker

    tallies = {(r, v): Tally() for r in ("all steps", "second half") for v in VARIANTS}
    for i, scene in enumerate(scenes):
        trace, images = generate(pipe, scene.caption, steps=steps, guidance=guidance, seed=seed + i, previews=False)
        image = trace.images[0].numpy() if trace.images is not None else np.asarray(images[0])
        check = checker.check_scene(image, scene)
        for k, (idx, found) in enumerate(zip(object_words(trace, 0, scene), check.matches)):
            if found is None:
                for tally in tallies.values():
                    tally.missing += 1
                continue
            mask = torch.from_numpy(found.mask)
            for (steps_name, variant), tally in tallies.items():
                chosen = None if steps_name == "all steps" else slice(trace.num_steps // 2, None)
                heat = heatmaps.word_heatmap(trace, idx, chosen, size=tuple(mask.shape), normalize="none", relative=VARIANTS[variant])
                tally.add(heat, mask)
    return tallies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded (default), a diffusers folder, or 'tiny' (random weights, plumbing check)")
    p.add_argument("--protocol", choices=("noised", "generated", "both"), default="both")
    p.add_argument("--n", type=int, default=60, help="scenes per protocol")
    p.add_argument("--split", choices=("train", "held_out", "any"), default="any")
    p.add_argument("--timesteps", default="100,300,500,700", help="noise levels for the noised protocol")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    pipe, name = load_model(args.model, args.device)
    if args.guidance is None:
        from explain import embedded

        args.guidance = embedded.DEFAULT_GUIDANCE
    scenes = world.scenes(args.n, seed=1234 + args.seed, split=args.split)
    n_objects = sum(len(s.objects) for s in scenes)
    print(f"model: {name}; {len(scenes)} scenes ({args.split}), {n_objects} objects; guidance {args.guidance}", flush=True)
    if args.model == "tiny":
        print("NOTE: random-weight model: this run checks the plumbing only, the numbers mean nothing")

    if args.protocol in ("noised", "both"):
        t0 = time.perf_counter()
        timesteps = [int(t) for t in args.timesteps.split(",")]
        tallies = run_noised(pipe, scenes, timesteps, args.guidance, args.batch, args.seed)
        print(f"\nprotocol noised (ground-truth image, VAE-encoded, noised to t, one denoising call, exact masks) [{time.perf_counter() - t0:.0f} s]")
        for (t, variant), tally in tallies.items():
            print(f"  t={t:4d} {variant:8s}: {tally.line()}", flush=True)
    if args.protocol in ("generated", "both"):
        t0 = time.perf_counter()
        tallies = run_generated(pipe, scenes, args.steps, args.guidance, args.seed)
        print(f"\nprotocol generated ({args.steps} steps; generated image segmented by the checker) [{time.perf_counter() - t0:.0f} s]")
        for (steps_name, variant), tally in tallies.items():
            print(f"  {steps_name:11s} {variant:8s}: {tally.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
