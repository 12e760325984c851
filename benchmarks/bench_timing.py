#!/usr/bin/env python
"""Causal concept timing against the shapes world's ground truth (issue 12, R2 answered causally).

    nice python benchmarks/bench_timing.py --n 30

Held-out prompts as in validity_common (embedded model, 20 steps, guidance 5). Attributes: the
colour, shape and size of each caption object and the layout (position / relation / row).

* **ground truth (settle step)**: decode the traced x0 of every step; an attribute settles at the
  first step from which the attribute checker finds it correct in every later step's x0
  (attributes wrong in the final image are left out);
* **causal decision step** (`explain.methods.timing.concept_timing`, mode "from"): the attribute's
  words are removed from the conditioning from step s on (the prompt re-encoded without them;
  ``--removal mask`` masks their token positions instead, which CLIP's later tokens undo) (s = 0, ``--every``, …) and the run is
  re-done to the end; the decision step is the first s from which the attribute stays correct in
  the decoded result (checker), and, model-agnostically, the first s from which the final latent's
  change stays below half of the whole-run removal's (``latent`` column);
* **attention-share baselines** (`explain.methods.concepts`): the step of the words' largest
  attention share (peak) and their emergence step.

Agreement: over pairs of attributes of one prompt whose settle steps differ, the share whose
decision steps are in the same order (ties count one half; "strict": ties count as wrong); also
split into pairs of two kinds (a colour and a shape) and of one kind (two objects' colours). The
sceptic's baseline ``kind_prior`` gives each attribute its kind's mean settle step over the other
prompts: colour-before-shape alone, without looking at the model.
Bar: >= 80 % (attention-share peaks: 13 % in the reviewer's measurement).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validity_common as vc  # noqa: E402

from explain.adapters.diffusers import from_pipeline, vae_decoder  # noqa: E402
from explain.embedded import checker, world  # noqa: E402
from explain.methods import concepts, defaults  # noqa: E402
from explain.methods import faithfulness as fa  # noqa: E402
from explain.sweep.words import contrast  # noqa: E402
from explain.methods.timing import concept_onset, concept_timing, decision_from_correct  # noqa: E402

ATTRS = ("color", "shape", "size")


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in x]


def attribute_ok(check: checker.SceneCheck, attr) -> bool:
    kind, k = attr
    if kind == "layout":
        return bool(check.layout_ok)
    return bool(getattr(check, f"{kind}_ok")[k])


def attributes(trace, scene) -> list[tuple[tuple, list[int]]]:
    """(attribute, caption word indices) for each object's colour / shape / size and the layout."""
    words = world.caption_words(scene.caption)
    if [w.text.lower() for w in trace.words[0]] != [w.lower() for w in words]:
        return []
    spans = world.object_word_indices(scene)
    out = []
    sizes = {w for ws in world.SIZE_WORDS.values() for w in ws}
    for k, (obj, span) in enumerate(zip(scene.objects, spans)):
        for idx in span:
            w = words[idx]
            kind = "color" if w == obj.color else "shape" if w == obj.shape else "size" if w in sizes else None
            if kind:
                out.append(((kind, k), [idx]))
    prefix = next((len(p.split()) for p in sorted(world.PREFIXES, key=len, reverse=True) if p and scene.caption.startswith(p)), 0)
    taken = {i for span in spans for i in span}
    layout = [i for i in range(prefix, len(words)) if i not in taken and words[i] not in ("a", "an", "and", ",")]
    if layout:
        out.append((("layout", -1), layout))
    return out


def edited_caption(caption: str, idx: list[int], removal: str) -> str | None:
    """The caption with the attribute's words removed (``reencode``) or swapped for a
    contrasting value (``swap``, `explain.sweep.words.contrast`: another colour or shape the
    caption does not use, the other size, the opposite relation or side; None when no word of
    the attribute has one, as "in a row" or "in the center")."""
    words = world.caption_words(caption)
    if removal == "swap":
        out = list(words)
        changed = False
        for j in idx:
            new = contrast(words[j], avoid=words)
            if new is not None:
                out[j] = new
                changed = True
        if not changed:
            return None
        return " ".join(out).replace(" ,", ",")
    return " ".join(w for j, w in enumerate(words) if j not in idx).replace(" ,", ",")


def counterfactual_captions(caption: str, attrs, removal: str) -> list[str]:
    """One edited caption per attribute; an attribute without a contrasting value (a row
    layout) is removed instead of swapped."""
    edited = [edited_caption(caption, idx, removal) for _, idx in attrs]
    return [e if e is not None else edited_caption(caption, idx, "reencode") for e, (_, idx) in zip(edited, attrs)]


def settle_step(correct: list[bool]) -> int | None:
    if not correct[-1]:
        return None
    return decision_from_correct(correct, list(range(len(correct))))


def kind_of(attr: str) -> str:
    return ast.literal_eval(attr)[0]


def pair_agreement(truth: dict, pred: dict, same_kind: bool | None = None) -> tuple[float, float, int]:
    """(with ties as one half, strict, number of pairs) over attribute pairs with distinct truth;
    ``same_kind`` True / False keeps only pairs of one kind (two colours) / of two kinds."""
    keys = [a for a in truth if truth[a] is not None and pred.get(a) is not None]
    half = strict = n = 0
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if truth[a] == truth[b]:
                continue
            if same_kind is not None and (kind_of(a) == kind_of(b)) != same_kind:
                continue
            n += 1
            d = np.sign(truth[a] - truth[b]) * np.sign(pred[a] - pred[b])
            half += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            strict += 1.0 if d > 0 else 0.0
    return half, strict, n


def with_kind_prior(rows: list[dict]) -> list[dict]:
    """Each row with a ``kind_prior`` column: every attribute gets the mean settle step of its
    kind (colour, shape, size, layout) over the *other* prompts, the sceptic's baseline that
    knows nothing about this prompt or this model run, only that colours tend to settle first."""
    out = []
    for i, r in enumerate(rows):
        steps: dict[str, list[int]] = {}
        for j, other in enumerate(rows):
            if j != i:
                for a, t in other["truth"].items():
                    if t is not None:
                        steps.setdefault(kind_of(a), []).append(t)
        prior = {a: float(np.mean(steps[kind_of(a)])) if steps.get(kind_of(a)) else None for a in r["truth"]}
        out.append({**r, "kind_prior": prior})
    return out


def onset_columns(pipe, tr, den, scene, attrs, words, decode, rand_unet) -> dict:
    """Onset steps (`concept_onset`) of each attribute, with the words swapped (in distribution)
    or removed, in decoded pixels and in the latent, and the swap on a randomised UNet."""
    def denoisers(removal, unet=None):
        return [from_pipeline(pipe, tr, prompt=e, unet=unet) for e in counterfactual_captions(scene.caption, attrs, removal)]

    swap, remove = denoisers("swap"), denoisers("reencode")
    out = {}
    for key, base, cfs, dec in (
        ("onset_swap", den, swap, decode),
        ("onset_remove", den, remove, decode),
        ("onset_swap_latent", den, swap, None),
        ("onset_swap_random", from_pipeline(pipe, tr, unet=rand_unet), denoisers("swap", rand_unet), decode),
    ):
        onset = concept_onset(base, tr, words, counterfactuals=cfs, decode=dec, **defaults.ONSET.kwargs())
        out[key] = {str(a): onset.onset_step[i] for i, (a, _) in enumerate(attrs)}
    return out


def run(args, log) -> dict:
    pipe = vc.load()
    decode = vae_decoder(pipe.vae)
    rand_unet = fa.randomized_copy(pipe.unet, seed=7)
    samples = vc.samples(pipe, args.n, log=log, seed=args.prompt_seed)
    rows = rows_from_log(args.resume_log) if args.resume_log else []
    done = {r["caption"] for r in rows}
    for k, s in enumerate(samples):
        if s.scene.caption in done:
            continue
        tr = s.trace
        den = from_pipeline(pipe, tr)
        attrs = attributes(tr, s.scene)
        if not attrs:
            continue
        with torch.no_grad():
            x0_images = to_uint8(decode(tr.x0[:, 0].float()))
        checks = [checker.check_scene(img, s.scene) for img in x0_images]
        truth = {str(a): settle_step([attribute_ok(c, a) for c in checks]) for a, _ in attrs}
        steps = list(range(0, tr.num_steps, args.every))
        words = [[tr.words[0][i] for i in idx] for _, idx in attrs]
        onsets = onset_columns(pipe, tr, den, s.scene, attrs, words, decode, rand_unet)
        if args.onset_only:
            rows.append({"caption": s.scene.caption, "truth": truth, **onsets})
            log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: truth {truth} | onset (swap) {onsets['onset_swap']}")
            continue
        counterfactuals = None
        if args.removal in ("reencode", "swap"):
            counterfactuals = [from_pipeline(pipe, tr, prompt=e) for e in counterfactual_captions(s.scene.caption, attrs, args.removal)]
        timing = concept_timing(den, tr, words, steps=steps, mode="from", counterfactuals=counterfactuals)
        with torch.no_grad():
            finals = to_uint8(decode(timing.finals.flatten(0, 1)))
        finals = [finals[i * len(steps) : (i + 1) * len(steps)] for i in range(len(attrs))]
        causal, latent = {}, {}
        for i, (a, _) in enumerate(attrs):
            ok = [attribute_ok(checker.check_scene(img, s.scene), a) for img in finals[i]]
            causal[str(a)] = decision_from_correct(ok, steps)
            latent[str(a)] = timing.decision_step[i]
        scores = concepts.concept_scores(tr, words)
        peak = {str(a): scores.peak_step[i] for i, (a, _) in enumerate(attrs)}
        emergence = {str(a): scores.emergence_step[i] for i, (a, _) in enumerate(attrs)}
        row = {"caption": s.scene.caption, "truth": truth, "causal": causal, "latent": latent, "peak": peak, "emergence": emergence, **onsets}
        rows.append(row)
        log(f"  {k + 1}/{len(samples)} {s.scene.caption!r}: truth {truth} | causal {causal} | attention peak {peak}")
    return {"rows": rows, "args": vars(args)}


def rows_from_log(path) -> list[dict]:
    """The per-prompt lines an interrupted run printed (``k/n 'caption': truth {...} | causal
    {...} | attention peak {...}``) as rows: their latent and emergence columns were not printed,
    so those rows count only in the checker-based and attention-peak comparisons."""
    rows = []
    for line in Path(path).read_text().splitlines():
        m = re.match(r"\s*\d+/\d+ (['\"])(.*)\1: truth (\{.*?\}) \| causal (\{.*?\}) \| attention peak (\{.*\})\s*$", line)
        if m:
            rows.append({"caption": m.group(2), "truth": ast.literal_eval(m.group(3)), "causal": ast.literal_eval(m.group(4)), "peak": ast.literal_eval(m.group(5)), "from_log": True})
    return rows


def report(data, log) -> None:
    rows = with_kind_prior(data["rows"])
    log("")
    how = {
        "reencode": "removed (prompt re-encoded without the words)",
        "swap": "swapped for a contrasting value (another colour / shape, the other size, the opposite relation or side; 'in a row' / 'in the center' removed)",
        "mask": "removed (token positions masked)",
    }[data["args"].get("removal", "reencode")]
    if data["args"].get("onset_only"):
        log(f"Concept timing | embedded shapes-64 | {len(rows)} held-out prompts (prompt seed {data['args'].get('prompt_seed', vc.PROMPT_SEED)}), 20 steps, onset only (no lock-in re-runs)")
    else:
        log(f"Concept timing | embedded shapes-64 | {len(rows)} held-out prompts (prompt seed {data['args'].get('prompt_seed', vc.PROMPT_SEED)}), 20 steps; lock-in: words {how} from step s on, s every {data['args']['every']} steps")
    resumed = sum(1 for r in rows if r.get("from_log"))
    if resumed:
        log(f"  ({resumed} prompts' rows from an interrupted run's log: they have no latent / emergence columns)")
    log(f"  {'decision step from':44s} {'agreement':>10s} {'strict':>8s} {'pairs':>6s}   {'2 kinds':>8s} {'1 kind':>8s}   (bar >= 80 %)")
    for key, label in (
        ("onset_swap", "onset: word swapped, effect on x0 (decoded)"),
        ("onset_remove", "onset: word removed, effect on x0 (decoded)"),
        ("onset_swap_latent", "onset: word swapped, effect on x0 (latent)"),
        ("onset_swap_random", "onset, swapped, randomised UNet (baseline)"),
        ("kind_prior", "kind's mean settle, other prompts (baseline)"),
        ("causal", "lock-in: edited from s on, checker on result"),
        ("latent", "lock-in: edited from s on, latent change"),
        ("peak", "attention-share peak (baseline)"),
        ("emergence", "attention-share emergence (baseline)"),
    ):
        if not any(key in r for r in rows):
            continue
        totals = {}
        for split in (None, False, True):
            h = s = n = 0
            for r in rows:
                if key not in r:  # a row recovered from an interrupted run's log
                    continue
                a, b, c = pair_agreement(r["truth"], r[key], split)
                h, s, n = h + a, s + b, n + c
            totals[split] = (100 * h / max(n, 1), 100 * s / max(n, 1), n)
        (h, s, n), cross, same = totals[None], totals[False][0], totals[True][0]
        log(f"  {label:44s} {h:9.1f} % {s:7.1f} % {n:6d}   {cross:6.1f} % {same:6.1f} %")
    by_kind: dict[str, list] = {}
    columns = [c for c in ("onset_swap", "causal", "peak") if any(c in r for r in rows)]
    for r in rows:
        for a, t in r["truth"].items():
            if t is None:
                continue
            kind = kind_of(a)
            by_kind.setdefault(kind, []).append([t] + [r.get(c, {}).get(a) for c in columns])
    names = {"onset_swap": "onset (swap)", "causal": "lock-in", "peak": "attention peak"}
    log("")
    log(f"  mean step by attribute (ground-truth settle | {' | '.join(names[c] for c in columns)}; attributes wrong in the final image left out):")
    for kind, v in by_kind.items():
        cells = [f"settle {vc.mean([x[0] for x in v]):5.2f}"] + [f"{names[c]} {vc.mean([x[i + 1] for x in v if x[i + 1] is not None]):5.2f}" for i, c in enumerate(columns)]
        log(f"    {kind:7s} n={len(v):3d}  " + " | ".join(cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--every", type=int, default=3, help="test removal from every k-th step")
    p.add_argument("--removal", default="reencode", choices=["reencode", "swap", "mask"],
                   help="remove a word by re-encoding the prompt without it (default) or by masking its token positions")
    p.add_argument("--resume-log", default=None, help="a log of an interrupted run: its prompts' rows are taken from it, not re-run")
    p.add_argument("--from-json", default=None)
    p.add_argument("--prompt-seed", type=int, default=vc.PROMPT_SEED, help="the held-out caption draw (another seed: a development set)")
    p.add_argument("--onset-only", action="store_true", help="measure only the onset columns (no re-runs; minutes, not a quarter hour)")
    p.add_argument("--tag", default="", help="appended to the result files' names (a pilot run)")
    args = p.parse_args(argv)
    vc.one_thread()
    suffix = "" if args.removal == "reencode" else f"_{args.removal}"
    name = f"timing{suffix}{args.tag}"
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        log = vc.summary_log(name, data)
    else:
        log = vc.Tee(name)
        data = run(args, log)
        data["log"] = list(log.lines)
        (vc.RESULTS / f"{name}.json").write_text(json.dumps(data))
    report(data, log)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
