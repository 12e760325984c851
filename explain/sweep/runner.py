"""Run a sweep: every pending prompt generated and traced once (`explain.run.generate_and_trace`),
each chosen analysis run on it, one atomic record per prompt.

`run_sweep` is what ``python -m explain sweep`` calls, in every process of a launch:

1. the main process writes the settings (or leaves an existing sweep's settings alone) and a run
   token; every process then checks the settings against its own, reads which prompts already
   have a record, and waits for the others, so nobody writes before everyone has read;
2. the pending prompts, in the sweep's fixed order, are split between the processes;
3. each process loads the model once, runs its prompts and writes each prompt's record (a
   prompt that fails is recorded with its error, and the sweep goes on);
4. the main process waits for every process's "done" marker (a file, not a collective: a barrier
   would time out when the shares end far apart) and writes the tables and the report.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from explain.sweep import analyses as registry
from explain.sweep import plan
from explain.sweep.manifest import SweepFolder, clean_json
from explain.sweep.prompts import PromptRow


@dataclass
class SweepSummary:
    folder: Path
    total: int
    done_before: int
    ran: int  # by this process in this run
    ok: int
    failed: int
    invalid: int
    seconds: float
    report: Path | None = None
    manifest: dict = field(default_factory=dict)


def base_record(row: PromptRow, seed: int | None) -> dict:
    return {
        "id": row.id,
        "index": row.index,
        "line": row.line,
        "prompt": row.prompt,
        "negative": row.negative,
        "seed": seed,
        "truth": row.truth,
        "status": "ok",
        "error": None,
        "errors": {},
        "skipped": {},
        "notes": [],
        "columns": {},
        "tables": {},
        "details": {},
    }


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames]


def split_output(name: str, out: dict, record: dict) -> None:
    """Scalars -> columns, `Rows` -> tables (tagged with the prompt id), the rest -> details."""
    for key, value in out.items():
        if isinstance(value, registry.Rows):
            record["tables"].setdefault(key, []).extend({"id": record["id"], "analysis": name, **r} for r in value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            record["columns"][key] = value
        else:
            record["details"][key] = value


def use_paper_scheduler(pipe) -> str | None:
    """Make the pipeline's scheduler DPM-Solver++ of order 2 (the paper's); returns what it replaced."""
    from diffusers import DPMSolverMultistepScheduler

    sched = pipe.scheduler
    config = sched.config
    if isinstance(sched, DPMSolverMultistepScheduler) and config.get("algorithm_type") == "dpmsolver++" and int(config.get("solver_order", 2)) == 2:
        return None
    old = type(sched).__name__
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return old


def run_prompt(row: PromptRow, pipe, model_name: str, settings, folder: SweepFolder, cache: dict) -> dict:
    """One prompt's record: generate and trace it, then run each analysis (errors recorded, never raised)."""
    from explain.run import GenerationRequest, generate_and_trace

    seed = plan.resolve_seed(row, settings.sweep_seed, settings.fixed_seed) if row.valid else row.seed
    record = base_record(row, seed)
    if not row.valid:
        record.update(status="invalid", error=row.error)
        return record
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    need = registry.needs(settings.analyses)
    request = GenerationRequest(
        prompt=row.prompt,
        negative_prompt=row.negative,
        steps=settings.steps,
        guidance=settings.guidance,
        seed=seed,
        schedule=settings.schedule,
        lam=settings.lam,
        previews="previews" in need or "traces" in settings.analyses,
        keep_layers="layers" in need,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        with torch.no_grad():
            result = generate_and_trace(pipe, model_name, request)
    except Exception as exc:  # noqa: BLE001 - any failure of one prompt is that prompt's error
        record.update(status="error", error=f"generation: {_error_text(exc)}", traceback=_where(exc))
        record["run"] = {"seconds": {"generate": time.perf_counter() - start}}
        return record
    timings["generate"] = time.perf_counter() - start
    cpu["generate"] = time.process_time() - start_cpu
    record["notes"] = list(result.notes)
    ctx = registry.Context(row=row, trace=result.trace, pipe=pipe, settings=settings, folder=folder, cache=cache, model_name=model_name)
    try:
        has_truth = ctx.scene is not None
    except ValueError as exc:
        has_truth = False
        record["errors"]["truth"] = str(exc)
    for name in settings.analyses:
        analysis = registry.ANALYSES[name]
        limit = settings.subset_limit(name)
        if limit is not None and row.index >= limit:
            record["skipped"][name] = f"outside the subset (the file's first {limit} rows)"
            continue
        if "truth" in analysis.needs and not has_truth:
            record["skipped"][name] = "the row has no shapes-world scene"
            continue
        t, t_cpu = time.perf_counter(), time.process_time()
        try:
            with torch.no_grad():
                out = analysis.run(ctx)
            split_output(name, out, record)
        except Exception as exc:  # noqa: BLE001
            record["errors"][name] = _error_text(exc)
            record.setdefault("tracebacks", {})[name] = _where(exc)
        timings[name] = time.perf_counter() - t
        cpu[name] = time.process_time() - t_cpu
    if record["errors"]:
        record["status"] = "error"
        record["error"] = "; ".join(f"{k}: {v}" for k, v in record["errors"].items())
    record["run"] = {"seconds": timings, "cpu_seconds": cpu}
    return record


# ---------------------------------------------------------------------------- progress
class SweepProgress:
    """The whole sweep's progress with an ETA, on the main process: a tqdm bar on a terminal, a
    line every ``every`` seconds otherwise. Counts every process's records, not only its own."""

    def __init__(self, folder: SweepFolder, total: int, done_before: int, pending_ids: set[str], started: float, show: bool | None, every: float = 30.0):
        self.folder, self.total, self.done_before = folder, total, done_before
        self.pending_ids, self.started, self.every = pending_ids, started, every
        self.bar = None
        self.last_line, self.last_n = 0.0, -1
        self.enabled = show is not False
        if self.enabled and (show or sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done_before, desc="sweep", unit="prompt", dynamic_ncols=True, smoothing=0.1)
        self.begin = time.perf_counter()

    def finished_now(self) -> int:
        n = 0
        try:
            for entry in os.scandir(self.folder.records):
                name = entry.name
                if name.endswith(".json") and not name.startswith(".") and name[:-5] in self.pending_ids:
                    if entry.stat().st_mtime >= self.started - 1:
                        n += 1
        except FileNotFoundError:
            pass
        return n

    def update(self) -> None:
        if not self.enabled:
            return
        n = self.finished_now()
        if self.bar is not None:
            self.bar.n = self.done_before + n
            self.bar.refresh()
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every or (n == len(self.pending_ids) and n != self.last_n):
            self.last_line, self.last_n = now, n
            rate = n / max(now - self.begin, 1e-9)
            left = len(self.pending_ids) - n
            eta = f"{left / rate / 60:.1f} min" if rate > 0 else "?"
            print(f"[sweep] {self.done_before + n}/{self.total} prompts done ({n} this run, {rate * 3600:.0f}/h), ETA {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- the sweep
def run_sweep(
    rows: list[PromptRow],
    out: str | os.PathLike,
    settings,
    *,
    model_spec: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    retry_failed: bool = False,
    restart: bool = False,
    progress: bool | None = None,
    say: Callable[[str], None] | None = None,
    report: bool = True,
    load_model: Callable | None = None,
) -> SweepSummary:
    """Run (or resume) the sweep of ``rows`` into ``out`` with ``settings`` in this process."""
    say = say or (lambda message: None)
    folder = SweepFolder(out)
    procs = plan.processes(device)
    start = time.perf_counter()
    started_wall = time.time()
    config = clean_json(settings.to_json())
    if procs.main:
        folder.root.mkdir(parents=True, exist_ok=True)
        if restart:
            _clear(folder)
        if folder.read_config() is None:
            folder.write_config(config)
        folder.remove_stale_temporaries()
        from explain.sweep.shapes import write_rows

        write_rows(rows, folder.root / "prompts.jsonl")
        folder.new_run(procs.world)
    procs.barrier()
    folder.check_config(config)  # every process: the same verdict, so none waits for a failed one
    run = folder.current_run()["run"]
    done = folder.done_ids(retry_failed)
    pending = [r for r in plan.run_order(rows) if r.id not in done]
    done_before = len(rows) - len(pending)
    procs.barrier()  # everyone has read what is done before anyone writes
    mine = procs.split(pending)
    if procs.main:
        say(f"{len(rows)} prompts: {done_before} already done, {len(pending)} to run on {procs.world} process(es)")
    bar = SweepProgress(folder, len(rows), done_before, {r.id for r in pending}, started_wall, progress) if procs.main else None

    pipe = model_name = None
    cache: dict = {}
    counts = {"ok": 0, "error": 0, "invalid": 0}
    if any(r.valid for r in mine):
        pipe, model_name = (load_model or _load)(model_spec, _device(device, procs), dtype)
        if settings.force_dpm_solver:
            replaced = use_paper_scheduler(pipe)
            if replaced and procs.main:
                say(f"the paper's protocol: {replaced} replaced by DPMSolverMultistepScheduler (dpmsolver++, order 2)")
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
    host = socket.gethostname()
    traces_said = not procs.main
    for row in mine:
        t = time.perf_counter()
        record = run_prompt(row, pipe, model_name, settings, folder, cache)
        record.setdefault("run", {}).update(rank=procs.rank, processes=procs.world, host=host, run=run, device=str(getattr(pipe, "device", "")), dtype=str(getattr(pipe, "dtype", "")), total_seconds=time.perf_counter() - t)
        folder.write_record(record)
        folder.log(procs.rank, procs.world, {"id": row.id, "status": record["status"], "seconds": record["run"]["total_seconds"], "run": run, "error": record["error"]})
        counts[record["status"]] += 1
        size = record["columns"].get("trace_bytes")
        if size and not traces_said:  # say what the traces cost as soon as one is known
            traces_said = True
            say(f"traces: {size / 1e6:.2f} MB per prompt on disk, about {size * len(rows) / 1e9:.2f} GB for the {len(rows)} prompts")
        if bar is not None:
            bar.update()
    folder.mark_done(procs.rank, procs.world, run, counts)

    summary = SweepSummary(folder.root, len(rows), done_before, len(mine), counts["ok"], counts["error"], counts["invalid"], 0.0)
    if procs.main:
        while len(folder.finished_ranks(procs.world, run)) < procs.world:
            bar.update()
            time.sleep(0.5)
        bar.update()
        bar.close()
        records = folder.read_records([r.id for r in rows if folder.record_path(r.id).is_file()])
        summary.manifest = folder.write_manifest(rows, records)
        if report:
            from explain.sweep.report import write_outputs

            summary.report = write_outputs(folder, rows, records, config)
    summary.seconds = time.perf_counter() - start
    return summary


def _clear(folder: SweepFolder) -> None:
    import shutil

    for sub in (folder.records, folder.traces, folder.shards):
        if sub.is_dir():
            shutil.rmtree(sub)
    for name in ("sweep.json", "run.json", "manifest.json"):
        (folder.root / name).unlink(missing_ok=True)


def _device(device: str, procs) -> str:
    if device != "auto":
        return device
    return procs.device if procs.state is not None else "auto"


def _load(spec, device, dtype):
    from explain.adapters.diffusers.loading import load_model

    return load_model(spec, device, dtype)
