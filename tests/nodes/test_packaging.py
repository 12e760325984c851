"""Packaging of the node pack: node contracts, the root __init__ as ComfyUI imports it, the
example workflows, pyproject.toml and install.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import nodes
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

REPO = Path(__file__).resolve().parents[2]
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_node_contract(name):
    cls = NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and "required" in spec and set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for input_name, entry in (spec.get(section) or {}).items():
            assert isinstance(entry, tuple) and entry, f"{name}.{input_name}"
            if len(entry) > 1:
                assert isinstance(entry[1], dict)
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY == "diffusion-explain"
    assert cls.DESCRIPTION and NODE_DISPLAY_NAME_MAPPINGS[name]
    assert name.startswith("DiffusionExplain")


def test_explanation_nodes_take_the_trace_and_the_samplers_latent():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        required = cls.INPUT_TYPES()["required"]
        if "trace" in required and name != "DiffusionExplainSaveTrace":
            assert required["trace"][0] == "EXPLAIN_TRACE" and required["latent"][0] == "LATENT", name
            assert getattr(cls, "OUTPUT_NODE", False), f"{name} must run even with nothing connected downstream"


def test_root_init_loads_like_comfyui_loads_a_pack():
    """ComfyUI imports <pack>/__init__.py under a module name made from its path."""
    spec = importlib.util.spec_from_file_location("custom_nodes_x_diffusion-explain", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
        assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
    finally:
        for key in [k for k in sys.modules if k.startswith(spec.name)]:
            del sys.modules[key]


# ---------------------------------------------------------------------------- example workflows
WORKFLOW_FILES = sorted((REPO / "example_workflows").glob("*.json"))


def test_example_workflows_exist():
    names = {p.name for p in WORKFLOW_FILES}
    assert {"txt2img_explain.json", "sampler_custom_exponential_sigmas.json"} <= names


def test_example_workflows_are_up_to_date():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_example_workflows as maker
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for name, build in maker.WORKFLOWS.items():
        assert json.loads((REPO / "example_workflows" / name).read_text()) == build(), f"regenerate {name}: python scripts/make_example_workflows.py"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_example_workflow_is_a_consistent_graph(path):
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        target = by_id[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == kind == by_id[src]["outputs"][src_slot]["type"]
    for node in workflow["nodes"]:
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        entries = {**spec["required"], **spec.get("optional", {})}
        widgets = [n for n, e in entries.items() if isinstance(e[0], (list, tuple)) or e[0] in WIDGETS]
        # the front end adds a control value after inputs named seed / noise_seed
        controls = [n for n in widgets if n in ("seed", "noise_seed") or entries[n][1:2] and entries[n][1].get("control_after_generate")]
        assert not controls, f"{node['type']} has seed-like inputs {controls}; they shift widget values in saved workflows"
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for value, name in zip(node["widgets_values"], widgets):
            kind = entries[name][0]
            if isinstance(kind, (list, tuple)):
                assert value in kind, f"{node['type']}.{name}={value!r}"
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        missing = [n for n in spec["required"] if n not in widgets and n not in linked]
        assert not missing, f"{node['type']} has unconnected required inputs {missing}"


# ---------------------------------------------------------------------------- pyproject and install.py
def test_pyproject_has_registry_metadata_and_the_requirements():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == "diffusion-explain" and "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and project["urls"]["Repository"]
    assert {"PublisherId", "DisplayName"} <= set(data["tool"]["comfy"])
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(project["dependencies"]) == sorted(line for line in lines if line)
    assert not any(d.startswith(("torch", "torchvision", "torchaudio")) for d in project["dependencies"])


def _install_module():
    spec = importlib.util.spec_from_file_location("explain_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_never_installs_torch(tmp_path):
    install = _install_module()
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# deps\ntorch>=2.0\nTorchVision\ntorch_audio==1\ntorchaudio\ndiffusers>=0.27  # core\n-r other.txt\nnumpy\n")
    assert install.requirements(str(reqs)) == ["torch_audio==1", "diffusers>=0.27", "numpy"]
    command = install.pip_command(["numpy"], "c.txt")
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "--constraint" in command
    assert not any(part.startswith("torch") for part in command)


def test_install_dry_run_pins_the_installed_torch():
    out = subprocess.run([sys.executable, str(REPO / "install.py"), "--dry-run"], capture_output=True, text=True, check=True).stdout
    import torch

    assert "pip install" in out and "diffusers" in out
    assert f"torch=={torch.__version__}" in out
    assert " torch" not in out.splitlines()[0]
