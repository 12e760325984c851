"""The suite runs in a clone of any folder name, such as `git clone …/diffusion-explain`.

pytest imports the root ``__init__.py`` (the ComfyUI pack's entry) before any test, because the
root holds one; where the folder name is no Python identifier it imports it as a plain module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_clone_named_diffusion_explain_collects(tmp_path):
    clone = tmp_path / "diffusion-explain"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(REPO / "pytest.ini", clone)
    # a link: the entry finds `explain` and `nodes` beside its real path, as in a full clone
    (clone / "__init__.py").symlink_to(REPO / "__init__.py")
    (clone / "tests" / "__init__.py").write_text("")
    (clone / "tests" / "test_one.py").write_text("def test_one():\n    assert True\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
