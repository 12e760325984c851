#!/usr/bin/env python
"""Faithfulness of every DF-RISE variant, DF-CAM and the word maps, beside the baselines a
sceptical reader would try (issue 12).

    nice python benchmarks/bench_faithfulness.py --n 30

Held-out prompts as in validity_common (embedded model, 20 steps, guidance 5, step 14; objects
as the checker finds them in the generated image). Per prompt and map:

* **pointing**: the map's maximum lies on an object (chance = the objects' share of the image);
* **mask-seed stability**: Spearman ρ between the map at mask seeds 0 and 1 (each variant at its own
  default mask count when that is at most ``--own-masks-up-to``, else at ``--masks``);
* **games** (latent space, stride ``--stride``; distances to the untouched prediction: a faithful
  map has a LOW insertion and a HIGH deletion AUC):
  - ``context`` (the default, `explain.methods.defaults.GAME`): positions removed by re-noising
    them (``noise_scale`` × the step's noise level added, 2 shared draws), the x0 prediction
    scored only where the latent is untouched, so the identity path scores every order alike;
  - ``final`` (opt-in, ``--games context paper final``: about six times the model evaluations of
    ``context`` at step 14 of 20): the same removal, then the sampler runs on to the end
    (`explain.methods.timing.resample`) and the final latents are compared at every position;
  - ``paper``: the paper's game (insertion from the blurred latent, deletion to zeros, x0 scored
    everywhere), which the identity path wins;
* the prompt's **guidance map** (`explain.methods.guidance`: conditional minus unconditional x0 at
  the same x_t), also on the randomised UNet;
* **baselines**: random, centred Gaussian, |x_t|, |x_t - blur(x_t)| (`explain.methods.baselines`)
  and the same method on the randomised UNet (for the DF-RISE variants with ``--rand-variants``);
  for the word heatmap and the guidance map also the same map shifted half the latent away
  (circularly: its shape and compactness, not its place).
  "beats all" = beats every baseline in insertion AND deletion on that prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validity_common as vc  # noqa: E402

from explain.adapters.diffusers import from_pipeline  # noqa: E402
from explain.methods import baselines, defaults, sanity  # noqa: E402
from explain.methods import faithfulness as fa  # noqa: E402
from explain.methods.cam import df_cam  # noqa: E402
from explain.methods.guidance import guidance_map  # noqa: E402
from explain.methods.rise import df_rise  # noqa: E402

GAMES = {
    "context": dict(removal=defaults.GAME.removal, noise_scale=defaults.GAME.noise_scale, noise_draws=defaults.GAME.noise_draws, score=defaults.GAME.score),
    "paper": dict(removal="paper", score="all"),
    # the same removal, but the sampler runs on to the end and the final latents are compared
    # everywhere: what the model *makes* of the kept / removed regions, not its next prediction
    "final": dict(removal=defaults.GAME.removal, noise_scale=defaults.GAME.noise_scale, noise_draws=defaults.GAME.noise_draws, score="final"),
}
VARIANTS = tuple(defaults.VARIANTS)
SHIFTED = ("word_heatmap", "guidance_map")  # maps that point at objects, checked against their own shifted copy
MODEL_ID = "diffusion-explain/shapes-64"


def rise(den, trace, name, n, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return df_rise(den, trace, vc.STEP, **{**defaults.VARIANTS[name].kwargs(), "n_masks": n, "seed": seed}).saliency


def masks_for(name: str, args) -> int:
    """A variant at its own default mask count when that is at most ``--own-masks-up-to``
    (the few-mask variants, candidates for the default), else at ``--masks``."""
    own = defaults.VARIANTS[name].n_masks
    return own if own <= args.own_masks_up_to else args.masks


def run(args, log) -> dict:
    pipe = vc.load()
    rand_unet = fa.randomized_copy(pipe.unet, seed=7)
    samples = vc.samples(pipe, args.n, log=log)
    rows = []
    for k, s in enumerate(samples):
        tr = s.trace
        den = from_pipeline(pipe, tr)
        rden = from_pipeline(pipe, tr, unet=rand_unet)
        x = tr.x_t[vc.STEP, 0].float()
        maps, stability = {}, {}
        for name in args.variants:
            n = masks_for(name, args)
            maps[name] = rise(den, tr, name, n)
            stability[name] = sanity._rho(maps[name], rise(den, tr, name, n, seed=1))
        rand_maps = {name: rise(rden, tr, name, masks_for(name, args)) for name in args.rand_variants}
        maps["df_cam"] = df_cam(den, tr, vc.STEP, **defaults.CAM.kwargs()).latent
        spans = vc.object_word_tokens(tr, s.scene)
        att = tr.attention[vc.STEP, 0].float()
        maps["word_heatmap"] = att[sorted({i for sp in spans for i in sp})].mean(0) if spans else att[1:-1].mean(0)
        maps["guidance_map"] = guidance_map(den, tr, vc.STEP).latent
        rand_maps["guidance_map"] = guidance_map(rden, tr, vc.STEP).latent
        base = baselines.baseline_maps(x, seed=100 + k)
        # the same map moved half the latent away (circularly): its shape and compactness, not its place
        shifted = {f"{n}@shifted": torch.roll(maps[n], shifts=(maps[n].shape[-2] // 2, maps[n].shape[-1] // 2), dims=(-2, -1)) for n in SHIFTED if n in maps}
        everything = {**maps, **{f"{n}@random-unet": m for n, m in rand_maps.items()}, **shifted, **base}
        row = {"caption": s.scene.caption, "chance": float(s.union.mean()), "stability": stability, "point": {}, "auc": {},
               "masks": {name: masks_for(name, args) for name in args.variants}}
        for name, m in everything.items():
            row["point"][name] = vc.point(m, s.union)
            row["auc"][name] = {}
            for game, kw in GAMES.items():
                if game not in args.games:
                    continue
                g = fa.insertion_deletion(den, tr, vc.STEP, m, stride=args.stride, seed=0, **kw)
                row["auc"][name][game] = [g["insertion"].latent_auc, g["deletion"].latent_auc, g["insertion"].latent_curve.tolist(), g["deletion"].latent_curve.tolist()]
        rows.append(row)
        log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: stability " + ", ".join(f"{n} {vc.fmt(v, 2)}" for n, v in stability.items()))
    return {"rows": rows, "args": vars(args)}


def wins(row, name, game, other) -> tuple[bool, bool]:
    a, b = row["auc"][name][game], row["auc"][other][game]
    return a[0] < b[0], a[1] > b[1]


def report(data, log) -> dict:
    """Print the tables; returns per map ``{"beats_all_share", "beats_random_share", "seed_rho_at_masks", "masks_at"}``
    in the default game."""
    rows, args = data["rows"], data["args"]
    figures: dict[str, dict] = {}
    n = len(rows)
    log("")
    log(f"Faithfulness | embedded shapes-64 | {n} held-out prompts, step 14 of 20 | DF-RISE masks: {rows[0].get('masks', args['masks'])} | games stride {args['stride']}")
    log(f"pointing chance (objects' share of the image): {100 * vc.mean([r['chance'] for r in rows]):.1f} %")
    log("")
    log("Mask-seed stability (Spearman ρ, mask seed 0 vs 1, same mask count as above), mean [min] over prompts:")
    variants = list(rows[0]["stability"])
    for name in variants:
        v = [r["stability"][name] for r in rows]
        n_at = rows[0].get("masks", {}).get(name, args["masks"])
        figures.setdefault(name, {}).update(seed_rho_at_masks=vc.mean(v), masks_at=n_at)
        log(f"  {name:32s} {n_at:4d} masks {vc.fmt(vc.mean(v), 3)} [{vc.fmt(min(x for x in v if x is not None), 2)}]; >= 0.9 on {vc.share([x is not None and x >= 0.9 for x in v])}")
    names = list(rows[0]["auc"])
    base_names = list(baselines.BASELINES)
    for game in [g for g in GAMES if g in rows[0]["auc"][names[0]]]:
        log("")
        log(f"Game '{game}' ({GAMES[game]}): mean AUC insertion (lower = better) / deletion (higher = better), paper aggregate, pointing, win rates")
        log(f"  {'map':36s} {'ins':>7s} {'del':>7s} {'paperAUC ins/del':>17s} {'pointing':>16s}  " + "  ".join(f"{'vs ' + b:>16s}" for b in base_names + ["rand-UNet", "shifted"]) + f"  {'beats all':>16s}")
        for name in names:
            ins = vc.mean([r["auc"][name][game][0] for r in rows])
            dele = vc.mean([r["auc"][name][game][1] for r in rows])
            pa_i = fa.paper_auc([torch.tensor(r["auc"][name][game][2]) for r in rows])
            pa_d = fa.paper_auc([torch.tensor(r["auc"][name][game][3]) for r in rows])
            cols, all_ok = [], [True] * n
            others = [b for b in base_names if b != name]
            rand_name, shifted_name = f"{name}@random-unet", f"{name}@shifted"
            for b in base_names + [rand_name, shifted_name]:
                if b == name or b not in rows[0]["auc"]:
                    cols.append(f"{'-':>16s}")
                    continue
                w = [wins(r, name, game, b) for r in rows]
                cols.append(f"{sum(a and d for a, d in w):3d}/{n} i{sum(a for a, _ in w):2d} d{sum(d for _, d in w):2d}")
                all_ok = [ok and a and d for ok, (a, d) in zip(all_ok, w)]
            del others
            beats = sum(all_ok) if name not in base_names else None
            if game == "context" and beats is not None:
                w = [wins(r, name, game, "random") for r in rows]
                figures.setdefault(name, {}).update(beats_all_share=beats / n, beats_random_share=sum(a and d for a, d in w) / n)
            log(
                f"  {name:36s} {ins:7.4f} {dele:7.4f} {pa_i:8.3f}/{pa_d:.3f} {vc.share([r['point'][name] for r in rows]):>16s}  "
                + "  ".join(cols)
                + (f"  {100 * beats / n:5.1f} % ({beats}/{n})" if beats is not None else "")
            )
    log("")
    log("(win columns: prompts where the map beats that baseline in both games' directions 'both/n', and in insertion 'i' / deletion 'd' alone)")
    return figures


def add_to_verdicts(figures: dict, log) -> None:
    """Add the measured faithfulness and stability to the cached sanity verdicts (written by
    bench_sanity) and name, in each DF-RISE verdict's note, every evidence bar it misses."""
    from dataclasses import replace

    known = sanity.load_verdicts().get(MODEL_ID)
    if not known:
        raise SystemExit("no sanity verdicts for the embedded model yet: run bench_sanity.py --write-verdicts first")
    out = []
    for method, v in known.items():
        key = v.numbers["variant"] if method == "df_rise" else method.split(":", 1)[1] if method.startswith("df_rise:") else method
        f = figures.get(key)
        if f is None:
            out.append(v)
            continue
        numbers = {**v.numbers, **{k: val for k, val in f.items() if val is not None}}
        fails = sanity.evidence_failures(numbers, v.passes, from_masks=method.startswith("df_rise"))
        numbers["evidence"] = not fails
        numbers["evidence_fails"] = fails
        head = v.note.split(" | ")[0]
        note = f"{head} | " + ("meets every evidence bar" if not fails else "not evidence: " + "; ".join(fails))
        out.append(replace(v, numbers=numbers, note=note))
        log(f"  verdict {method}: {note}")
    aliases = json.loads(sanity.VERDICTS_FILE.read_text())["models"][MODEL_ID].get("aliases", [])
    sanity.write_verdicts(out, MODEL_ID, aliases=aliases)
    log(f"faithfulness and stability added to {sanity.VERDICTS_FILE}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--masks", type=int, default=32, help="masks of the variants whose default count is above --own-masks-up-to")
    p.add_argument("--own-masks-up-to", type=int, default=64, help="variants whose default mask count is at most this run at it")
    p.add_argument("--stride", type=int, default=32)
    p.add_argument("--rand-variants", nargs="*", default=["grid4-structure-centered"])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--games", nargs="*", default=["context", "paper"], choices=list(GAMES))
    p.add_argument("--from-json", default=None)
    p.add_argument("--write-verdicts", action="store_true", help="add the figures to explain/methods/verdicts.json")
    p.add_argument("--name", default="faithfulness", help="results file names: benchmarks/results/<name>.txt / .json")
    args = p.parse_args(argv)
    vc.one_thread()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        log = vc.summary_log(args.name, data)
    else:
        log = vc.Tee(args.name)
        data = run(args, log)
        data["log"] = list(log.lines)
        (vc.RESULTS / f"{args.name}.json").write_text(json.dumps(data))
    figures = report(data, log)
    if args.write_verdicts:
        add_to_verdicts(figures, log)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
