"""Install diffusion-explain's requirements into the Python that runs ComfyUI.

ComfyUI-Manager runs this file (from the pack's folder) after installing ``requirements.txt``;
you can also run it yourself with ComfyUI's interpreter:

    path/to/ComfyUI/python -s path/to/custom_nodes/diffusion-explain/install.py

It never installs, upgrades or downgrades torch (nor torchvision / torchaudio): requirement
lines naming them are skipped, and the versions already installed are pinned with a pip
constraints file, so no other requirement can pull a different torch in. ``--dry-run`` prints
the pip command instead of running it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
PROTECTED = ("torch", "torchvision", "torchaudio")


def _environment():
    """nodes/environment.py, loaded by path: importing the ``nodes`` package would need ComfyUI."""
    spec = importlib.util.spec_from_file_location("diffusion_explain_environment", os.path.join(HERE, "nodes", "environment.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


requirement_name = _environment().requirement_name  # one parser for install.py and the load-time check


def requirements(path: str) -> list[str]:
    """Requirement lines of ``path`` without torch, torchvision and torchaudio."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if requirement_name(line) and requirement_name(line) not in PROTECTED]


def installed_protected() -> dict[str, str]:
    found = {}
    for name in PROTECTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def pip_command(packages: list[str], constraints_file: str | None) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--upgrade-strategy", "only-if-needed"]
    if constraints_file:
        command += ["--constraint", constraints_file]
    return command + packages


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    packages = requirements(os.path.join(HERE, "requirements.txt"))
    if not packages:
        print("diffusion-explain: nothing to install")
        return 0
    pinned = installed_protected()
    if "torch" not in pinned:
        print(
            "diffusion-explain: torch is not installed in this Python; install the build for your GPU "
            "(https://pytorch.org) and run this again. Installing the other requirements only."
        )
    with tempfile.TemporaryDirectory() as tmp:
        constraints = None
        if pinned:
            constraints = os.path.join(tmp, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as f:
                f.writelines(f"{name}=={version}\n" for name, version in pinned.items())
        command = pip_command(packages, constraints)
        if dry_run:
            print(" ".join(command))
            if constraints:
                print("# constraints: " + ", ".join(f"{n}=={v}" for n, v in pinned.items()))
            return 0
        print("diffusion-explain: " + " ".join(command[3:]))
        return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
