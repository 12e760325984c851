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
decision steps are in the same order (ties count one half; "strict": ties count as wrong).
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
from explain.methods import concepts  # noqa: E402
from explain.methods.timing import concept_timing, decision_from_correct  # noqa: E402

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


def settle_step(correct: list[bool]) -> int | None:
    if not correct[-1]:
        return None
    return decision_from_correct(correct, list(range(len(correct))))


def pair_agreement(truth: dict, pred: dict) -> tuple[float, float, int]:
    """(with ties as one half, strict, number of pairs) over attribute pairs with distinct truth."""
    keys = [a for a in truth if truth[a] is not None and pred.get(a) is not None]
    half = strict = n = 0
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if truth[a] == truth[b]:
                continue
            n += 1
            d = np.sign(truth[a] - truth[b]) * np.sign(pred[a] - pred[b])
            half += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            strict += 1.0 if d > 0 else 0.0
    return half, strict, n


def run(args, log) -> dict:
    pipe = vc.load()
    decode = vae_decoder(pipe.vae)
    samples = vc.samples(pipe, args.n, log=log)
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
        counterfactuals = None
        if args.removal == "reencode":
            caption = world.caption_words(s.scene.caption)
            edited = [" ".join(w for j, w in enumerate(caption) if j not in idx).replace(" ,", ",") for _, idx in attrs]
            counterfactuals = [from_pipeline(pipe, tr, prompt=e) for e in edited]
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
        row = {"caption": s.scene.caption, "truth": truth, "causal": causal, "latent": latent, "peak": peak, "emergence": emergence}
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
    rows = data["rows"]
    log("")
    how = "prompt re-encoded without the words" if data["args"].get("removal", "reencode") == "reencode" else "token positions masked"
    log(f"Concept timing | embedded shapes-64 | {len(rows)} held-out prompts, 20 steps, words removed ({how}) from step s on, s every {data['args']['every']} steps")
    resumed = sum(1 for r in rows if r.get("from_log"))
    if resumed:
        log(f"  ({resumed} prompts' rows from an interrupted run's log: they have no latent / emergence columns)")
    log(f"  {'decision step from':44s} {'agreement':>10s} {'strict':>8s} {'pairs':>6s}   (bar >= 80 %)")
    for key, label in (("causal", "causal removal, checker on the result"), ("latent", "causal removal, latent change (no checker)"), ("peak", "attention-share peak (baseline)"), ("emergence", "attention-share emergence (baseline)")):
        h = s = n = 0
        for r in rows:
            if key not in r:  # a row recovered from an interrupted run's log
                continue
            a, b, c = pair_agreement(r["truth"], r[key])
            h, s, n = h + a, s + b, n + c
        log(f"  {label:44s} {100 * h / max(n, 1):9.1f} % {100 * s / max(n, 1):7.1f} % {n:6d}")
    by_kind: dict[str, list] = {}
    for r in rows:
        for a, t in r["truth"].items():
            kind = eval(a)[0]  # noqa: S307 (our own repr of a tuple of a str and an int)
            by_kind.setdefault(kind, []).append((t, r["causal"][a], r["peak"][a]))
    log("")
    log("  mean step by attribute (ground-truth settle | causal decision | attention peak; attributes wrong in the final image left out):")
    for kind, v in by_kind.items():
        v = [x for x in v if x[0] is not None]
        log(f"    {kind:7s} n={len(v):3d}  settle {vc.mean([x[0] for x in v]):5.2f} | causal {vc.mean([x[1] for x in v]):5.2f} | peak {vc.mean([x[2] for x in v]):5.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--every", type=int, default=3, help="test removal from every k-th step")
    p.add_argument("--removal", default="reencode", choices=["reencode", "mask"],
                   help="remove a word by re-encoding the prompt without it (default) or by masking its token positions")
    p.add_argument("--resume-log", default=None, help="a log of an interrupted run: its prompts' rows are taken from it, not re-run")
    p.add_argument("--from-json", default=None)
    args = p.parse_args(argv)
    vc.one_thread()
    log = vc.Tee("timing" if args.removal == "reencode" else "timing_mask")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = run(args, log)
        (vc.RESULTS / f"timing{'' if args.removal == 'reencode' else '_mask'}.json").write_text(json.dumps(data))
    report(data, log)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
