#!/usr/bin/env python
"""CPU time of building the HTML report (`explain.report.build_report`) for one trace, with this
checkout's report and with an earlier revision's, in one process, alternating, so the ratio is
not machine-load noise.

    python benchmarks/bench_report_build.py                     # the README's main job, vs main
    python benchmarks/bench_report_build.py --trace run.safetensors --against d050fce --repeats 5

Without ``--trace`` it first generates the main job's trace (the embedded model, the README's
prompt, 20 steps with previews). The earlier revision's ``explain/report.py`` and
``explain/render.py`` are read with ``git show`` and imported as a separate package; everything
else (methods, trace) is shared. Prints process CPU seconds per build (median) and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a large red circle above a small blue square"


def old_report(rev: str, folder: Path):
    """The revision's report module, importing the revision's render module."""
    package = types.ModuleType("explain_at_rev")
    package.__path__ = [str(folder)]
    sys.modules["explain_at_rev"] = package
    for name in ("render", "report"):
        source = subprocess.run(["git", "show", f"{rev}:explain/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        source = source.replace("from explain import render", "from explain_at_rev import render")
        path = folder / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"explain_at_rev.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
    return package.report


def main_job_trace():
    from explain.adapters.diffusers.loading import load_model
    from explain.run import GenerationRequest, generate_and_trace

    pipe, name = load_model("embedded", "cpu", "float32", announce=lambda m: None)
    return generate_and_trace(pipe, name, GenerationRequest(prompt=PROMPT, steps=20, seed=0)).trace


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default=None, help="a saved trace (default: generate the main job's)")
    p.add_argument("--against", default="main", help="the git revision to compare with (default: main)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from explain import report as new
    from explain.trace import Trace

    trace = Trace.load(args.trace) if args.trace else main_job_trace()
    with tempfile.TemporaryDirectory() as tmp:
        old = old_report(args.against, Path(tmp))
        runs = {"this checkout": [], args.against: []}
        for module, key in ((new, "this checkout"), (old, args.against)):  # warm-up: imports, font cache
            module.build_report(trace, Path(tmp) / "warm", save_trace=False)
        for _ in range(args.repeats):
            for module, key in ((new, "this checkout"), (old, args.against)):
                start = time.process_time()
                module.build_report(trace, Path(tmp) / key.replace(" ", "_"), save_trace=False)
                runs[key].append(time.process_time() - start)
        sizes = {key: (Path(tmp) / key.replace(" ", "_") / "index.html").stat().st_size for key in runs}
    print(f"build_report, {trace.num_steps} steps, {trace.image_size[1]}×{trace.image_size[0]} px, one torch thread; process CPU s (median of {args.repeats})")
    for key, times in runs.items():
        print(f"  {key:<16} {statistics.median(times):6.2f} s   index.html {sizes[key] / 1e6:5.2f} MB   runs: {', '.join(f'{t:.2f}' for t in times)}")
    ratio = statistics.median(runs["this checkout"]) / statistics.median(runs[args.against])
    print(f"  ratio this checkout / {args.against}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
