"""The sweep as users launch it: subprocesses of ``python -m explain sweep``, one process, two
processes under ``accelerate launch`` (gloo on the CPU), and a run killed half-way and resumed.

Each needs a few seconds of model loading per process (the tiny random-weight pipeline)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explain.sweep.manifest import SweepFolder, comparable

REPO = Path(__file__).resolve().parents[3]
PROMPTS = "\n".join(
    [
        '{"prompt": "a red circle"}',
        '{"prompt": "a blue square on the left", "seed": 11}',
        '{"prompt": "a green triangle", "seed": "eleven"}',
        '{"prompt": "a small yellow circle at the top"}',
        '{"prompt": "a green triangle above a red circle"}',
        '{"prompt": "a large purple square on the right"}',
        '{"prompt": "a cyan circle below a blue triangle"}',
        '{"prompt": "a red square, a blue circle and a green triangle in a row"}',
    ]
)
ARGS = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--steps", "6", "--analyses", "concepts,recovery,rise", "--masks", "8", "--game-space", "latent", "--baselines", "random", "--no-progress"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def sweep_command(prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "explain", "sweep", str(prompts), "--out", str(out), *ARGS]


def results(out: Path) -> dict:
    return {r["id"]: comparable(r) for r in SweepFolder(out).read_records()}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text(PROMPTS + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "sweep"
    done = subprocess.run(sweep_command(prompt_file, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_give_exactly_the_one_process_results(prompt_file, one_process, tmp_path):
    pytest.importorskip("accelerate", reason="the multi-process sweep needs accelerate: pip install -r requirements-dev.txt")
    out = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "explain", "sweep", str(prompt_file), "--out", str(out), *ARGS,
    ]  # fmt: skip
    done = subprocess.run(launch, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = {p.name: p.read_text().splitlines() for p in (out / "shards").glob("*.jsonl")}
    assert set(logs) == {"rank-0-of-2.jsonl", "rank-1-of-2.jsonl"}
    assert all(len(lines) >= 3 for lines in logs.values())  # both processes did a share: 8 rows -> 4 + 4
    assert sum(len(v) for v in logs.values()) == 8
    one, two = results(one_process), results(out)
    assert one.keys() == two.keys() and len(one) == 8
    assert one == two
    statuses = sorted(r["status"] for r in two.values())
    assert statuses == ["invalid"] + ["ok"] * 7
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 7 and report["auc"]["methods"]["rise"]["insertion_latent"]["n"] == 7


def test_a_killed_sweep_resumes_where_it_stopped_with_the_same_results(prompt_file, one_process, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(sweep_command(prompt_file, out), env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = SweepFolder(out)
    deadline = time.monotonic() + 300
    try:
        while folder.count_records() < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # no chance to clean up, as a preempted job
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert still_running, "the sweep finished before it could be killed; the test needs a slower sweep"
    done_at_kill = folder.record_ids()
    assert 3 <= len(done_at_kill) < 8
    for rid in done_at_kill:  # every record on disk is whole
        json.loads(folder.record_path(rid).read_text())

    resumed = subprocess.run(sweep_command(prompt_file, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(done_at_kill)} already done, {8 - len(done_at_kill)} to run" in resumed.stderr
    assert results(out) == results(one_process)
    assert not [p for p in folder.records.iterdir() if p.name.endswith(".tmp")]
