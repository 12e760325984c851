"""``python -m explain sweep PROMPTS --out DIR``: the command line of the dataset sweep.

    python -m explain sweep captions.txt --out sweep-out                       # one process
    python -m explain sweep --shapes-world 200 --split held_out --out gt       # ground-truth mode
    accelerate launch --num_processes 8 -m explain sweep captions.txt --out sweep-out \\
        --protocol paper --model CompVis/stable-diffusion-v1-4                  # 8 GPUs
    torchrun --nproc_per_node 8 -m explain sweep ...                           # the same with torchrun

Run it again with the same arguments to resume; ``--report-only`` rebuilds the tables and the
report from what is done.
"""

from __future__ import annotations

import argparse
import os
import sys

from explain.cli import positive_int


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to ``python -m explain``'s subparsers."""
    from explain.sweep.protocol import (  # light: no torch until the command runs
        GAME_SPACES,
        PROTOCOLS,
    )

    p = subparsers.add_parser(
        "sweep",
        help="explain thousands of prompts: a resumable sweep, on one CPU or many GPUs (accelerate launch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="?", help="a .txt (one prompt per line), .csv (a 'prompt' column) or .jsonl file; optional id, seed, negative and ground-truth fields")
    p.add_argument("--out", required=True, help="output folder (re-run with the same folder to resume)")
    p.add_argument("--format", choices=("txt", "csv", "jsonl"), default=None, help="the prompt file's format (default: from its extension)")
    p.add_argument("--shapes-world", type=positive_int, default=None, metavar="N", help="ground-truth mode: N shapes-world scenes instead of a prompt file")
    p.add_argument("--split", choices=("held_out", "train", "any"), default="held_out", help="which scenes for --shapes-world (default held_out: combinations the model never saw)")
    p.add_argument("--world-seed", type=int, default=0, help="which scenes for --shapes-world (default 0)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="default", help="paper: the published setup (20 DPM-Solver++ steps, guidance 7.5, seed 1, DF-RISE at step 15 with 500 masks); default: the project's validated defaults")
    p.add_argument("--analyses", default="default", help="comma-separated names, 'default' or 'all' (every available one but traces); --list-analyses shows them")
    p.add_argument("--list-analyses", action=_ListAnalyses, help="print the analyses, what each measures and costs, and exit")
    p.add_argument("--subset", default=None, metavar="NAME=N,...", help="run an analysis on the file's first N rows only, e.g. rise=50,cam=50")
    p.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded shapes model; 'tiny' = random weights, for tests)")
    p.add_argument("--device", default="auto", help="auto (each process its own GPU under accelerate, else cuda when available), cpu, cuda:1, ...")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="weights dtype (default: see explain.precision)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process (default: 1 on a busy machine, else the cores divided among the processes)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: 5 for the embedded model, else 7.5; paper 7.5)")
    p.add_argument("--explain-step", type=int, default=None, help="0-based step DF-RISE/DF-CAM explain (default: the paper's 15th of 20, scaled)")
    p.add_argument("--schedule", choices=("uniform", "early", "latter"), default="uniform", help="time-step sampling (default uniform)")
    p.add_argument("--lam", type=int, default=60, help="lambda of the early/latter schedules (default 60)")
    p.add_argument("--seed", type=int, default=0, help="sweep seed: a row without a seed gets one derived from it and the row's id (default 0)")
    p.add_argument("--masks", type=positive_int, default=None, help="DF-RISE masks (default: the protocol's)")
    p.add_argument("--baselines", default=None, help="comma-separated game baselines (default: random for paper; random,xt_magnitude,xt_detail,center otherwise)")
    p.add_argument("--game-space", choices=GAME_SPACES, default=None, help="insertion/deletion scored on latents, decoded images or both (default both)")
    p.add_argument("--retry-failed", action="store_true", help="run the prompts that failed before again")
    p.add_argument("--restart", action="store_true", help="discard the folder's results and start over")
    p.add_argument("--strict", action="store_true", help="stop on an invalid row instead of recording it")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables and the report from the folder, without a model")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="a progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")
    p.add_argument("--quiet", action="store_true", help="print only the report's path")
    p.set_defaults(func=cmd_sweep)
    return p


class _ListAnalyses(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from explain.sweep.analyses import (
            ANALYSES,
            DEFAULT_ANALYSES,
            GROUND_TRUTH,
            PAPER_ANALYSES,
        )

        for name, a in ANALYSES.items():
            status = f"hook, not available yet: {a.hook}" if not a.available else (f"cost: {a.cost}" if a.cost else "")
            print(f"{name:14s} {a.summary}" + (f" [{status}]" if status else ""))
        print(f"\ndefault: {', '.join(DEFAULT_ANALYSES)} (+ {', '.join(GROUND_TRUTH)} with ground truth); --protocol paper: {', '.join(PAPER_ANALYSES)}")
        parser.exit()


def parse_subsets(text: str | None) -> dict[str, int]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, n = part.strip().partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = int(n)
            if out[name.strip()] < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot read --subset {part.strip()!r}; write NAME=N with N >= 1, e.g. rise=50,cam=50") from None
    return out


def _threads(requested: int | None, device: str) -> int | None:
    if requested is not None:
        return requested
    if device not in ("auto", "cpu"):
        return None
    from explain.cli import _auto_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return _auto_threads(max(1, cores // local))


def load_rows(args):
    from explain.sweep import prompts, shapes

    if args.shapes_world is not None and args.prompts:
        raise ValueError("pass either a prompt file or --shapes-world N, not both")
    if args.shapes_world is not None:
        return shapes.scene_rows(args.shapes_world, args.split, args.world_seed), True
    if not args.prompts:
        raise ValueError("pass a prompt file (.txt, .csv or .jsonl) or --shapes-world N")
    rows = prompts.read_prompts(args.prompts, args.format)
    if args.strict:
        bad = [r for r in rows if not r.valid]
        if bad:
            raise prompts.PromptFileError(f"{len(bad)} invalid row(s) (--strict); the first: {bad[0].error}")
    return rows, any("scene" in r.truth for r in rows)


def cmd_sweep(args) -> int:
    from explain.cli import CommandError, Progress
    from explain.sweep import analyses, protocol
    from explain.sweep.manifest import SweepFolder
    from explain.sweep.runner import run_sweep

    # under a launcher only the main process talks; the others' lines would repeat it
    say = Progress(args.quiet or os.environ.get("RANK", "0") not in ("", "0"))
    if args.report_only:
        return _report_only(args, say)
    rows, ground_truth = load_rows(args)
    invalid = [r for r in rows if not r.valid]
    names = analyses.parse_analyses(args.analyses, ground_truth, args.protocol)
    subsets = parse_subsets(args.subset)
    unknown = sorted(set(subsets) - set(names))
    if unknown:
        raise ValueError(f"--subset names {', '.join(unknown)}, which the sweep does not run (--analyses gives {', '.join(names)})")
    from explain.adapters.diffusers.loading import is_embedded

    model = args.model or "embedded"
    settings = protocol.resolve(
        args.protocol,
        model=model,
        embedded=is_embedded(model) or model in ("embedded",),
        steps=args.steps,
        guidance=args.guidance,
        explain_step=args.explain_step,
        schedule=args.schedule,
        lam=args.lam,
        sweep_seed=args.seed,
        masks=args.masks,
        baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()) if args.baselines else None,
        game_space=args.game_space,
        analyses=names,
        subsets=subsets,
    )
    import torch

    threads = _threads(args.threads, args.device)
    if threads:
        torch.set_num_threads(threads)
    if invalid:
        say(f"warning: {len(invalid)} invalid row(s) will be recorded, not run; the first: {invalid[0].error}")
    say(f"sweep of {len(rows)} prompts into {args.out}: protocol {settings.protocol}, analyses {', '.join(names)}" + (f", {threads} CPU thread(s) per process" if threads else ""))

    def load(spec, device, dtype):
        from explain.cli import load_model

        return load_model(spec, device, dtype)

    try:
        summary = run_sweep(rows, args.out, settings, model_spec=args.model, device=args.device, dtype=args.dtype, retry_failed=args.retry_failed, restart=args.restart, progress=False if args.quiet else args.progress, say=say, load_model=load)
    except CommandError:
        raise
    folder = SweepFolder(args.out)
    if summary.report is not None:
        m = summary.manifest
        say(f"done: {m['ok']} ok, {m['error']} failed, {m['invalid']} invalid of {m['total']} ({summary.ran} run by this process in {summary.seconds:.1f} s); report {summary.report}")
        if args.quiet:
            print(summary.report)
    elif not folder.root.exists():
        raise CommandError(f"nothing was written to {args.out}")
    return 0


def _report_only(args, say) -> int:
    from explain.sweep import prompts as prompt_files
    from explain.sweep.manifest import SweepFolder
    from explain.sweep.report import write_outputs

    folder = SweepFolder(args.out)
    config = folder.read_config()
    if config is None:
        raise ValueError(f"{args.out} holds no sweep (no sweep.json); run the sweep first")
    rows = prompt_files.read_prompts(folder.root / "prompts.jsonl")
    records = folder.read_records([r.id for r in rows if folder.record_path(r.id).is_file()])
    folder.write_manifest(rows, records)
    path = write_outputs(folder, rows, records, {k: v for k, v in config.items() if k != "version"})
    say(f"report rebuilt from {len(records)} of {len(rows)} prompts: {path}")
    if args.quiet:
        print(path)
    return 0


def main(argv=None) -> int:  # for `python -m explain.sweep.cli` during development
    from explain.cli import main as explain_main

    return explain_main(["sweep", *(sys.argv[1:] if argv is None else argv)])
