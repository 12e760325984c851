"""What the pack needs from where it runs, checked when ComfyUI loads it: the Python packages in
``requirements.txt`` (a ``git clone`` without ``pip install -r requirements.txt`` loads fine,
because the heavy imports are lazy, and would otherwise fail deep inside a run) and a ComfyUI with
the interfaces the tap uses. Standard library only, so these checks run before anything can fail
to import; ``install.py`` reads requirement lines with the same parser."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PACK_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = PACK_DIR / "requirements.txt"
MIN_COMFYUI = "0.3.52"  # PREDICT_NOISE wrappers; pyproject's [tool.comfy] requires-comfyui says the same
IMPORT_NAMES = {"pillow": "PIL"}  # distribution name -> module name, where they differ


class MissingRequirementError(RuntimeError):
    """A node needs a Python package that is not installed in ComfyUI's Python."""


@dataclass(frozen=True)
class Requirement:
    line: str  # as written in requirements.txt, e.g. "matplotlib>=3.7"
    name: str  # normalised distribution name, e.g. "matplotlib"
    minimum: tuple[int, ...] | None  # from ">=", if any


# ---------------------------------------------------------------------------- requirement lines
def requirement_name(line: str) -> str:
    """The project name a requirement line names ('' for comments, options and blanks)."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return ""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "3.7.1rc1" -> (3, 7, 1)."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group(0)))
        if digits.group(0) != piece:
            break
    return tuple(parts)


def parse_requirements(path: str | Path = REQUIREMENTS) -> list[Requirement]:
    out = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        name = requirement_name(line)
        if not name:
            continue
        minimum = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", line)
        out.append(Requirement(line=line, name=name, minimum=version_tuple(minimum.group(1)) if minimum else None))
    return out


# ---------------------------------------------------------------------------- what is installed
def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(path: str | Path = REQUIREMENTS) -> list[str]:
    """The requirements of ``path`` that this Python lacks or has too old, as
    ``"matplotlib>=3.7"`` or ``"numpy>=1.24 (found 1.21.0)"``."""
    missing = []
    for req in parse_requirements(path):
        found = installed_version(req.name)
        if found is None:
            missing.append(req.line)
        elif req.minimum and version_tuple(found) and version_tuple(found) < req.minimum:
            missing.append(f"{req.line} (found {found})")
    return missing


def install_command() -> str:
    """How to install the requirements with the Python that runs ComfyUI (and never touch its torch)."""
    python = f'"{sys.executable}"'
    return f'{python} "{PACK_DIR / "install.py"}" (or, in {PACK_DIR}: {python} -m pip install -r requirements.txt)'


def load_message(missing: Sequence[str]) -> str:
    """The one line logged at load when requirements are missing."""
    return (
        f"diffusion-explain: missing Python packages {', '.join(missing)}; the explanation nodes refuse to run until "
        f"they are installed. Install them with ComfyUI's Python, then restart ComfyUI: {install_command()}"
    )


def node_requirement_error(modules: Sequence[str]) -> str | None:
    """Why a node that imports ``modules`` cannot run here, or None when it can."""
    absent = [m for m in modules if not module_available(m)]
    if not absent:
        return None
    return (
        f"this node needs {', '.join(absent)}, which is not installed in ComfyUI's Python. Install the pack's "
        f"requirements, then restart ComfyUI: {install_command()}"
    )


def require(modules: Sequence[str]) -> None:
    """Raise `MissingRequirementError` when a module of ``modules`` is not installed."""
    error = node_requirement_error(modules)
    if error:
        raise MissingRequirementError(error)


# ---------------------------------------------------------------------------- ComfyUI itself
def inside_comfyui() -> bool:
    """Whether this process is ComfyUI (its ``folder_paths`` module is there), as opposed to, say,
    pytest importing the repository root as a package."""
    return module_available("folder_paths")


def unsupported_comfyui() -> str | None:
    """Why the running ComfyUI cannot host the pack (too old), or None."""
    found = _comfyui_version()
    if not module_available("comfy_api.v0_0_2"):
        return _too_old(found, "it has no V3 node API (comfy_api.v0_0_2)")
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError as exc:
        return _too_old(found, f"comfy.patcher_extension cannot be imported ({exc})")
    if not hasattr(WrappersMP, "PREDICT_NOISE"):
        return _too_old(found, "it has no PREDICT_NOISE wrappers")
    return None


def _comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001 - an old or unusual checkout
        return "an unknown version"


def _too_old(found: str, why: str) -> str:
    return (
        f"diffusion-explain needs ComfyUI {MIN_COMFYUI} or newer, but this is {found} ({why}); "
        "update ComfyUI, then restart it. The pack's nodes are not loaded."
    )
