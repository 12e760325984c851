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
import re
import sys
import time
from pathlib import Path

DEFAULT_OUT = "explain-report"
PAPER_GUIDANCE = 7.5
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
def _dtype(name: str, device: str, external: bool):
    import torch

    if name == "auto":
        return torch.float16 if (external and device.startswith("cuda")) else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {name} was asked for but torch sees no CUDA GPU; use --device cpu")
    return name


def load_model(spec: str | None, device: str = "auto", dtype: str = "auto"):
    """A diffusers text-to-image pipeline and a short name for it.

    ``spec`` is ``None`` or ``"embedded"`` (the shapes model shipped in the package), a local
    diffusers folder, or a Hugging Face hub id (``org/name``, needs the network).
    """
    device = _device(device)
    if spec in (None, "", "embedded"):
        from explain import embedded

        _quiet_loading()
        try:
            pipe = embedded.load_pipeline(device=device, dtype=_dtype(dtype, device, external=False))
        except embedded.EmbeddedModelMissing as exc:
            raise CommandError(f"{exc}; or pass another model with --model PATH_OR_HUB_ID") from None
        return pipe, f"embedded ({embedded.MODEL_ID})"
    if spec == "tiny":  # random weights, for tests: exercises the whole path in a second
        from explain.testing import tiny_sd_pipeline

        return tiny_sd_pipeline().to(device), "tiny (random weights, test only)"

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise CommandError(
                f"{spec} is a single file; --model needs a diffusers model folder (with model_index.json) or a hub id"
            )
        if not (path / "model_index.json").is_file():
            raise CommandError(f"{spec} is not a diffusers model folder: it has no model_index.json")
        _quiet_loading()
        return _from_pretrained(str(path), device, dtype, local=True), str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or "\\" in spec or not _HUB_ID.match(spec)
    if looks_like_path:
        raise CommandError(f"no model folder at {spec}; pass an existing diffusers folder, a hub id like org/name, or leave --model out for the embedded model")
    _quiet_loading()
    return _from_pretrained(spec, device, dtype, local=False), spec


def _quiet_loading() -> None:
    """Silence the libraries' own loading bars and notices; the CLI prints its own progress."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except (ImportError, AttributeError):  # older versions name these differently; the bars are harmless
        pass


def _pipeline_class():
    from diffusers import AutoPipelineForText2Image

    return AutoPipelineForText2Image


def _from_pretrained(source: str, device: str, dtype: str, local: bool):
    import warnings

    kwargs = {"local_files_only": True} if local else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*safety_checker.*")
            pipe = _pipeline_class().from_pretrained(source, **kwargs)
    except Exception as exc:  # the hub client raises many kinds; all mean "cannot load this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise CommandError(f"could not load the model folder {source}: {reason}") from None
        raise CommandError(
            f"could not load {source!r} from the Hugging Face hub ({reason}); check the id and the network, "
            "or download the model elsewhere and pass its local folder with --model PATH"
        ) from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it would blank images and costs time; explanations need the real output
    pipe.to(device, _dtype(dtype, device, external=True))
    return pipe


def _check_words(pipe, prompt: str, model_name: str, progress: Progress) -> None:
    if not model_name.startswith("embedded"):
        return
    from explain import embedded

    unknown = embedded.check_prompt(prompt, pipe.tokenizer)
    if unknown:
        progress(
            f"warning: the embedded model never saw {', '.join(repr(w) for w in unknown)}; it knows the shapes world's "
            "words (colours red/yellow/green/cyan/blue/purple, shapes circle/square/triangle, small/large, positions)"
        )


# ---------------------------------------------------------------------------- commands
def cmd_report(args) -> int:
    progress = Progress(args.quiet)
    from explain.report import build_report

    progress(f"loading the model ({args.model or 'embedded'})")
    t = time.perf_counter()
    pipe, model_name = load_model(args.model, args.device, args.dtype)
    load_s = time.perf_counter() - t
    _check_words(pipe, args.prompt, model_name, progress)
    guidance = args.guidance
    if guidance is None:
        from explain import embedded

        guidance = embedded.DEFAULT_GUIDANCE if model_name.startswith("embedded") else PAPER_GUIDANCE

    from explain.taps.diffusers import generate

    import torch

    from explain.schedules import use_paper_scheduler_if_needed

    switched = use_paper_scheduler_if_needed(pipe, args.schedule)
    if switched:
        progress(f"note: {switched} cannot run custom time steps; using DPMSolverMultistepScheduler (the paper's) for '{args.schedule}'")
    threads = f", {torch.get_num_threads()} CPU threads" if str(pipe.device) == "cpu" else ""
    progress(f"generating {args.steps} steps, seed {args.seed}, guidance {guidance}, schedule {args.schedule}{threads}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet or not sys.stderr.isatty(), leave=False, desc="denoising")
    t = time.perf_counter()
    trace, _ = generate(
        pipe,
        args.prompt,
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
    gen_s = time.perf_counter() - t
    if trace.meta.get("model") not in (None, model_name):
        trace.meta["model_source"] = trace.meta["model"]
    trace.meta["model"] = model_name
    for key, value in (("steps", args.steps), ("guidance", guidance), ("seed", args.seed),
                       ("schedule", args.schedule), ("lam", args.lam)):
        trace.meta.setdefault(key, value)
    timings = {"time: load model (s)": round(load_s, 2), "time: generate + trace (s)": round(gen_s, 2)}
    report = build_report(trace, args.out, extra_settings=timings, progress=progress)
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{report,open}")

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
    rep.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="weights dtype (default: float16 on CUDA for external models, else float32)")
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
