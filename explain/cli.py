"""Command line: ``python -m explain report "a red circle above a blue square"``.

``report PROMPT``  generates with a model (the embedded shapes model by default; ``--model
                   embedded-dit`` the shipped MMDiT), traces the
                   run, explains it and writes an HTML report with its PNGs and the trace;
``open TRACE``     makes the same report from a saved ``.safetensors`` trace, without a model.

``report --rise [STEP] --cam [STEP] --guidance-map [STEP]`` adds DF-RISE, DF-CAM and the guidance map at a step (default: the middle
one), with their insertion / deletion games and verdicts, using the settings of
`explain.methods.defaults`.

Bad input (a missing model folder, an unreachable hub id, a word the model never saw, a
trace from another program, a number out of range, an output folder that cannot be written)
ends with one ``error:`` line that says what to change, and exit status 2. Everything that can
be checked without the model is checked before it loads, and the output folder before any
work. A report is written into a fresh folder beside ``--out`` and moved into place when it
is complete, so ``--out`` always holds exactly one run, also after Ctrl-C or an error; an
existing report there is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = "explain-report"
PAPER_GUIDANCE = 7.5
# Bounds on what one command may ask for; numbers outside them are mistakes (an infinite
# guidance scale gave an all-NaN latent and a black image with exit status 0).
MAX_GUIDANCE = 100.0
MAX_STEPS = 1000  # the training schedule's length for every model this explains
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_LAM = 10_000
REPORT_MARKER = ".diffusion-explain-report"  # a folder --overwrite may replace


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
    for name in ("rise", "cam", "guidance_map"):  # a bad step is refused before the model loads
        if getattr(args, name, None) is not None:
            _method_step(getattr(args, name), f"--{name.replace('_', '-')}", args.steps)
    if getattr(args, "guidance_words", None) and getattr(args, "guidance_map", None) is None:
        raise CommandError("--guidance-words needs --guidance-map [STEP]: the step the words' maps are drawn at")
    for word in _guidance_words(args):
        if word.lower() not in args.prompt.lower():
            raise CommandError(f"--guidance-words: {word!r} is not in the prompt; name words as the prompt writes them, comma-separated")
    from explain.adapters.diffusers.loading import is_embedded
    from explain.report import build_report
    from explain.run import GenerationRequest, generate_and_trace

    geometry, folder = prepare_report(args, progress)  # everything checkable before the model loads
    progress(f"loading the model ({args.model or 'embedded'})")
    t = time.perf_counter()
    pipe, model_name = load_model(args.model, args.device, args.dtype, announce=progress)
    load_s = time.perf_counter() - t
    check_loaded_sizes(args, geometry, pipe, model_name, progress)
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
    methods = report_methods(args, pipe, result.trace, guidance, progress)
    for method in methods:
        timings[f"time: {method.method} (s)"] = round(method.seconds, 2)
    onset = report_onset(args, pipe, result.trace, guidance, progress)
    if onset is not None:
        timings["time: causal onset (s)"] = round(onset.seconds, 2)
    report = build_report(result.trace, folder.staging, extra_settings=timings, progress=progress, methods=methods, palette=word_palette(model_name), onset=onset)
    report = folder.commit(report)
    _done(report, progress, timings)
    return 0


def cmd_open(args) -> int:
    progress = Progress(args.quiet)
    from explain.report import build_report
    from explain.trace import Trace

    out = args.out or str(Path(args.trace).with_suffix("")) + "-report"
    folder = ReportFolder(out, "--out" if args.out else "the report folder (next to the trace)", args.overwrite).open()
    progress(f"reading {args.trace}")
    trace = Trace.load(args.trace)
    report = build_report(trace, folder.staging, progress=progress, palette=word_palette(str(trace.meta.get("model", ""))))
    report = folder.commit(report)
    _done(report, progress, {})
    return 0


# ---------------------------------------------------------------------------- input checks
def prepare_report(args, progress: Progress):
    """What ``report`` checks before the model loads: the sizes, where the model's folder tells
    its geometry, and the output folder (which it reserves). Returns (geometry, folder)."""
    from explain import sizes

    geometry = sizes.spec_geometry(args.model)
    for note in check_sizes(args, geometry, args.model or "the embedded model"):
        progress(f"warning: {note}")
    return geometry, ReportFolder(args.out, "--out", args.overwrite).open()


def check_loaded_sizes(args, geometry, pipe, model_name: str, progress: Progress) -> None:
    """A hub model's geometry is known once it loads: its sizes are checked then, before generating."""
    if geometry is None:
        from explain import sizes

        for note in check_sizes(args, sizes.pipeline_geometry(pipe), model_name):
            progress(f"warning: {note}")


def check_sizes(args, geometry, model: str) -> list[str]:
    """Refuse ``--height``/``--width`` the model cannot make (`explain.sizes.check_side`);
    return warnings for sizes it was not trained at."""
    from explain import sizes

    notes = []
    for label, side in (("--height", args.height), ("--width", args.width)):
        if side is None:
            continue
        try:
            note = sizes.check_side(label, side, geometry, model=model, allow_any=args.allow_any_size)
        except sizes.SizeError as exc:
            raise CommandError(str(exc).replace("or allow any size", "or pass --allow-any-size")) from None
        if note and note not in notes:
            notes.append(note)
    return notes


# ---------------------------------------------------------------------------- output folder
class ReportFolder:
    """The folder a report goes to, checked before any work (a file, a path under a file, a
    folder that cannot be written, a folder that holds something else), then written as a
    fresh staging folder beside it (`open`) and moved into place by `commit`. Until then the
    old folder stays as it was; a command that ends any other way (an error, Ctrl-C) leaves
    its staging folder to `discard_unfinished_reports`, so the folder holds exactly one
    complete run, or none."""

    def __init__(self, out: str | os.PathLike, label: str = "--out", overwrite: bool = False):
        self.label = label
        self.shown = str(out)
        self.final = Path(out).expanduser().absolute()
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._check()

    def _check(self) -> None:
        final, label, shown = self.final, self.label, self.shown
        try:
            if final.exists() and not final.is_dir():
                raise CommandError(f"{label} {shown} is a file; pass a folder for the report (it is created if missing)")
            ancestor = final
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise CommandError(f"{label} {shown} is under {ancestor}, which is a file, not a folder; pass another folder")
            if final.is_dir() and any(final.iterdir()):
                if not self.overwrite:
                    raise CommandError(
                        f"{label} {shown} already holds files (a report of an earlier run?); pass --overwrite to "
                        "replace it, or another folder"
                    )
                if not is_report_folder(final):
                    raise CommandError(
                        f"{label} {shown} holds files that are not a diffusion-explain report; --overwrite replaces "
                        "only report folders, so pass a new or empty folder"
                    )
        except PermissionError as exc:
            raise CommandError(f"{label} {shown} cannot be read ({exc.strerror}); pass a folder you can write") from None

    def open(self) -> "ReportFolder":
        """Create the staging folder (the real test that the place can be written); `main`
        removes it again unless `commit` moved it into place."""
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=parent))
        except OSError as exc:
            raise CommandError(
                f"cannot write the report in {parent} ({exc.strerror or exc}); pass a {self.label} in a folder you can write"
            ) from None
        _OPEN_FOLDERS.append(self)
        return self

    def commit(self, report):
        """Move the complete report into place (replacing the old one) and return it with its
        final paths."""
        (self.staging / REPORT_MARKER).write_text("one diffusion-explain report; `--overwrite` may replace this folder\n")
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        try:
            os.replace(self.staging, self.final)
        except BaseException:
            if old is not None:  # put the old run back rather than leave no folder
                os.replace(old, self.final)
            raise
        self.staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return _moved(report, self.final)

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


_OPEN_FOLDERS: list[ReportFolder] = []


def discard_unfinished_reports() -> None:
    """Remove the staging folders of reports that did not complete (an error, Ctrl-C)."""
    while _OPEN_FOLDERS:
        _OPEN_FOLDERS.pop().discard()


def is_report_folder(path: Path) -> bool:
    """A folder the CLI wrote (its marker; or, from before the marker, a page and a trace)."""
    return (path / REPORT_MARKER).is_file() or ((path / "index.html").is_file() and (path / "trace.safetensors").is_file())


def _moved(report, folder: Path):
    from dataclasses import replace

    old = report.html_path.parent
    return replace(
        report,
        html_path=folder / report.html_path.relative_to(old),
        files={k: folder / Path(v).relative_to(old) for k, v in report.files.items()},
    )


def _done(report, progress: Progress, timings: dict) -> None:
    parts = ", ".join(f"{k.replace('time: ', '').replace(' (s)', '')} {v:.1f}s" for k, v in timings.items())
    figures = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items() if k != "total")
    progress(f"report written to {report.html_path} (total {progress.elapsed():.1f}s; {parts + '; ' if parts else ''}{figures})")
    if progress.quiet:
        print(report.html_path)


# ---------------------------------------------------------------------------- DF-RISE / DF-CAM in the report
MIDDLE = "middle"


def add_method_options(rep: argparse.ArgumentParser) -> None:
    """``--rise [STEP]``, ``--cam [STEP]`` and their settings; defaults from `explain.methods.defaults`."""
    from explain.methods import defaults

    group = rep.add_argument_group("DF-RISE and DF-CAM in the report (settings from explain.methods.defaults)")
    group.add_argument("--rise", nargs="?", const=MIDDLE, default=None, metavar="STEP",
                       help="add DF-RISE at STEP (default: the middle step), with its insertion/deletion games")
    group.add_argument("--cam", nargs="?", const=MIDDLE, default=None, metavar="STEP",
                       help="add DF-CAM at STEP (default: the middle step), with its insertion/deletion games")
    group.add_argument("--guidance-map", nargs="?", const=MIDDLE, default=None, metavar="STEP",
                       help="add the prompt's guidance map at STEP (default: the middle step): where the prompt changes the x0 prediction, "
                            "with its insertion/deletion games")
    group.add_argument("--guidance-words", default=None, metavar="WORDS",
                       help="with --guidance-map: also the map of each comma-separated prompt word or phrase (e.g. 'red, blue square'): "
                            "where masking its tokens changes the x0 prediction")
    group.add_argument("--onset", action="store_true",
                       help="add the causal onset of every prompt word: when swapping it for a contrasting value first changes "
                            "the x0 prediction (one guided evaluation per word and step)")
    group.add_argument("--masks", type=positive_int, default=defaults.RISE.n_masks,
                       help=f"DF-RISE masks (default {defaults.RISE.n_masks}; the paper used {defaults.PAPER_RISE.n_masks})")
    group.add_argument("--rise-preset", choices=sorted(defaults.PRESETS), default="default",
                       help="DF-RISE settings: 'default' (the project's, explain.methods.defaults.RISE) or 'paper' (as published)")
    group.add_argument("--cam-layers", default=defaults.CAM.layers,
                       help=f"DF-CAM layers: paper, all, down_blocks, mid_block, up_blocks or a block name (default {defaults.CAM.layers})")


def _method_step(value: str, option: str, num_steps: int) -> int:
    if value == MIDDLE:
        return num_steps // 2
    try:
        step = int(value)
    except ValueError:
        raise CommandError(f"{option} takes a step number, got {value!r}; e.g. {option} {num_steps // 2}") from None
    if not 0 <= step < num_steps:
        raise CommandError(f"{option} {step} is outside the run: choose a step between 0 and {num_steps - 1}")
    return step


def _guidance_words(args) -> list[str]:
    from explain.methods.heatmaps import parse_words

    return parse_words(getattr(args, "guidance_words", None))


def report_methods(args, pipe, trace, guidance: float, progress: Progress) -> list:
    """The DF-RISE / DF-CAM / guidance maps asked for with ``--rise`` / ``--cam`` / ``--guidance-map``
    (`explain.explanations`)."""
    words = _guidance_words(args)
    if all(getattr(args, name, None) is None for name in ("rise", "cam", "guidance_map")):
        return []
    import dataclasses

    from explain import explanations
    from explain.adapters.diffusers import from_pipeline, vae_decoder
    from explain.methods import defaults

    asked = (("rise", args.rise), ("cam", args.cam), ("guidance-map", getattr(args, "guidance_map", None)))
    steps = {name: _method_step(value, f"--{name}", trace.num_steps) for name, value in asked if value is not None}
    denoiser = from_pipeline(pipe, trace, guidance_scale=float(guidance))
    decode = vae_decoder(pipe.vae) if getattr(pipe, "vae", None) is not None else None
    methods = []
    if "rise" in steps:
        settings = dataclasses.replace(defaults.PRESETS[args.rise_preset], n_masks=args.masks)
        progress(f"DF-RISE at step {steps['rise']}: {settings.n_masks} masks, then the insertion and deletion games")
        methods.append(explanations.run_rise(denoiser, trace, steps["rise"], settings, decode=decode, progress=_bar(progress, "DF-RISE")))
    if "cam" in steps:
        progress(f"DF-CAM at step {steps['cam']} on {args.cam_layers}, then the insertion and deletion games")
        try:
            methods.append(explanations.run_cam(denoiser, trace, steps["cam"], layers=args.cam_layers, decode=decode, progress=_bar(progress, "DF-CAM")))
        except KeyError as exc:
            raise CommandError(f"{exc.args[0] if exc.args else exc}; pass --cam-layers paper, all, down_blocks, mid_block, up_blocks or a block name") from None
    if "guidance-map" in steps:
        progress(f"guidance map at step {steps['guidance-map']}, then the insertion and deletion games")
        methods.append(explanations.run_guidance(denoiser, trace, steps["guidance-map"], decode=decode, progress=_bar(progress, "guidance map")))
        from explain.methods.heatmaps import UnknownWordError

        for word in words:
            progress(f"guidance map of {word!r} at step {steps['guidance-map']}, then the insertion and deletion games")
            try:
                methods.append(explanations.run_guidance(denoiser, trace, steps["guidance-map"], decode=decode, progress=_bar(progress, "guidance map"), words=word))
            except UnknownWordError as exc:
                raise CommandError(f"--guidance-words: {exc}") from None
    for method in methods:
        progress(f"{method.method}: " + "; ".join(method.verdict_lines()))
    return methods


def report_onset(args, pipe, trace, guidance: float, progress: Progress):
    """The causal onset of every prompt word (``--onset``, `explain.explanations.run_onset`), or None."""
    if not getattr(args, "onset", False):
        return None
    from explain import explanations
    from explain.adapters.diffusers import from_pipeline, vae_decoder

    scale = float(guidance)
    progress(f"causal onset: each prompt word swapped (or removed) at each of the {trace.num_steps} steps")
    decode = vae_decoder(pipe.vae) if getattr(pipe, "vae", None) is not None else None
    onset = explanations.run_onset(
        from_pipeline(pipe, trace, guidance_scale=scale), trace, lambda prompt: from_pipeline(pipe, trace, prompt=prompt, guidance_scale=scale), decode=decode
    )  # fmt: skip
    progress(f"causal onset: {onset.evidence}")
    return onset


def _bar(progress: Progress, name: str):
    """A tqdm bar on an interactive terminal; nothing otherwise (the phase lines say enough)."""
    if progress.quiet or not progress.stream.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=100, desc=name, leave=False, file=progress.stream)

    def update(fraction, desc):
        bar.set_description(f"{name}: {desc}", refresh=False)
        bar.update(round(fraction * 100) - bar.n)
        if fraction >= 1:
            bar.close()

    return update


def word_palette(model_name: str) -> dict | None:
    """The colours of the embedded model's world, so its colour words are drawn in them."""
    if not model_name.startswith("embedded"):
        return None
    from explain.embedded import world

    return dict(world.COLORS)


# ---------------------------------------------------------------------------- parser
def _program_name() -> str:
    """How the user called us, for usage lines: the console script or ``python -m explain``."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "diffusion-explain" if called.startswith("diffusion-explain") else "python -m explain"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=_program_name(), description="Explain how a text-to-image diffusion model denoises.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{report,open,sweep}")

    rep = sub.add_parser("report", help="generate, trace and explain one prompt into an HTML report")
    rep.add_argument("prompt", help="the text prompt")
    rep.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT}); an existing report there is replaced only with --overwrite")
    rep.add_argument("--model", default=None, help="embedded (the shapes UNet model, default), embedded-dit (the shapes MMDiT, SD3-style), a diffusers model folder or a hub id")
    rep.add_argument("--negative", default=None, help="negative prompt")
    rep.add_argument("--steps", type=_whole_number(1, MAX_STEPS), default=20, help=f"denoising steps, 1 to {MAX_STEPS} (default 20)")
    rep.add_argument("--seed", type=_whole_number(0, MAX_SEED), default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    rep.add_argument("--guidance", type=_finite_number(0.0, MAX_GUIDANCE), default=None,
                     help=f"classifier-free guidance, 0 to {MAX_GUIDANCE:g} (default: 5.0 for the embedded model, else 7.5)")
    rep.add_argument("--height", type=positive_int, default=None,
                     help="image height in pixels: a multiple of the VAE's factor, at most 4096 and twice the size the model was trained at (default: the model's)")
    rep.add_argument("--width", type=positive_int, default=None, help="image width in pixels, as --height (default: the model's)")
    rep.add_argument("--allow-any-size", action="store_true", help="allow sizes over twice the size the model was trained at (slow, and poor images)")
    rep.add_argument("--schedule", choices=("uniform", "early", "latter"), default="uniform", help="time-step sampling (paper §4; default uniform)")
    rep.add_argument("--lam", type=_whole_number(1, MAX_LAM), default=60, help=f"λ of the early/latter schedules, 1 to {MAX_LAM} (default 60)")
    rep.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    rep.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="weights dtype (default auto: bfloat16 on CPUs with native bf16, float16 on CUDA for external models, else float32)")
    rep.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads for torch (default: one when the machine is already busy, else torch's choice)")
    rep.add_argument("--no-previews", action="store_true", help="do not decode x_t/x0 previews (faster on large models; grids show latents)")
    rep.add_argument("--overwrite", action="store_true", help="replace the report already in --out (never a folder that holds anything else)")
    rep.add_argument("--quiet", action="store_true", help="print only the report's path")
    add_method_options(rep)
    rep.set_defaults(func=cmd_report)

    opn = sub.add_parser("open", help="make the report from a saved trace (.safetensors), without any model")
    opn.add_argument("trace", help="a trace file written by the report, Trace.save or the Save Trace node")
    opn.add_argument("--out", default=None, help="output folder (default: next to the trace, <name>-report)")
    opn.add_argument("--overwrite", action="store_true", help="replace the report already in the output folder")
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


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments end like every other bad input: one ``error:`` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _whole_number(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _finite_number(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number from {low:g} to {high:g}, got {text}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, with a message that says what was given."""
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
    except (CommandError, TraceFormatError, ValueError, KeyError, IndexError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        discard_unfinished_reports()
