"""The dataset sweep on this CPU: prompts per hour for each analysis, and 1 -> 2 processes.

    python benchmarks/bench_sweep.py                         # embedded model, 1 thread, both parts
    python benchmarks/bench_sweep.py --part analyses --scenes 6
    python benchmarks/bench_sweep.py --part scaling --scenes 16

``analyses``: one in-process sweep per analysis over the same held-out shapes-world scenes (each
analysis alone, generation included; ``sanity`` computes its own DF-RISE and DF-CAM maps), timed
by **process CPU time** per prompt from the records (wall time on a shared machine is noise), and
printed as prompts per hour per process next to generation alone. ``traces`` also prints the
bytes each saved trace takes.

``scaling``: the same sweep (concepts, recovery, pointing, settle) as subprocesses of
``python -m explain sweep``, one process, then two under ``accelerate launch`` (torch's launcher,
gloo), 1 thread each, in one run; wall time of each whole sweep (model loading included) and
the ratio. The machine has 2 cores shared with other jobs: the ratio is what was measured under
that load (printed beside it), not the ideal 2x.

It ends with the command that runs the paper's protocol on N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ANALYSES = ("concepts", "recovery", "pointing", "layers", "settle", "traces", "schedules", "rise", "cam", "sanity")
PAPER_COMMAND = (
    "accelerate launch --multi_gpu --num_processes N -m explain sweep coco_captions.txt --out sweep-paper \\\n"
    "    --protocol paper --model CompVis/stable-diffusion-v1-4 --analyses concepts,rise,cam,sanity"
)


def load_average() -> str:
    try:
        return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def bench_analyses(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from explain.adapters.diffusers.loading import load_model
    from explain.sweep import protocol, shapes
    from explain.sweep.manifest import SweepFolder
    from explain.sweep.runner import run_sweep

    pipe, name = load_model(None, "cpu", args.dtype)
    rows = shapes.scene_rows(args.scenes, "held_out", seed=args.world_seed)
    print(f"embedded model ({pipe.dtype}), {args.scenes} held-out scenes, {torch.get_num_threads()} thread(s), {load_average()}")
    print(f"{'analysis':10s} {'CPU s/prompt':>13s} {'of which gen.':>14s} {'prompts/hour':>13s}  notes")
    generation = []
    for analysis in ("(generation)", *args.analyses):
        names = () if analysis == "(generation)" else (analysis,)
        settings = protocol.resolve("default", model="embedded", embedded=True, analyses=names, masks=args.masks)
        with tempfile.TemporaryDirectory() as out:
            run_sweep(rows, out, settings, device="cpu", progress=False, load_model=lambda *a: (pipe, name))
            records = SweepFolder(out).read_records()
            bad = [r["error"] for r in records if r["status"] != "ok"]
            cpu = [sum(r["run"]["cpu_seconds"].values()) for r in records]
            gen = [r["run"]["cpu_seconds"]["generate"] for r in records]
            generation += gen
            per = statistics.median(cpu)
            note = ""
            if analysis == "traces":
                sizes = [r["columns"]["trace_bytes"] for r in records]
                note = f"{statistics.mean(sizes) / 1e6:.2f} MB per trace (with x0/x_t previews)"
            if analysis in ("rise", "sanity"):
                note = f"{settings.rise.n_masks} masks; games in latent + image space vs {len(settings.baselines)} baselines" if analysis == "rise" else "DF-RISE + DF-CAM again with a re-initialised UNet"
            if analysis == "cam":
                note = "games vs every baseline included"
            if bad:
                note += f" ERRORS: {bad[0]}"
        print(f"{analysis:10s} {per:13.2f} {statistics.median(gen):14.2f} {3600 / per:13.0f}  {note}", flush=True)
    print(f"(generation: 20 steps, guidance 5, previews only when an analysis needs them; median over {len(generation)} runs {statistics.median(generation):.2f} s)")


def run_cli(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return wall, done.stderr


def bench_scaling(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    common = ["--shapes-world", str(args.scenes), "--analyses", "concepts,recovery,pointing,settle", "--device", "cpu", "--threads", str(args.threads), "--no-progress", "--dtype", args.dtype]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000)]
    print(f"\nscaling: {args.scenes} held-out scenes (concepts, recovery, pointing, settle), {args.threads} thread(s) per process; {load_average()} before")
    with tempfile.TemporaryDirectory() as tmp:
        wall1, _ = run_cli([sys.executable, "-m", "explain", "sweep", "--out", f"{tmp}/one", *common], env)
        load1 = load_average()
        wall2, _ = run_cli([*launch, "-m", "explain", "sweep", "--out", f"{tmp}/two", *common], env)
        load2 = load_average()
        same = _same_results(Path(tmp) / "one", Path(tmp) / "two")
    n = args.scenes
    print(f"  1 process : {wall1:6.1f} s wall for {n} prompts = {3600 * n / wall1:6.0f} prompts/hour ({load1} after)")
    print(f"  2 processes: {wall2:6.1f} s wall for {n} prompts = {3600 * n / wall2:6.0f} prompts/hour ({load2} after)")
    print(f"  speed-up 2 vs 1 process: {wall1 / wall2:.2f}x (the 2 cores are shared with a training job and other helpers; whole-command wall time, model loading included)")
    print(f"  per-prompt results identical between the two runs: {same}")


def _same_results(a: Path, b: Path) -> bool:
    from explain.sweep.manifest import SweepFolder, comparable

    ra = {r["id"]: comparable(r) for r in SweepFolder(a).read_records()}
    rb = {r["id"]: comparable(r) for r in SweepFolder(b).read_records()}
    return ra == rb and len(ra) > 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("analyses", "scaling", "both"), default="both")
    p.add_argument("--scenes", type=int, default=None, help="scenes per measurement (default: 4 for analyses, 16 for scaling)")
    p.add_argument("--analyses", default=",".join(ANALYSES), help="which analyses to time")
    p.add_argument("--masks", type=int, default=None, help="DF-RISE masks (default: the project's default)")
    p.add_argument("--world-seed", type=int, default=7, help="which held-out scenes (a seed no test uses)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    args.analyses = tuple(a for a in args.analyses.split(",") if a)
    if args.part in ("analyses", "both"):
        a = argparse.Namespace(**vars(args))
        a.scenes = args.scenes or 4
        bench_analyses(a)
    if args.part in ("scaling", "both"):
        s = argparse.Namespace(**vars(args))
        s.scenes = args.scenes or 16
        bench_scaling(s)
    print("\nthe paper's protocol on N GPUs (one process per GPU, each prompt whole on one GPU):\n" + PAPER_COMMAND)
    print(json.dumps({"note": "prompts/hour are per process; N GPUs give about N times as many"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
