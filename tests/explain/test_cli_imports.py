"""`explain open` makes a report from a saved trace without importing a model library: its
start-up is torch and the report, not diffusers' (measured at 3.3-4.6 s, most of it torch._dynamo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.explain.synthetic import synthetic_trace

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("diffusers", "transformers", "gradio", "torch._dynamo")

PROBE = """
import json, sys
from explain.cli import main
code = main(["open", sys.argv[1], "--out", sys.argv[2], "--quiet"])
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_open_imports_no_model_library(tmp_path):
    path = synthetic_trace(steps=2).save(tmp_path / "run.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tmp_path / "rep")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}
    assert (tmp_path / "rep" / "index.html").is_file()
