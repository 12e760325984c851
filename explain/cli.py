"""Command line: ``python -m explain report "a red circle above a blue square"``.

``report PROMPT``  generates with a model (the embedded shapes model by default), traces the
                   run, explains it and writes an HTML report with its PNGs and the trace;
``open TRACE``     makes the same report from a saved ``.safetensors`` trace, without a model.

Bad input (a missing model folder, an unreachable hub id, a word the model never saw, a
trace from another program) ends with one ``error:`` line that says what to change, and exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_OUT = "explain-report"
PAPER_GUIDANCE = 7.5


class CommandError(Exception):
    """Input the command cannot work with; the message says what to change."""


class Progress:
    """One line per phase on stderr, with the time since the command started."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():5.1f}s] {message}", file=self.stream, flush=True)


# ---------------------------------------------------------------------------- models
def load_model(spec: str | None, device: str = "auto", dtype: str = "auto", announce=None):
    """`explain.adapters.diffusers.load_model`, its errors phrased for the command line."""
    from explain.adapters.diffusers.loading import ModelLoadError
    from explain.adapters.diffusers.loading import load_model as load

    try:
        return load(spec, device, dtype, announce=announce)
    except ModelLoadError as exc:
        message = str(exc).replace("pass another model", "pass another model with --model PATH_OR_HUB_ID")
        raise CommandError(message.replace("pass its local folder", "pass its local folder with --model PATH")) from None


# ---------------------------------------------------------------------------- commands
def cmd_report(args) -> int:
    progress = Progress(args.quiet)
    from explain.adapters.diffusers.loading import is_embedded
    from explain.report import build_report
    from explain.run import GenerationRequest, generate_and_trace

    progress(f"loading the model ({args.model or 'embedded'})")
    t = time.perf_counter()
    pipe, model_name = load_model(args.model, args.device, args.dtype, announce=progress)
    load_s = time.perf_counter() - t
    guidance = args.guidance
    if guidance is None:
        from explain import embedded

        guidance = embedded.DEFAULT_GUIDANCE if is_embedded(model_name) else PAPER_GUIDANCE

    import torch

    threads = f", {torch.get_num_threads()} CPU threads" if str(pipe.device) == "cpu" else ""
    progress(f"generating {args.steps} steps, seed {args.seed}, guidance {guidance}, schedule {args.schedule}{threads}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet or not sys.stderr.isatty(), leave=False, desc="denoising")
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        guidance=guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        schedule=args.schedule,
        lam=args.lam,
        previews=not args.no_previews,
    )
    result = generate_and_trace(pipe, model_name, request)
    for note in result.notes:
        progress(f"warning: {note}")
    timings = {"time: load model (s)": round(load_s, 2), "time: generate + trace (s)": round(result.seconds, 2)}
    report = build_report(result.trace, args.out, extra_settings=timings, progress=progress)
    _done(report, progress, timings)
    return 0


def cmd_open(args) -> int:
    progress = Progress(args.quiet)
    from explain.report import build_report
    from explain.trace import Trace

    progress(f"reading {args.trace}")
    trace = Trace.load(args.trace)
    out = args.out or str(Path(args.trace).with_suffix("")) + "-report"
    report = build_report(trace, out, progress=progress)
    _done(report, progress, {})
    return 0


def _done(report, progress: Progress, timings: dict) -> None:
    parts = ", ".join(f"{k.replace('time: ', '').replace(' (s)', '')} {v:.1f}s" for k, v in timings.items())
    figures = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items() if k != "total")
    progress(f"report written to {report.html_path} (total {progress.elapsed():.1f}s; {parts + '; ' if parts else ''}{figures})")
    if progress.quiet:
        print(report.html_path)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explain", description="Explain how a text-to-image diffusion model denoises.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{report,open,sweep}")

    rep = sub.add_parser("report", help="generate, trace and explain one prompt into an HTML report")
    rep.add_argument("prompt", help="the text prompt")
    rep.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    rep.add_argument("--model", default=None, help="diffusers model folder or hub id (default: the embedded shapes model)")
    rep.add_argument("--negative", default=None, help="negative prompt")
    rep.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
    rep.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rep.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: 5.0 for the embedded model, else 7.5)")
    rep.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    rep.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    rep.add_argument("--schedule", choices=("uniform", "early", "latter"), default="uniform", help="time-step sampling (paper §4; default uniform)")
    rep.add_argument("--lam", type=int, default=60, help="λ of the early/latter schedules (default 60)")
    rep.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    rep.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="weights dtype (default auto: bfloat16 on CPUs with native bf16, float16 on CUDA for external models, else float32)")
    rep.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads for torch (default: one when the machine is already busy, else torch's choice)")
    rep.add_argument("--no-previews", action="store_true", help="do not decode x_t/x0 previews (faster on large models; grids show latents)")
    rep.add_argument("--quiet", action="store_true", help="print only the report's path")
    rep.set_defaults(func=cmd_report)

    opn = sub.add_parser("open", help="make the report from a saved trace (.safetensors), without any model")
    opn.add_argument("trace", help="a trace file written by the report, Trace.save or the Save Trace node")
    opn.add_argument("--out", default=None, help="output folder (default: next to the trace, <name>-report)")
    opn.add_argument("--quiet", action="store_true", help="print only the report's path")
    opn.set_defaults(func=cmd_open)

    from explain.sweep.cli import register as register_sweep

    register_sweep(sub)
    return parser


def _auto_threads(default: int) -> int:
    """One thread when the CPUs are already fully loaded: OpenMP threads that spin-wait for a
    CPU someone else holds slow a run down many times over (measured: 20-step generation of the
    embedded model 4.6 s with one thread, 64 s with two, on 2 cores at load 9)."""
    try:
        import os

        busy = os.getloadavg()[0] >= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    except (OSError, AttributeError):
        busy = False
    return 1 if busy else default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from explain.trace import TraceFormatError

    try:
        import torch

        if getattr(args, "command", None) == "report":
            torch.set_num_threads(args.threads or _auto_threads(torch.get_num_threads()))
        with torch.no_grad():
            return args.func(args)
    except (CommandError, TraceFormatError, ValueError, KeyError, IndexError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
