#!/usr/bin/env python
"""Do the embedded DiT's word maps point at the right object? Real evidence: no grounding loss.

    python benchmarks/bench_dit_pointing.py                        # 36 held-out captions, both protocols
    python benchmarks/bench_dit_pointing.py --n 8 --rise-masks 32  # a quick look
    python benchmarks/bench_dit_pointing.py --out benchmarks/results/dit_pointing.txt

The shipped UNet model (``shapes-64``) was trained with a grounding loss on its cross-attention,
so pointing there only checks the plumbing. The MMDiT (``shapes-dit-64``) was trained with the
flow-matching loss alone: if its maps point, the model learned where the objects are by itself.
All captions are held out (`explain.embedded.world.is_held_out`: attribute combinations the model
never saw), drawn from a seed no test and no other benchmark uses.

Each object's map merges the caption words that name it (size, colour, shape;
`world.object_word_indices`), averaged over the chosen steps, upsampled bilinearly to 64 px:

* ``joint attention``: the image-query × text-key slice of each block's joint softmax, heads
  averaged, rows renormalised over the text (the tap's default, ``maps="attention"``);
* ``output space``: ConceptAttention's maps (Helbling et al. 2025): softmax over the prompt's
  text tokens of image outputs · text outputs (``maps="output"``; blocks 0-2, the last block has
  no text output);
* ``concept stream``: ConceptAttention proper: 18 concepts (every colour-shape pair, "red
  circle", ...) run as a separate stream the image never sees; an object's map is its own
  colour-shape concept's, a softmax over all 18 (blocks averaged; the tap keeps no per-block
  concept maps);
* ``per-token DF-RISE``: `explain.methods.rise.df_rise_tokens` (random token subsets dropped to
  the unconditional context; E[x0 structure similarity | word kept] - E[... | dropped]).

Scores (objects pooled): **pointing** (the map's maximum inside the object's mask; a flat map is
a miss) and **mIoU** (the min-max normalised map cut at 0.5 against the mask). Beside every figure:
**chance** (the mean mask area: a uniformly random maximum), a **centred Gaussian** map
(σ = a quarter of the side: it points at the image centre, where objects often are) and the
**randomised model** (Adebayo et al. 2018): the same method on the same latents with every
transformer weight re-initialised (`explain.methods.faithfulness.randomized_copy`; the text
encoders and VAE stay trained). A map that is evidence about the model beats all three.

Protocols:

* ``noised`` (exact masks): the renderer's image of a held-out scene, VAE-encoded, noised to
  σ (flow matching: x_t = (1-σ)·x0 + σ·ε), one guided model call with the caption; masks are
  the renderer's. Per σ: which noise levels localise best.
* ``generated`` (the model's own images): 20 steps, guidance 5; the attribute checker segments
  the image and matches objects to the caption (objects it cannot find are not scored, and
  counted). The randomised model replays the trained run's latents step by step. Per block and
  per third of the steps: which blocks and steps localise best.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.embedded import world  # noqa: E402
from explain.methods import heatmaps  # noqa: E402

SIZE = 64
CAPTION_SEED = 1414  # this benchmark's own held-out captions
CONCEPTS = [f"{c} {s}" for c in world.COLORS for s in world.SHAPES]
ALL = "all"


# ---------------------------------------------------------------------------- scoring
@dataclass
class Tally:
    hits: int = 0
    ious: list = field(default_factory=list)
    areas: list = field(default_factory=list)

    def add(self, heat: torch.Tensor, mask: torch.Tensor) -> None:
        heat = upsample(heat)
        flat = float(heat.max() - heat.min()) <= 1e-9
        self.hits += int(not flat and heatmaps.pointing_hit(heat, mask))
        self.ious.append(0.0 if flat else heatmaps.mask_iou(heat, mask, 0.5))
        self.areas.append(float(mask.float().mean()))

    @property
    def n(self) -> int:
        return len(self.ious)

    @property
    def pointing(self) -> float:
        return 100.0 * self.hits / max(self.n, 1)

    @property
    def miou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    def cell(self) -> str:
        return f"{self.pointing:5.1f} %  {self.miou:.3f}" if self.n else "    -        -"


def upsample(heat: torch.Tensor) -> torch.Tensor:
    heat = heat.float()
    if tuple(heat.shape) != (SIZE, SIZE):
        heat = F.interpolate(heat[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    return heat


def centred_gaussian(size: int = SIZE) -> torch.Tensor:
    r = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    return torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 0.25**2))


class Baselines:
    def __init__(self):
        self.gauss = Tally()
        self.gauss_map = centred_gaussian()

    def add(self, mask: torch.Tensor) -> None:
        self.gauss.add(self.gauss_map, mask)

    def line(self) -> str:
        g = self.gauss
        return (f"{g.n} objects; chance pointing (mean mask area) {100 * np.mean(g.areas):.1f} %; "
                f"centred Gaussian: pointing {g.pointing:.1f} %, mIoU {g.miou:.3f}")


# ---------------------------------------------------------------------------- maps from a trace
def object_positions(trace, item: int, scene: world.Scene) -> list[list[int]]:
    """Token positions (the trace's token axis) of each object's words."""
    words = trace.words[item]
    caption = [w.lower() for w in world.caption_words(scene.caption)]
    if [w.text.lower() for w in words] != caption:
        raise RuntimeError(f"the trace split {scene.caption!r} into other words: {[w.text for w in words]}")
    return [sorted({i for j in span for i in words[j].token_indices}) for span in world.object_word_indices(scene)]


def concept_index(obj) -> int:
    return CONCEPTS.index(f"{obj.color} {obj.shape}")


def block_maps(trace, item: int) -> dict[str, torch.Tensor]:
    """Per block ``[S, T, h, w]`` word maps of one item, and their mean over blocks."""
    blocks = {name.split(".")[1]: t[:, item].float() for name, t in trace.attention_layers.items()}
    out = {f"block {k}": v for k, v in sorted(blocks.items())}
    out[ALL] = torch.stack(list(blocks.values())).mean(0)
    return out


def concat_steps(traces: list, item: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Block maps and concept maps of a run replayed one step per trace, steps stacked."""
    parts = [block_maps(t, item) for t in traces]
    maps = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    concepts = None
    if traces[0].concept_maps is not None:
        concepts = torch.cat([t.concept_maps[:, item].float() for t in traces])
    return maps, concepts


# ---------------------------------------------------------------------------- models
def randomized_pipeline(pipe, seed: int = 0):
    """The same pipeline with a re-initialised transformer (text encoders and VAE shared)."""
    from diffusers import StableDiffusion3Pipeline

    from explain.methods.faithfulness import randomized_copy

    parts = {k: v for k, v in pipe.components.items()}
    parts["transformer"] = randomized_copy(pipe.transformer, seed=seed)
    rpipe = StableDiffusion3Pipeline(**parts)
    rpipe.set_progress_bar_config(disable=True)
    return rpipe


def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    latent = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean
    return (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def one_call(pipe, captions, latents, sigma: float, guidance: float, maps: str):
    """One guided model call at ``sigma`` under the tap; its trace (one step)."""
    from explain.adapters.diffusers import trace as tap

    concepts = CONCEPTS if maps == "output" else None
    with tap(pipe, previews=False, keep_layers=True, maps=maps, concepts=concepts) as tr:
        pipe(list(captions), latents=latents, sigmas=[float(sigma)], num_inference_steps=1, guidance_scale=guidance,
             output_type="latent", max_sequence_length=0)
    return tr.trace


def token_rise(pipe, trace, item: int, step: int, masks: int, model=None, seed: int = 0):
    from explain.adapters.diffusers import from_pipeline
    from explain.methods.rise import df_rise_tokens

    den = from_pipeline(pipe, trace, item=item, model=model)
    return df_rise_tokens(den, trace, step, item, n_masks=masks, seed=seed, batch_size=masks).maps


# ---------------------------------------------------------------------------- tallies
class Table:
    """(method, block or σ or steps) -> trained / randomised tallies."""

    def __init__(self):
        self.rows: dict[tuple[str, str], tuple[Tally, Tally]] = {}

    def get(self, method: str, where: str) -> tuple[Tally, Tally]:
        return self.rows.setdefault((method, where), (Tally(), Tally()))

    def lines(self) -> list[str]:
        out = [f"  {'method':28s} {'where':16s} {'trained: pointing  mIoU':>24s}   {'randomised: pointing  mIoU':>27s}"]
        for (method, where), (tr, rnd) in self.rows.items():
            out.append(f"  {method:28s} {where:16s} {tr.cell():>24s}   {rnd.cell():>27s}")
        return out


def score_maps(table: Table, method: str, maps: dict[str, torch.Tensor], positions, masks, randomised: bool, steps: dict[str, slice]):
    for where_steps, chosen in steps.items():
        for block, m in maps.items():
            if where_steps != ALL and block != ALL:
                continue  # per-block rows over all steps, per-step rows over all blocks
            where = block if where_steps == ALL else where_steps
            tally = table.get(method, where)[int(randomised)]
            avg = m[chosen].mean(0)
            for pos, mask in zip(positions, masks):
                tally.add(avg[pos].mean(0), mask)


def score_concepts(table: Table, concepts: torch.Tensor, objects, masks, randomised: bool, steps: dict[str, slice]):
    for where, chosen in steps.items():
        tally = table.get("concept stream (output)", where)[int(randomised)]
        avg = concepts[chosen].mean(0)
        for obj, mask in zip(objects, masks):
            tally.add(avg[concept_index(obj)], mask)


# ---------------------------------------------------------------------------- protocols
def run_noised(pipe, rpipe, scenes, sigmas, guidance, batch, masks, seed, log):
    out = {}
    for sigma in sigmas:
        table, base = Table(), Baselines()
        t0 = time.process_time()
        for start in range(0, len(scenes), batch):
            chunk = scenes[start : start + batch]
            rendered = [world.render(s, SIZE) for s in chunk]
            with torch.no_grad():
                x0 = encode_images(pipe, np.stack([img for img, _ in rendered]))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + start))
            x_t = (1 - sigma) * x0 + sigma * noise
            for randomised, p in ((False, pipe), (True, rpipe)):
                att = one_call(p, [s.caption for s in chunk], x_t, sigma, guidance, "attention")
                out_tr = one_call(p, [s.caption for s in chunk], x_t, sigma, guidance, "output")
                for b, (scene, (_, ms)) in enumerate(zip(chunk, rendered)):
                    mask_list = [torch.from_numpy(m) for m in ms]
                    if not randomised:
                        for m in mask_list:
                            base.add(m)
                    positions = object_positions(att, b, scene)
                    score_maps(table, "joint attention", block_maps(att, b), positions, mask_list, randomised, {ALL: slice(None)})
                    score_maps(table, "output space (prompt words)", block_maps(out_tr, b), object_positions(out_tr, b, scene),
                               mask_list, randomised, {ALL: slice(None)})
                    score_concepts(table, out_tr.concept_maps[:, b].float(), scene.objects, mask_list, randomised, {ALL: slice(None)})
                    if masks:
                        rise = token_rise(pipe, att, b, 0, masks, model=rpipe.transformer if randomised else None, seed=seed)
                        tally = table.get("per-token DF-RISE", ALL)[int(randomised)]
                        for pos, m in zip(positions, mask_list):
                            tally.add(rise[pos].mean(0), m)
        out[sigma] = (table, base)
        log(f"\nprotocol noised, sigma = {sigma:g} (exact masks) [{time.process_time() - t0:.0f} s CPU]")
        log("  baselines: " + base.line())
        for line in table.lines():
            log(line)
    return out


def run_generated(pipe, rpipe, scenes, steps, guidance, masks, rise_steps, seed, log):
    from explain.adapters.diffusers import generate
    from explain.embedded import checker

    table, base = Table(), Baselines()
    thirds = {ALL: slice(None), **dict(heatmaps.step_thirds(steps))}
    missing = 0
    t0 = time.process_time()
    for i, scene in enumerate(scenes):
        att, images = generate(pipe, scene.caption, steps=steps, guidance=guidance, seed=seed + i, previews=False, keep_layers=True,
                               output_type="np")
        out_tr, _ = generate(pipe, scene.caption, steps=steps, guidance=guidance, seed=seed + i, previews=False, keep_layers=True,
                             maps="output", concepts=CONCEPTS, output_type="np")
        image = (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)
        found = checker.check_scene(image, scene).matches
        keep = [k for k, d in enumerate(found) if d is not None]
        missing += len(found) - len(keep)
        if not keep:
            continue
        objects = [scene.objects[k] for k in keep]
        mask_list = [torch.from_numpy(found[k].mask) for k in keep]
        for m in mask_list:
            base.add(m)
        positions = [object_positions(att, 0, scene)[k] for k in keep]
        # the randomised model on the trained run's latents, one step at a time
        replay = {kind: [one_call(rpipe, [scene.caption], att.x_t[s], float(att.sigmas[s]), guidance, kind) for s in range(att.num_steps)]
                  for kind in ("attention", "output")}
        r_att, _ = concat_steps(replay["attention"], 0)
        r_out, r_concepts = concat_steps(replay["output"], 0)
        for randomised, a, o, c in ((False, block_maps(att, 0), block_maps(out_tr, 0), out_tr.concept_maps[:, 0].float()),
                                    (True, r_att, r_out, r_concepts)):
            score_maps(table, "joint attention", a, positions, mask_list, randomised, thirds)
            score_maps(table, "output space (prompt words)", o, positions, mask_list, randomised, thirds)
            score_concepts(table, c, objects, mask_list, randomised, thirds)
        if masks:
            for s in rise_steps:
                for randomised in (False, True):
                    rise = token_rise(pipe, att, 0, s, masks, model=rpipe.transformer if randomised else None, seed=seed)
                    for where in (ALL, f"step {s}"):
                        tally = table.get("per-token DF-RISE", where)[int(randomised)]
                        for pos, m in zip(positions, mask_list):
                            tally.add(rise[pos].mean(0), m)
        if (i + 1) % 6 == 0:
            print(f"  [generated] {i + 1}/{len(scenes)} captions, {time.process_time() - t0:.0f} s CPU", file=sys.stderr, flush=True)
    log(f"\nprotocol generated ({steps} steps, guidance {guidance:g}; checker masks) [{time.process_time() - t0:.0f} s CPU]")
    log(f"  baselines: {base.line()}; {missing} objects not found by the checker (not scored)")
    log(f"  per-token DF-RISE at steps {', '.join(map(str, rise_steps))} ('{ALL}' pools them)")
    for line in table.lines():
        log(line)
    return table, base


def best_rows(table: Table, method: str, prefix: str) -> str:
    rows = [(where, tr) for (m, where), (tr, _) in table.rows.items() if m == method and where.startswith(prefix) and tr.n]
    if not rows:
        return "-"
    where, tr = max(rows, key=lambda r: (r[1].pointing, r[1].miou))
    return f"{where} ({tr.pointing:.1f} %, mIoU {tr.miou:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=36, help="held-out captions")
    p.add_argument("--protocol", choices=("noised", "generated", "both"), default="both")
    p.add_argument("--sigmas", default="0.25,0.5,0.75", help="noise levels of the noised protocol (flow sigma)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--rise-masks", type=int, default=64, help="token masks per per-token DF-RISE map (0: skip it)")
    p.add_argument("--rise-steps", default="5,10,15", help="steps of the generated run given per-token DF-RISE")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="embedded-dit", help="an SD3 pipeline: embedded-dit (default) or a folder")
    p.add_argument("--out", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.rise_masks and any(not 0 <= int(s) < args.steps for s in args.rise_steps.split(",")):
        p.error(f"--rise-steps {args.rise_steps}: each must be a step of the generated run, 0..{args.steps - 1}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from explain.adapters.diffusers.loading import load_model

    lines: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    pipe, name = load_model(args.model, "cpu", "float32", announce=lambda m: None)
    rpipe = randomized_pipeline(pipe, seed=args.seed)
    scenes = world.scenes(args.n, seed=CAPTION_SEED, split="held_out")
    assert all(world.is_held_out(s.key) for s in scenes)
    info = {}
    if args.model == "embedded-dit":
        from explain import embedded

        info = embedded.training_info("dit")
    log(f"bench_dit_pointing: model {name} (trained on {info.get('samples_seen', '?')} samples, grounding loss: "
        f"{info.get('grounding_loss', '?')}); {len(scenes)} held-out captions (seed {CAPTION_SEED}), "
        f"{sum(len(s.objects) for s in scenes)} objects; guidance {args.guidance:g}; per-token DF-RISE {args.rise_masks} masks")
    log(f"command: python benchmarks/bench_dit_pointing.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    noised = generated = None
    if args.protocol in ("noised", "both"):
        sigmas = [float(s) for s in args.sigmas.split(",")]
        noised = run_noised(pipe, rpipe, scenes, sigmas, args.guidance, args.batch, args.rise_masks, args.seed, log)
    if args.protocol in ("generated", "both"):
        rise_steps = [int(s) for s in args.rise_steps.split(",")] if args.rise_masks else []
        generated = run_generated(pipe, rpipe, scenes, args.steps, args.guidance, args.rise_masks, rise_steps, args.seed, log)

    log("\nsummary (trained model; pointing, mIoU@0.5):")
    methods = ("joint attention", "output space (prompt words)", "concept stream (output)", "per-token DF-RISE")
    if noised:
        for method in methods:
            cells = [f"σ={s:g}: {t.get(method, ALL)[0].cell().strip()} (rand. {t.get(method, ALL)[1].cell().strip()})" for s, (t, _) in noised.items()]
            log(f"  noised    {method:28s} " + "; ".join(cells))
        log("  noised    baselines: " + "; ".join(f"σ={s:g}: {b.line()}" for s, (_, b) in noised.items()))
    if generated:
        table, base = generated
        for method in methods:
            tr, rnd = table.get(method, ALL)
            log(f"  generated {method:28s} all steps: {tr.cell().strip()} (randomised {rnd.cell().strip()}); "
                f"best block {best_rows(table, method, 'block')}; best steps {best_rows(table, method, 'step')}")
        log("  generated baselines: " + base.line())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
