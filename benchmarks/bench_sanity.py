#!/usr/bin/env python
"""The sanity table (issue 12): every map type against a randomised model and two null models.

    nice python benchmarks/bench_sanity.py --n 30 --cascade 4 --write-verdicts
    python benchmarks/bench_sanity.py --from-json benchmarks/results/sanity.json --write-verdicts   # re-summarise only

For each held-out prompt (see validity_common: embedded model, 20 steps, guidance 5, step 14):

* **randomisation**: Spearman ρ between the map of the trained UNet and of a fully
  re-initialised copy (`randomized_copy`, seed 7); on the first ``--cascade`` prompts also of
  each cascade stage (top layers first, `layer_groups`);
* **null models** (`null_denoisers`): a denoiser returning the trained model's guided ε (x0 then
  follows the input: the identity path) or its x0, whatever its input; ρ with their map (None
  when the null model's map is flat or the method cannot run on it);
* **pointing**: the map's maximum on an object (whole-image maps, objects as the checker finds
  them; chance = the objects' share of the image) or on *its* object (per-word maps).

A method passes when mean ρ(randomised) < 0.3 and mean ρ(null) < 0.5, and a map from random
masks agrees with itself under another mask seed (mean ρ seed >= 0.5) (`explain.methods.sanity`).
Maps: cross-attention word maps of each object's words at step 14; every DF-RISE variant of
`explain.methods.defaults.VARIANTS` (``--masks`` masks); per-token DF-RISE (``--token-masks``,
at ``--token-step``); DF-CAM (paper layers); the R1 recovery-step map (the run re-done from the
same starting noise with each model, `timing.rerun_trajectory`); the guidance maps
(`explain.methods.guidance`, ``--maps guidance``): the prompt's (conditional minus
unconditional x0) and each object's words' (their tokens masked), where the null models, which
have no unconditional branch, mask every prompt word instead. ``--write-verdicts`` stores the
verdicts in explain/methods/verdicts.json (what the front ends show).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validity_common as vc  # noqa: E402

from explain.adapters.diffusers import from_pipeline  # noqa: E402
from explain.embedded import world  # noqa: E402
from explain.methods import defaults, sanity  # noqa: E402
from explain.methods import faithfulness as fa  # noqa: E402
from explain.methods.cam import df_cam  # noqa: E402
from explain.methods.guidance import guidance_map  # noqa: E402
from explain.methods.recovery import recovery_view  # noqa: E402
from explain.methods.rise import df_rise, df_rise_tokens  # noqa: E402
from explain.methods.timing import rerun_trajectory  # noqa: E402

MODEL_ID = "diffusion-explain/shapes-64"
NOTES = {
    "word_heatmap": "cross-attention of the word's tokens: where the model looked for it (not what it used)",
    "df_rise_tokens": "where the prediction depends on the word (its tokens dropped at random)",
    "df_cam": "Grad-CAM on the UNet's blocks; pointing is weak on this model",
    "recovery": "when each pixel of x0 settles; a property of the run, which a randomised model changes",
    "guidance_map": "where the prompt changes the x0 prediction at this step (conditional minus unconditional, same x_t): not which input pixels it depends on",
    "guidance_word": "where masking the word's tokens changes the x0 prediction at this step (same x_t)",
}


def pipeline_with(pipe, unet):
    return type(pipe)(**{**pipe.components, "unet": unet})


def attention_at(pipe, trace, step, caption) -> torch.Tensor:
    """Cross-attention ``[T, h, w]`` of ``pipe`` on the traced latent of ``step`` (one model call)."""
    from explain.adapters.diffusers import trace as tap

    x = trace.x_t[step].to(pipe.device)
    with tap(pipe, previews=False) as tr:
        pipe(caption, latents=x, timesteps=[int(trace.timesteps[step])], guidance_scale=vc.GUIDANCE, output_type="latent")
    return tr.trace.attention[0, 0].float()


def word_maps(att: torch.Tensor, spans) -> list[torch.Tensor]:
    return [att[span].mean(0) for span in spans]


def rise_explainer(trace, settings, step, n, seed=0):
    kw = {**settings.kwargs(), "n_masks": n, "seed": seed}

    def explain(d):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return df_rise(d, trace, step, **kw).saliency

    return explain


def guidance_rows(tr, s, step, den, rden, nulls, cascade_dens, masks) -> dict:
    """The prompt's and each object's words' guidance maps, checked like every other map."""
    everything = [w for w in tr.words[0] if w.token_indices]
    object_words = [[tr.words[0][i] for i in span] for span, m in zip(world.object_word_indices(s.scene), s.object_masks) if m is not None]

    def prompt_map(d):
        # a null model has no unconditional branch: mask every word, the same question asked through the tokens
        return guidance_map(d, tr, step).latent if d.guided else guidance_map(d, tr, step, words=everything).latent

    def word_map_list(d):
        return [guidance_map(d, tr, step, words=ws).latent for ws in object_words]

    check = sanity.check_map(prompt_map, den, rden, nulls, cascade=cascade_dens)
    trained, rand = word_map_list(den), word_map_list(rden)
    word_nulls = {kind: word_map_list(d) for kind, d in nulls.items()}
    return {
        "guidance_map": {"rand": check.randomization_rho, "null": check.null_rho, "cascade": check.cascade, "point": [vc.point(prompt_map(den), s.union)], "point_rand": [vc.point(prompt_map(rden), s.union)]},
        "guidance_word": {
            "rand": per_word_rho(trained, rand),
            "null": {kind: (None if all(sanity.is_constant(x) for x in v) else per_word_rho(trained, v)) for kind, v in word_nulls.items()},
            "cascade": [[label, per_word_rho(trained, word_map_list(d))] for label, d in cascade_dens],
            "point": [vc.point(m, mask) for m, (_, mask) in zip(trained, masks)],
            "point_rand": [vc.point(m, mask) for m, (_, mask) in zip(rand, masks)],
        },
    }


def per_word_rho(a: list, b: list) -> float | None:
    values = [sanity._rho(x, y) for x, y in zip(a, b)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run(args, log) -> dict:
    pipe = vc.load()
    rand_unet = fa.randomized_copy(pipe.unet, seed=7)
    rand_pipe = pipeline_with(pipe, rand_unet)
    samples = vc.samples(pipe, args.n, log=log)
    variants = {name: defaults.VARIANTS[name] for name in args.variants}
    rows: list[dict] = []
    groups = None
    for k, s in enumerate(samples):
        tr, step = s.trace, vc.STEP
        den = from_pipeline(pipe, tr)
        rden = from_pipeline(pipe, tr, unet=rand_unet)
        nulls = sanity.null_denoisers(den, tr, step)
        spans = vc.object_word_tokens(tr, s.scene)
        masks = [(span, m) for span, m in zip(spans, s.object_masks) if m is not None]
        row: dict = {"caption": s.scene.caption, "chance": float(s.union.mean())}
        cascade_models = []
        if k < args.cascade and ("word_heatmap" in args.maps or "guidance" in args.maps):
            if groups is None:
                x = tr.x_t[step, :1].repeat(2, 1, 1, 1)
                ctx = torch.randn(2, 8, pipe.unet.config.cross_attention_dim)
                groups = sanity.layer_groups(pipe.unet, lambda: pipe.unet(x, 300, encoder_hidden_states=ctx))
                log(f"cascade groups, top first: {', '.join(groups)}")
            cascade_models = list(sanity.cascading_randomized_copies(pipe.unet, groups, seed=7, stages=list(range(1, len(groups) + 1))))
        cascade_dens = [(label, from_pipeline(pipe, tr, unet=u)) for label, u in cascade_models]

        if "guidance" in args.maps:
            row.update(guidance_rows(tr, s, step, den, rden, nulls, cascade_dens, masks))
            if args.maps == ["guidance"]:
                rows.append(row)
                log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: " + ", ".join(f"{m}: ρ_rand {vc.fmt(v['rand'], 2)}, pointing {vc.share(v['point'])}" for m, v in row.items() if isinstance(v, dict)))
                continue

        # word heatmaps (cross-attention of each object's words)
        att = tr.attention[step, 0].float()
        trained_words = word_maps(att, [sp for sp, _ in masks])
        rand_words = word_maps(attention_at(rand_pipe, tr, step, s.scene.caption), [sp for sp, _ in masks]) if "word_heatmap" in args.maps else []
        row["word_heatmap"] = None if "word_heatmap" not in args.maps else {
            "rand": per_word_rho(trained_words, rand_words),
            "null": {},
            "point": [vc.point(m, mask) for m, (_, mask) in zip(trained_words, masks)],
            "point_rand": [vc.point(m, mask) for m, (_, mask) in zip(rand_words, masks)],
            "cascade": [[label, per_word_rho(trained_words, word_maps(attention_at(pipeline_with(pipe, u), tr, step, s.scene.caption), [sp for sp, _ in masks]))] for label, u in cascade_models],
        }

        # every DF-RISE variant
        for name, settings in variants.items():
            explain = rise_explainer(tr, settings, step, args.masks)
            m = explain(den)
            check = sanity.check_map(
                explain, den, rden, nulls, cascade=cascade_dens if name in ("paper", args.cascade_variant) else None, trained_map=m,
                reseeded=rise_explainer(tr, settings, step, args.masks, seed=1),
            )  # fmt: skip
            row[f"df_rise:{name}"] = {"rand": check.randomization_rho, "null": check.null_rho, "cascade": check.cascade, "seed": check.seed_rho, "point": [vc.point(m, s.union)]}

        if args.maps == ["df_rise"]:
            rows.append(row)
            log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: " + ", ".join(f"{m}: ρ_rand {vc.fmt(v['rand'], 2)} ρ_null {vc.fmt(max([x for x in v['null'].values() if x is not None], default=None), 2)} ρ_seed {vc.fmt(v.get('seed'), 2)}" for m, v in row.items() if isinstance(v, dict)))
            continue
        # per-token DF-RISE at its own step
        tstep = args.token_step
        tnulls = sanity.null_denoisers(den, tr, tstep)

        def token_maps(d, seed=0):
            r = df_rise_tokens(d, tr, tstep, **{**defaults.TOKEN_RISE.kwargs(), "n_masks": args.token_masks, "seed": seed})
            return [r.word_map(sp) for sp, _ in masks]

        tm = token_maps(den)
        trm = token_maps(rden)
        tnull = {kind: token_maps(d) for kind, d in tnulls.items()}
        row["df_rise_tokens"] = {
            "rand": per_word_rho(tm, trm),
            "null": {kind: (None if all(sanity.is_constant(x) for x in v) else per_word_rho(tm, v)) for kind, v in tnull.items()},
            "seed": per_word_rho(tm, token_maps(den, seed=1)),
            "point": [vc.point(m, mask) for m, (_, mask) in zip(tm, masks)],
            "point_rand": [vc.point(m, mask) for m, (_, mask) in zip(trm, masks)],
        }

        # DF-CAM
        def cam(d):
            return df_cam(d, tr, step, **defaults.CAM.kwargs()).latent

        check = sanity.check_map(cam, den, rden, nulls, cascade=cascade_dens)
        cm = cam(den)
        row["df_cam"] = {"rand": check.randomization_rho, "null": check.null_rho, "cascade": check.cascade, "point": [vc.point(cm, s.union)], "point_rand": [vc.point(cam(rden), s.union)]}

        # R1 recovery-step map: the run re-done from the same starting noise with each model
        def recovery_map(d):
            x0s, final = rerun_trajectory(d, tr)
            return recovery_view(x0s[:, None], final[None]).recovery_step[0].float()

        r1_nulls = sanity.null_denoisers(den, tr, 0)
        check = sanity.check_map(recovery_map, den, rden, r1_nulls)
        row["recovery"] = {"rand": check.randomization_rho, "null": check.null_rho}
        rows.append(row)
        log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: " + ", ".join(f"{m}: ρ_rand {vc.fmt(v['rand'], 2)}" for m, v in row.items() if isinstance(v, dict)))
    return {"rows": rows, "groups": groups, "args": vars(args)}


def summary(data: dict, log) -> list:
    rows = data["rows"]
    args = data["args"]
    methods = [m for m in rows[0] if isinstance(rows[0][m], dict)]
    # the DF-RISE variants together, after the word heatmaps (merged runs append theirs at the end)
    methods = sorted(methods, key=lambda m: (0 if m == "word_heatmap" else 1 if m.startswith("df_rise:") else 2))
    measured = (
        f"embedded shapes-64, {len(rows)} held-out prompts, 20 steps, guidance 5, step 14"
    )
    log("")
    log(f"Sanity table | {measured} | pass: mean ρ(randomised) < {sanity.RANDOMIZATION_LIMIT} and mean ρ(null) < {sanity.NULL_LIMIT}")
    log(f"{'method':34s} {'ρ rand':>7s} {'ρ null ε':>9s} {'ρ null x0':>9s} {'ρ seed':>7s} {'pointing':>20s} {'point (rand UNet)':>20s}  verdict")
    verdicts = []
    for m in methods:
        cells = [r[m] for r in rows]
        checks = [sanity.MapCheck(c["rand"], [tuple(x) for x in c.get("cascade", [])], dict(c.get("null", {})), c.get("seed")) for c in cells]
        pts = [p for c in cells for p in c.get("point", [])]
        prs = [p for c in cells for p in c.get("point_rand", [])]
        extra = {"pointing": vc.mean(pts), "pointing_randomized": vc.mean(prs) if prs else None, "chance": vc.mean([r["chance"] for r in rows])}
        note = NOTES.get(m, "")
        if m.startswith("df_rise:"):
            variant = m.split(":", 1)[1]
            extra["masks"] = args["masks"]
            note = f"DF-RISE {variant}"
        on = f"{measured}, {args['masks']} masks" if m.startswith("df_rise:") else measured
        if m == "df_rise_tokens":
            on = f"{measured.replace('step 14', 'step ' + str(args['token_step']))}, {args['token_masks']} token masks"
        v = sanity.summarize(m, checks, on, note, MODEL_ID, extra)
        verdicts.append(v)
        kinds = v.numbers["null_rho_by_kind"]
        log(
            f"{m:34s} {vc.fmt(v.randomization_rho, 3):>7s} {vc.fmt(kinds.get('epsilon'), 3):>9s} {vc.fmt(kinds.get('x0'), 3):>9s} {vc.fmt(v.numbers.get('seed_rho'), 3):>7s} "
            f"{vc.share(pts):>20s} {vc.share(prs) if prs else 'n/a':>20s}  {'PASS' if v.passes else 'FAIL'} ({v.numbers['prompts_passing']}/{len(rows)} prompts)"
        )
    log(f"pointing chance (objects' share of the image): {100 * vc.mean([r['chance'] for r in rows]):.1f} %; per-word maps point at their own object")
    casc = [v for v in verdicts if v.numbers.get("cascade")]
    if casc:
        log("")
        log("Cascading randomisation (top layers first), mean ρ with the trained map over the first prompts (n: how many):")
        for v in casc:
            n = sum(1 for r in rows if (r.get(v.method) or {}).get("cascade"))
            log(f"  {v.method:24s} n={n:<3d} " + "  ".join(f"{label.replace(' and above', '+')}: {vc.fmt(rho, 2)}" for label, rho in v.numbers["cascade"]))
    return verdicts


def verdicts_for_front_ends(verdicts: list) -> list:
    """Add the ``df_rise`` verdict: the one of the variant equal to the default settings."""
    out = list(verdicts)
    default = defaults.method_id(defaults.RISE)
    for v in verdicts:
        name = v.method.split(":", 1)[1] if v.method.startswith("df_rise:") else None
        if name and name in defaults.VARIANTS and defaults.VARIANTS[name].same_method(defaults.RISE):
            out.append(sanity.MethodVerdict("df_rise", v.passes, {**v.numbers, "variant": name}, v.measured_on, f"the default DF-RISE ({name})", v.model))
    assert default == "df_rise"
    return [replace(v, note=failure_note(v)) if not v.passes else v for v in out]


def failure_note(v) -> str:
    """Why a verdict fails, in words, from its own numbers."""
    why = []
    if v.randomization_rho is not None and v.randomization_rho >= sanity.RANDOMIZATION_LIMIT:
        why.append("the map survives model randomisation")
    if v.null_rho is not None and v.null_rho >= sanity.NULL_LIMIT:
        why.append("a null model (a network that ignores its input) reproduces it: it follows the input (identity path)")
    seed = v.numbers.get("seed_rho")
    if seed is not None and seed < sanity.SEED_LIMIT:
        why.append(f"it is mostly mask noise at {v.numbers.get('masks', '?')} masks")
    head = "the published algorithm" if v.method == "df_rise:paper" else v.note
    return f"{head}: " + "; ".join(why) if why else head


def merged(base: dict, extra: dict) -> dict:
    """``base``'s rows with ``extra``'s DF-RISE variants and guidance maps added (the same prompts, in order)."""
    if [r["caption"] for r in base["rows"]] != [r["caption"] for r in extra["rows"]]:
        raise SystemExit("--merge: the two runs explained different prompts")
    for row, more in zip(base["rows"], extra["rows"]):
        row.update({k: v for k, v in more.items() if k.startswith(("df_rise:", "guidance_"))})
    base["args"]["variants"] = list(dict.fromkeys(base["args"]["variants"] + extra["args"]["variants"]))
    base["log"] = base.get("log", []) + extra.get("log", [])  # both runs' per-prompt lines
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--masks", type=int, default=32)
    p.add_argument("--token-masks", type=int, default=32)
    p.add_argument("--token-step", type=int, default=6)
    p.add_argument("--cascade", type=int, default=1, help="prompts with the cascading randomisation")
    p.add_argument("--variants", nargs="*", default=["paper", "x0-negmse-centered", "epsilon-negmse-centered", "grid4-structure-centered"])
    p.add_argument("--cascade-variant", default="grid4-structure-centered")
    p.add_argument("--maps", nargs="*", default=["all"], choices=["all", "df_rise", "guidance"], help="'df_rise': only the DF-RISE variants; 'guidance': only the guidance maps")
    p.add_argument("--merge", default=None, help="a sanity.json whose rows (same prompts) this run's maps are added to")
    p.add_argument("--from-json", default=None)
    p.add_argument("--name", default="sanity", help="results file names: benchmarks/results/<name>.txt / .json")
    p.add_argument("--write-verdicts", action="store_true")
    args = p.parse_args(argv)
    args.maps = args.maps if args.maps in (["df_rise"], ["guidance"]) else ["word_heatmap", "df_rise", "guidance"]
    vc.one_thread()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        if args.merge:
            data = merged(data, json.loads(Path(args.merge).read_text()))
        log = vc.summary_log(args.name, data)
    else:
        log = vc.Tee(args.name)
        data = run(args, log)
        data["log"] = list(log.lines)
        if args.merge:
            data = merged(json.loads(Path(args.merge).read_text()), data)
    if args.merge or not args.from_json:
        (vc.RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    verdicts = verdicts_for_front_ends(summary(data, log))
    if args.write_verdicts:
        sanity.write_verdicts(verdicts, MODEL_ID, aliases=["shapes-64"])
        log(f"verdicts written to {sanity.VERDICTS_FILE}")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
