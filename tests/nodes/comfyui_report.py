"""Running the ComfyUI harness once per test session (every scenario in one ComfyUI
subprocess) and reading what a scenario reported; used by the integration test modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_harness(tmp_path_factory) -> dict:
    comfyui = os.environ["COMFYUI_PATH"]
    work = tmp_path_factory.mktemp("comfyui")
    out = work / "results.json"
    cache = Path(os.environ.get("EXPLAIN_TEST_CACHE", Path(tempfile.gettempdir()) / "diffusion-explain-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(HERE / "comfyui_harness.py"),
        "--comfyui", comfyui, "--work", str(work), "--out", str(out), "--checkpoint-cache", str(cache),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=2400)
    if not out.is_file():
        pytest.fail(f"the ComfyUI harness wrote no results (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def scenario(report, name: str) -> dict:
    facts = report.get(name)
    assert facts is not None, f"scenario {name} did not run"
    assert "crashed" not in facts, facts.get("traceback", facts.get("crashed"))
    return facts


def ok(result: dict) -> dict:
    assert result["ok"], json.dumps(result.get("error") or result, indent=1)[:4000]
    return result


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
