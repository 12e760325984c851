"""Every third-party distribution the code imports is declared in a requirements file.

A machine where a package was once installed by hand passes every other test even when nothing
declares that package; a fresh machine then fails at import. These tests read the source (no code
is run): the imports of every tracked ``.py`` file, minus the standard library, the project's own
modules, the modules a host application provides, and optional imports guarded by
``except ImportError``. What is left must be named in a requirements file, and what the shipped
package (``explain``, the node pack) imports must be named in the runtime ones, because ``pip
install .`` and ComfyUI install nothing else.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# torch is declared in pre-requirements.txt only (ComfyUI users bring their own, see the README).
RUNTIME_FILES = ("requirements.txt", "pre-requirements.txt")
DEV_FILES = ("requirements-dev.txt",)

# Code that a user gets from `pip install .` or from ComfyUI's custom_nodes folder: its imports must
# be declared in RUNTIME_FILES. Everything else (tests, benchmarks, scripts, the Gradio app, whose
# gradio comes from the Space's SDK or requirements-dev.txt) may use requirements-dev.txt as well.
RUNTIME_CODE = ("explain/", "nodes/", "__init__.py", "install.py")

# Modules a host application provides at run time; nobody pip-installs them for this project.
HOST_MODULES = {
    # ComfyUI's own top-level modules (the node pack runs inside ComfyUI; tests/nodes drives a
    # ComfyUI checkout given by COMFYUI_PATH). ComfyUI's `nodes` shares its name with our package.
    "comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server",
    "latent_preview", "execution", "node_helpers", "nodes",
    # Hugging Face Spaces (ZeroGPU) preinstalls `spaces`; gradio_app.py also guards its import.
    "spaces",
}

# Import name -> distribution, for modules whose distribution is not installed where the test runs
# (importlib.metadata can only map what is installed) and whose names differ.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "gradio_client": "gradio-client",
}

# Handlers that catch a failed import: the import is optional.
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tracked_python_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True, check=True)
        files = out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:  # an unpacked sdist or a copy without .git: walk the tree instead
        skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", "node_modules", "out"}
        files = [
            str(p.relative_to(root)).replace("\\", "/")
            for p in root.rglob("*.py")
            if not skip & set(p.relative_to(root).parts[:-1]) and not p.relative_to(root).parts[0].endswith(".egg-info")
        ]
    return sorted(files)


# Folders whose files run as scripts: Python puts a script's own folder on sys.path, and tests add
# scripts/ to import its modules. Inside the shipped packages a sibling is never importable by its
# bare name (explain/adapters/diffusers/ does not shadow the real diffusers).
SCRIPT_DIRS = ("scripts", "benchmarks")


def own_modules(files: list[str], importer: str) -> set[str]:
    """Top-level names by which ``importer`` reaches the project itself: the repository's top-level
    packages and modules, and, outside the shipped packages, the modules beside it or in SCRIPT_DIRS."""
    names = {f.split("/")[0].removesuffix(".py") for f in files}
    if importer.startswith(RUNTIME_CODE):
        return names
    folders = {str(Path(importer).parent), *SCRIPT_DIRS}
    for f in files:
        path = Path(f)
        if str(path.parent) in folders:
            names.add(path.stem)
        elif path.name == "__init__.py" and str(path.parent.parent) in folders:
            names.add(path.parent.name)
    return names


def _handler_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:  # a bare `except:` catches ImportError too
        return {"BaseException"}
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {getattr(k, "id", getattr(k, "attr", "")) for k in kinds}


def is_guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True if ``node`` sits in the body of a ``try`` whose handlers catch ImportError."""
    child, current = node, parents.get(node)
    while current is not None:
        if isinstance(current, ast.Try) and child in current.body:
            if any(_handler_names(h) & IMPORT_ERRORS for h in current.handlers):
                return True
        child, current = current, parents.get(current)
    return False


def third_party_imports(source: str, filename: str, own: set[str]) -> tuple[set[str], set[str]]:
    """(required, optional) top-level third-party module names imported by ``source``."""
    tree = ast.parse(source, filename)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    required, optional = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or top in own or top in HOST_MODULES:
                continue
            (optional if is_guarded(node, parents) else required).add(top)
    return required, optional - required


def distributions(module: str, installed: dict[str, list[str]]) -> set[str]:
    """Normalized distribution names that may provide ``module``."""
    names = {normalize(d) for d in installed.get(module, [])}
    names.add(normalize(DISTRIBUTION_OF.get(module, module)))
    return names


def requirement_names(path: Path) -> list[str]:
    if not path.exists():
        return []
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line) if line and not line.startswith("-") else None
        if match:
            names.append(normalize(match.group(0)))
    return names


def declared(root: Path, files: tuple[str, ...]) -> set[str]:
    return {name for f in files for name in requirement_names(root / f)}


def undeclared_imports(root: Path) -> list[str]:
    """One line per (file, module) whose distribution no fitting requirements file names."""
    files = tracked_python_files(root)
    installed = metadata.packages_distributions()
    runtime = declared(root, RUNTIME_FILES)
    anywhere = runtime | declared(root, DEV_FILES)
    problems = []
    for f in files:
        path = root / f
        if not path.is_file():  # deleted in the work tree, still tracked
            continue
        required, _ = third_party_imports(path.read_text(encoding="utf-8"), f, own_modules(files, f))
        is_runtime = f.startswith(RUNTIME_CODE)
        allowed = runtime if is_runtime else anywhere
        where = " + ".join(RUNTIME_FILES) if is_runtime else " or ".join(RUNTIME_FILES + DEV_FILES)
        for module in sorted(required):
            candidates = distributions(module, installed)
            if not candidates & allowed:
                problems.append(
                    f"{f} imports {module!r} (distribution {' / '.join(sorted(candidates))}), declared in none of {where}"
                )
    return problems


# ------------------------------------------------------------------------------------------ tests
def test_every_third_party_import_is_declared():
    problems = undeclared_imports(REPO)
    assert not problems, (
        "declare these distributions (runtime: requirements.txt and pyproject.toml's dependencies; "
        "tests, benchmarks, scripts and the app: requirements-dev.txt and pyproject's dev extra), "
        "or guard an optional import with `except ImportError`:\n  " + "\n  ".join(problems)
    )


def test_pyproject_dev_extra_equals_requirements_dev():
    """pyproject's dependencies equal requirements.txt (tests/nodes/test_packaging.py); its dev
    extra equals requirements-dev.txt, so `pip install .[dev]` installs what the README's does."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()]
    assert sorted(project["optional-dependencies"]["dev"]) == sorted(line for line in lines if line)


# ------------------------------------------------------------------- the checker catches what it should
def _project(tmp_path: Path, files: dict[str, str], requirements: str = "", dev: str = "") -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "requirements.txt").write_text(requirements)
    (tmp_path / "requirements-dev.txt").write_text(dev)
    return tmp_path  # no .git here: the checker walks the tree


def test_an_undeclared_import_is_reported(tmp_path):
    root = _project(tmp_path, {"explain/checker.py": "from scipy import ndimage\nimport numpy\n"}, "numpy>=1.24\n")
    problems = undeclared_imports(root)
    assert len(problems) == 1 and "explain/checker.py imports 'scipy'" in problems[0]
    assert undeclared_imports(_project(tmp_path, {}, "numpy>=1.24\nscipy>=1.10  # labels\n")) == []


def test_imports_inside_functions_and_aliased_distributions_count(tmp_path):
    code = "def f():\n    from scipy.stats import rankdata\n    import yaml\n"
    root = _project(tmp_path, {"benchmarks/b.py": code}, dev="PyYAML\n")
    assert [p.split(" imports ")[1].split()[0] for p in undeclared_imports(root)] == ["'scipy'"]


def test_runtime_code_may_not_rely_on_dev_requirements(tmp_path):
    root = _project(tmp_path, {"explain/a.py": "import gradio\n", "tests/t.py": "import gradio\n"}, dev="gradio>=5\n")
    problems = undeclared_imports(root)
    assert len(problems) == 1 and problems[0].startswith("explain/a.py")


@pytest.mark.parametrize(
    "code, optional",
    [
        ("try:\n    import torchvision\nexcept ImportError:\n    torchvision = None\n", True),
        ("try:\n    import torchvision\nexcept (OSError, ModuleNotFoundError):\n    pass\n", True),
        ("try:\n    import torchvision\nexcept Exception:  # broken beside this torch\n    pass\n", True),
        ("try:\n    import torchvision\nexcept ValueError:\n    pass\n", False),
        ("try:\n    pass\nexcept ImportError:\n    import torchvision\n", False),  # the fallback itself
        ("try:\n    import torchvision\nexcept ImportError:\n    pass\nimport torchvision.io\n", False),
    ],
)
def test_only_imports_guarded_by_import_error_are_optional(code, optional):
    required, opt = third_party_imports(code, "x.py", own=set())
    assert (opt, required) == (({"torchvision"}, set()) if optional else (set(), {"torchvision"}))


def test_own_host_and_stdlib_modules_are_not_third_party():
    files = ["explain/trace.py", "benchmarks/bench_cam.py", "benchmarks/sd15_random.py", "scripts/make_example_workflows.py",
             "tests/nodes/comfyui_harness.py", "tests/nodes/test_x.py", "gradio_app.py"]
    own = own_modules(files, "tests/nodes/test_x.py")
    assert {"explain", "benchmarks", "gradio_app", "sd15_random", "make_example_workflows", "comfyui_harness"} <= own
    code = "import json, os.path\nimport explain.trace\nimport sd15_random\nimport folder_paths\nimport comfy.model_management\nfrom . import x\n"
    assert third_party_imports(code, "x.py", own) == (set(), set())


def test_a_folder_inside_the_package_does_not_shadow_a_distribution():
    files = ["explain/adapters/__init__.py", "explain/adapters/tap.py", "explain/adapters/diffusers/__init__.py"]
    assert "diffusers" not in own_modules(files, "explain/adapters/tap.py")
    assert "comfyui_harness" not in own_modules(files + ["tests/nodes/comfyui_harness.py"], "explain/adapters/tap.py")
