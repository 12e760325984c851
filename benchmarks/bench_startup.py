"""Where a user waits before the first result: imports, `explain open`, the app's first image.

Each figure is a fresh Python process (wall time and the child's CPU time, median of the
rounds, rounds interleaved so machine load hits every kind alike). "eager" re-runs the same
command with diffusers and transformers imported first, as the CLI did before its imports were
made lazy: the difference is what lazy imports save.

    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EAGER = "import diffusers, transformers\n"

RUN_OPEN = """
import runpy, sys
sys.argv = ["explain", "open", {trace!r}, "--out", {out!r}, "--overwrite", "--quiet"]
try:
    runpy.run_module("explain", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
"""

APP_FIRST_RESULT = """
import time
t0 = time.perf_counter()
import gradio_app  # noqa: F401  (what a Space imports)
import explain_app
t1 = time.perf_counter()
session = explain_app.generate("a red circle above a blue square", steps=20)
t2 = time.perf_counter()
print(f"SPLIT {t1 - t0:.3f} {t2 - t1:.3f}")
"""


def timed(code: str) -> tuple[float, float, str]:
    """Wall seconds, child CPU seconds and stdout of one fresh interpreter running ``code``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"this measurement failed:\n{code}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def make_trace(folder: Path) -> Path:
    """A small real trace of the embedded model to open."""
    code = (
        "import torch\nfrom explain import embedded\nfrom explain.run import GenerationRequest, generate_and_trace\n"
        "torch.set_num_threads(1)\n"
        "result = generate_and_trace(embedded.load_pipeline(), 'embedded', GenerationRequest(prompt='a red circle', steps=8))\n"
        f"result.trace.save({str(folder / 'startup.safetensors')!r})\n"
    )
    timed(code)
    return folder / "startup.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = make_trace(folder)
        open_code = RUN_OPEN.format(trace=str(trace), out=str(folder / "report"))
        kinds = {
            "import explain.cli (every command)": "import explain.cli\n",
            "import explain.cli, eager diffusers+transformers": EAGER + "import explain.cli\n",
            "explain open TRACE (lazy, today)": open_code,
            "explain open TRACE (eager, before)": EAGER + open_code,
            "import gradio_app": "import gradio_app\n",
            "app: import + first 20-step image": APP_FIRST_RESULT,
        }
        walls = {name: [] for name in kinds}
        cpus = {name: [] for name in kinds}
        splits = []
        for round_ in range(args.rounds):
            for name, code in kinds.items():
                wall, cpu, out = timed(code)
                walls[name].append(wall)
                cpus[name].append(cpu)
                for line in out.splitlines():
                    if line.startswith("SPLIT"):
                        splits.append(tuple(float(v) for v in line.split()[1:]))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    print(f"fresh processes, 1 thread, median of {args.rounds} interleaved rounds (load average {os.getloadavg()[0]:.1f})")
    print(f"{'what':52s} {'wall s':>8s} {'CPU s':>8s}")
    for name in kinds:
        print(f"{name:52s} {statistics.median(walls[name]):8.2f} {statistics.median(cpus[name]):8.2f}")
    lazy, eager = statistics.median(cpus["explain open TRACE (lazy, today)"]), statistics.median(cpus["explain open TRACE (eager, before)"])
    print(f"explain open: lazy imports save {eager - lazy:.2f} s of CPU ({eager / lazy:.2f}x the lazy cost before)")
    if splits:
        imports = statistics.median(s[0] for s in splits)
        first = statistics.median(s[1] for s in splits)
        print(f"app first result: imports {imports:.2f} s, then model load + 20-step image + views {first:.2f} s (wall, inside the process)")


if __name__ == "__main__":
    main()
