#!/usr/bin/env python
"""Faithfulness and sanity of DF-RISE and DF-CAM on the shapes world, with the embedded model.

    python benchmarks/bench_faithfulness.py                      # 12 scenes, both protocols
    python benchmarks/bench_faithfulness.py --n 40 --protocol noised --timestep 300
    python benchmarks/bench_faithfulness.py --model tiny --n 2   # plumbing check (random weights: numbers meaningless)

Protocols (as ``bench_pointing.py``):

* ``noised``: each scene's ground-truth image is VAE-encoded (posterior mean), noised to
  ``--timestep`` with the model's alpha_bar, and explained at that one step with its caption; the
  masks are the renderer's exact object masks.
* ``generated``: the model generates the caption's image (20 steps, default guidance) and it is
  explained at step ``--step`` (default 14, the paper's 15th of 20); the masks are what the
  attribute checker finds in the generated image (scenes where it finds nothing are skipped).

Reported per protocol:

* **pointing** (whole-image maps): the map's maximum lies on an object (any object's mask).
  Chance level = the objects' share of the image, printed alongside.
* **per-object pointing** (per-token DF-RISE, noised protocol): the map of an object's words
  (size, colour, shape) peaks inside *that* object's mask.
* **insertion / deletion** (latent space, and image space through the VAE): per prompt, whether
  the map's insertion AUC is below the random-map baseline's (mean of 2 random maps), i.e. the
  curve falls faster (target >= 90 % of prompts), and whether its deletion AUC is above; plus the
  paper's aggregated AUC (mean curve -> min-max -> trapezoid) per map kind. Scores are distances
  to the untouched prediction: low insertion AUC and high deletion AUC are good.
* **sanity** (Adebayo et al. 2018): Spearman rank correlation between each map from the trained
  UNet and from a re-initialised copy (low = the map depends on the model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.adapters.diffusers import from_pipeline, vae_decoder  # noqa: E402
from explain.embedded import world  # noqa: E402
from explain.methods import faithfulness as fa  # noqa: E402
from explain.methods import heatmaps  # noqa: E402
from explain.methods.cam import df_cam  # noqa: E402
from explain.methods.rise import df_rise, df_rise_tokens  # noqa: E402

RANDOM_SEEDS = (101, 102)
KINDS = {"rise": "DF-RISE", "cam": "DF-CAM (sum)", "cam_proj": "DF-CAM (guided projection)"}


class Tally:
    def __init__(self):
        self.rows: list[dict] = []
        self.curves: dict[str, dict[str, list]] = {}

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def share(self, key: str) -> str:
        values = [r[key] for r in self.rows if key in r and r[key] is not None]
        if not values:
            return "  n/a"
        return f"{100 * sum(values) / len(values):5.1f} % ({sum(values)}/{len(values)})"

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.rows if key in r and r[key] is not None and not np.isnan(r[key])]
        return float(np.mean(values)) if values else float("nan")


def upsample(m: torch.Tensor, size: int) -> torch.Tensor:
    m = m.float()
    if m.shape[-1] == size:
        return m
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def point(m: torch.Tensor, mask: np.ndarray) -> bool | None:
    if float(m.max() - m.min()) <= 1e-12:
        return False
    return heatmaps.pointing_hit(upsample(m, mask.shape[-1]), torch.from_numpy(mask))


def score_maps(denoiser, trace, step, maps: dict[str, torch.Tensor], decode, union: np.ndarray, tally: Tally, extra: dict) -> None:
    row = dict(extra)
    row["chance"] = float(union.mean())
    games = {}
    for kind, m in maps.items():
        row[f"{kind}_point"] = point(m, union)
        games[kind] = fa.insertion_deletion(denoiser, trace, step, m, decode=decode, seed=0)
    randoms = [
        fa.insertion_deletion(denoiser, trace, step, fa.random_saliency(trace.latent_size, s), decode=decode, seed=s) for s in RANDOM_SEEDS
    ]
    for space in ("latent", "image"):
        def auc_of(game):
            return game.latent_auc if space == "latent" else game.image_auc

        rnd = {mode: statistics.mean(auc_of(r[mode]) for r in randoms) for mode in fa.MODES}
        for kind, g in games.items():
            if auc_of(g["insertion"]) is None:
                continue
            row[f"{kind}_ins_{space}"] = auc_of(g["insertion"]) < rnd["insertion"]
            row[f"{kind}_del_{space}"] = auc_of(g["deletion"]) > rnd["deletion"]
            for mode in fa.MODES:
                curve = g[mode].latent_curve if space == "latent" else g[mode].image_curve
                tally.curves.setdefault(f"{kind}/{mode}/{space}", []).append(curve)
        for mode in fa.MODES:
            curve = torch.stack([(r[mode].latent_curve if space == "latent" else r[mode].image_curve) for r in randoms]).mean(0)
            tally.curves.setdefault(f"random/{mode}/{space}", []).append(curve)
    tally.add(row)


def explain_maps(denoiser, trace, step, args) -> dict[str, torch.Tensor]:
    rise = df_rise(
        denoiser, trace, step, n_masks=args.masks, similarity=args.similarity, quantity=args.quantity, centered=args.centered, masks=args.mask_kind
    )
    cam = df_cam(denoiser, trace, step, layers="paper")
    cam_proj = df_cam(denoiser, trace, step, layers="paper", target="guided_projection")
    return {"rise": rise.display(), "cam": cam.latent, "cam_proj": cam_proj.latent}


def encode(pipe, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(pipe.device, pipe.vae.dtype)
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def object_tokens(trace, scene) -> list[list[int]]:
    words = [w.text.lower() for w in trace.words[0]]
    caption = [w.lower() for w in world.caption_words(scene.caption)]
    spans = world.object_word_indices(scene)
    if words != caption:
        return []
    return [sorted({i for k in span for i in trace.words[0][k].token_indices}) for span in spans]


def run_noised(pipe, scenes, args, tally: Tally, token_tally: Tally, sanity: list) -> None:
    from explain.adapters.diffusers import trace as tap

    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    decode = vae_decoder(pipe.vae)
    a = float(pipe.scheduler.alphas_cumprod[args.timestep])
    for i, scene in enumerate(scenes):
        image, masks = world.render(scene, size)
        x0 = encode(pipe, image)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + i)).to(x0.device, x0.dtype)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        with tap(pipe, previews=False) as tr:
            pipe(scene.caption, latents=x_t, timesteps=[args.timestep], guidance_scale=args.guidance, output_type="latent")
        trace = tr.trace
        denoiser = from_pipeline(pipe, trace)
        maps = explain_maps(denoiser, trace, 0, args)
        union = masks.any(0)
        score_maps(denoiser, trace, 0, maps, decode, union, tally, {})
        if args.token_masks:
            spans = object_tokens(trace, scene)
            if spans:
                tokens = df_rise_tokens(denoiser, trace, 0, n_masks=args.token_masks, similarity=args.similarity, quantity=args.quantity)
                for k, span in enumerate(spans):
                    token_tally.add({"point": point(tokens.word_map(span), masks[k]), "chance": float(masks[k].mean())})
        if i < args.sanity:
            sanity.append(sanity_check(pipe, trace, 0, maps, args))
        print(f"  noised {i + 1}/{len(scenes)}: {scene.caption!r}", file=sys.stderr)


def run_generated(pipe, scenes, args, tally: Tally) -> int:
    from explain.adapters.diffusers import generate
    from explain.embedded import checker

    decode = vae_decoder(pipe.vae)
    skipped = 0
    for i, scene in enumerate(scenes):
        trace, images = generate(pipe, scene.caption, steps=20, guidance=args.guidance, seed=args.seed + i, previews=False, output_type="np")
        image = (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)
        found = checker.detect_objects(image)
        if not found:
            skipped += 1
            continue
        union = np.stack([d.mask for d in found]).any(0)
        denoiser = from_pipeline(pipe, trace)
        maps = explain_maps(denoiser, trace, args.step, args)
        score_maps(denoiser, trace, args.step, maps, decode, union, tally, {})
        print(f"  generated {i + 1}/{len(scenes)}: {scene.caption!r}", file=sys.stderr)
    return skipped


def sanity_check(pipe, trace, step, maps, args) -> dict:
    randomized = fa.randomized_copy(pipe.unet, seed=7)
    denoiser = from_pipeline(pipe, trace, unet=randomized)
    other = explain_maps(denoiser, trace, step, args)
    return {kind: fa.spearman(maps[kind], other[kind]) for kind in maps}


def report(name: str, tally: Tally) -> None:
    if not tally.rows:
        print(f"{name}: nothing scored")
        return
    print(f"{name}: {len(tally.rows)} prompts; chance of pointing at an object = {100 * tally.mean('chance'):.1f} %")
    for kind, label in KINDS.items():
        print(f"  {label}: pointing {tally.share(f'{kind}_point')}")
        for space in ("latent", "image"):
            if f"{kind}_ins_{space}" not in tally.rows[0]:
                continue
            aucs = {m: fa.paper_auc(tally.curves[f"{kind}/{m}/{space}"]) for m in fa.MODES}
            rnd = {m: fa.paper_auc(tally.curves[f"random/{m}/{space}"]) for m in fa.MODES}
            print(
                f"    {space:6s} insertion beats random in {tally.share(f'{kind}_ins_{space}')} (target >= 90 %), "
                f"deletion in {tally.share(f'{kind}_del_{space}')}; paper AUC ins {aucs['insertion']:.3f} "
                f"(random {rnd['insertion']:.3f}, lower is better), del {aucs['deletion']:.3f} (random {rnd['deletion']:.3f}, higher is better)"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", choices=["embedded", "tiny"])
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--protocol", default="both", choices=["noised", "generated", "both"])
    p.add_argument("--split", default="held_out", choices=["train", "held_out", "any"])
    p.add_argument("--timestep", type=int, default=300, help="noised protocol: the timestep (the paper's step 15 of 20 is t = 300)")
    p.add_argument("--step", type=int, default=14, help="generated protocol: the step index explained (of 20)")
    p.add_argument("--masks", type=int, default=96, help="DF-RISE masks per map")
    p.add_argument("--token-masks", type=int, default=64, help="per-token DF-RISE masks (0 = skip)")
    p.add_argument("--similarity", default="neg_mse", help="the best pointing on this world (see the README); the paper used structure")
    p.add_argument("--quantity", default="x0", choices=["x0", "epsilon"])
    p.add_argument("--mask-kind", default="bernoulli", choices=["bernoulli", "grid"])
    p.add_argument("--centered", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sanity", type=int, default=3, help="scenes (noised protocol) for the randomisation check")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from explain import embedded

    if args.model == "embedded" and embedded.is_available():
        pipe = embedded.load_pipeline(device="cpu")
        args.guidance = args.guidance or embedded.DEFAULT_GUIDANCE
        name = "embedded shapes-64"
    else:
        from explain.testing import tiny_sd_pipeline

        if args.model == "embedded":
            print("note: the embedded model's weights are not there; using the tiny random pipeline (numbers meaningless)")
        pipe, name = tiny_sd_pipeline(), "tiny random SD"
        args.guidance = args.guidance or 5.0
    scenes = world.scenes(args.n, seed=args.seed, split=args.split)
    start = time.perf_counter()
    print(
        f"Faithfulness on the shapes world | {name} | {args.n} {args.split} scenes | DF-RISE: {args.masks} {args.mask_kind} masks, "
        f"{args.similarity} on {args.quantity}, {'centered' if args.centered else 'paper'} estimator | DF-CAM: paper layers"
    )
    sanity: list[dict] = []
    if args.protocol in ("noised", "both"):
        tally, tokens = Tally(), Tally()
        run_noised(pipe, scenes, args, tally, tokens, sanity)
        report(f"noised (t = {args.timestep})", tally)
        if tokens.rows:
            print(f"  per-token DF-RISE, per-object pointing {tokens.share('point')} (chance {100 * tokens.mean('chance'):.1f} %)")
    if args.protocol in ("generated", "both"):
        tally = Tally()
        skipped = run_generated(pipe, scenes, args, tally)
        report(f"generated (step {args.step} of 20; objects as the checker finds them; {skipped} images with none skipped)", tally)
    if sanity:
        for kind in KINDS:
            values = [s[kind] for s in sanity]
            print(f"sanity ({len(values)} scenes): Spearman(trained, randomised UNet) for {kind}: mean {np.nanmean(values):.3f}, values {[round(v, 3) for v in values]}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
