#!/usr/bin/env python
"""Wall time of the main job, ``python -m explain report PROMPT`` with the embedded model, in a
fresh process each time (imports, model load, 20-step traced generation with previews, all
figures, HTML). Target (issue 3): <= 60 s on a 2-core CPU.

    python benchmarks/bench_report.py [--repeats 3] [--threads 2] [--model tiny]
    taskset -c 0,1 python benchmarks/bench_report.py     # on a bigger machine: pin to 2 cores

Prints each run's total and the CLI's own phase breakdown (its last progress line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads; 0 lets the CLI choose (one on a busy machine)")
    p.add_argument("--prompt", default="a large red circle above a small blue square")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    times = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "explain", "report", args.prompt, "--out", out, "--steps", str(args.steps),
                   "--device", "cpu", "--seed", str(i)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.model:
                cmd += ["--model", args.model]
            t = time.perf_counter()
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - t
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return run.returncode
            last = [line for line in run.stderr.splitlines() if "report written to" in line][-1]
            files = sum(1 for _ in Path(out).rglob("*") if _.is_file())
            times.append(elapsed)
            print(f"run {i + 1}: {elapsed:5.1f} s wall, {files} files | {last.split('(', 1)[1].rstrip(')')}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    med = statistics.median(times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = args.threads or "CLI-chosen"
    print(f"median {med:.1f} s, best {min(times):.1f} s over {len(times)} runs; {threads} torch threads, {cpus} CPUs available, load average {load:.1f} at the end")
    print(f"target <= 60 s: {'met' if med <= 60 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
