"""Packaging of the node pack: V3 node contracts (ids, inputs and outputs unchanged since the V1
nodes, tooltips), the root __init__ as ComfyUI imports it, the example workflows in UI and API
format, pyproject.toml, the registry files and install.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib

from nodes import environment
from nodes.pack import NODES, NODES_BY_ID
from tests.nodes.stubs import install_comfy_stubs

REPO = Path(__file__).resolve().parents[2]
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The nodes' interface as the V1 nodes declared it (INPUT_TYPES, RETURN_TYPES, RETURN_NAMES), written
# out before the port to V3: saved workflows refer to these ids, input names and their order.
V1_INTERFACE = json.loads((REPO / "tests" / "nodes" / "data" / "node_interface_v1.json").read_text())


def inputs_of(node) -> list[dict]:
    """A node's inputs as ComfyUI's V1 view lists them: name, section, type, choices."""
    out = []
    for inp in node.define_schema().inputs:
        entry = {"name": inp.id, "section": "optional" if inp.optional else "required", "type": str(inp.get_io_type())}
        if getattr(inp, "options", None) is not None:
            entry["options"] = list(inp.options)
        out.append(entry)
    return out


def outputs_of(node) -> list[dict]:
    return [{"name": o.display_name or str(o.io_type), "type": str(o.io_type)} for o in node.define_schema().outputs]


# ---------------------------------------------------------------------------- node contracts
@pytest.mark.parametrize("node_id", sorted(NODES_BY_ID))
def test_node_ids_inputs_and_outputs_are_those_saved_workflows_know(node_id):
    node, before = NODES_BY_ID[node_id], V1_INTERFACE[node_id]
    schema = node.define_schema()
    assert schema.node_id == node_id and schema.display_name == before["display_name"]
    now = inputs_of(node)
    assert [(i["name"], i["section"], i["type"]) for i in now] == [(i["name"], i["section"], i["type"]) for i in before["inputs"]]
    for was, is_ in zip(before["inputs"], now):
        if "options" in was:
            assert is_["options"] == was["options"], f"{node_id}.{was['name']}"
    assert outputs_of(node) == before["outputs"]
    assert bool(schema.is_output_node) == before["output_node"]
    assert [str(getattr(h, "value", h)) for h in schema.hidden or []] == before["hidden"]
    assert set(V1_INTERFACE) == set(NODES_BY_ID) and len(NODES) == len(NODES_BY_ID)


@pytest.mark.parametrize("node_id", sorted(NODES_BY_ID))
def test_every_input_and_output_has_a_tooltip_and_the_node_a_description(node_id):
    schema = NODES_BY_ID[node_id].define_schema()
    for port in [*schema.inputs, *schema.outputs]:
        assert port.tooltip and len(port.tooltip) > 8, f"{node_id}.{port.id} has no tooltip"
    assert schema.description and schema.category == "diffusion-explain"


def test_widget_defaults_follow_the_core_defaults():
    from explain.methods import defaults

    def widget_defaults(node_id):
        return {i.id: i.as_dict().get("default") for i in NODES_BY_ID[node_id].define_schema().inputs}

    rise, cam = widget_defaults("DiffusionExplainRise"), widget_defaults("DiffusionExplainCam")
    d = defaults.RISE
    assert (rise["n_masks"], rise["similarity"], rise["quantity"], rise["masks"], rise["p"], rise["centered"], rise["mask_seed"]) == (
        d.n_masks, d.similarity, d.quantity, d.masks, d.p, d.centered, d.seed,
    )  # fmt: skip
    assert (cam["layers"], cam["target"], cam["quantity"]) == (defaults.CAM.layers, defaults.CAM.target, defaults.CAM.quantity)


def test_explanation_nodes_take_the_trace_and_the_samplers_latent():
    for node_id, node in NODES_BY_ID.items():
        required = {i["name"]: i["type"] for i in inputs_of(node) if i["section"] == "required"}
        if "trace" in required and node_id != "DiffusionExplainSaveTrace":
            assert required["trace"] == "EXPLAIN_TRACE" and required["latent"] == "LATENT", node_id
            assert node.define_schema().is_output_node, f"{node_id} must run even with nothing connected downstream"


# ---------------------------------------------------------------------------- the root __init__
def _load_root(monkeypatch, name="custom_nodes_x_diffusion-explain"):
    """Import <pack>/__init__.py as ComfyUI does: a module named after its path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k.startswith(spec.name + ".")]:
            monkeypatch.delitem(sys.modules, key)
    return module


def test_root_init_gives_comfyui_a_v3_entrypoint_with_every_node(monkeypatch):
    install_comfy_stubs(monkeypatch)  # a ComfyUI with PREDICT_NOISE wrappers
    module = _load_root(monkeypatch)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "ComfyUI would take the V1 path and never call comfy_entrypoint"
    extension = asyncio.run(module.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    assert sorted(n.define_schema().node_id for n in node_list) == sorted(NODES_BY_ID)


def test_root_init_on_a_comfyui_too_old_loads_no_nodes_and_says_why(monkeypatch, caplog):
    install_comfy_stubs(monkeypatch)
    old = types.ModuleType("comfy.patcher_extension")
    old.WrappersMP = type("WrappersMP", (), {"OUTER_SAMPLE": "outer_sample"})  # before PREDICT_NOISE (0.3.52)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", old)
    with caplog.at_level(logging.WARNING, logger="diffusion-explain"):
        module = _load_root(monkeypatch)
    assert module.NODE_CLASS_MAPPINGS == {} and not hasattr(module, "comfy_entrypoint")
    lines = [r.getMessage() for r in caplog.records if "needs ComfyUI" in r.getMessage()]
    assert len(lines) == 1 and environment.MIN_COMFYUI in lines[0] and "PREDICT_NOISE" in lines[0]


def test_root_init_names_missing_requirements_and_the_command_in_one_line(monkeypatch, caplog):
    """A git clone without pip install -r requirements.txt: one warning at load, with the command."""
    install_comfy_stubs(monkeypatch)
    real_version = environment.importlib.metadata.version

    def version(name):
        if name in ("matplotlib", "diffusers"):
            raise environment.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(environment.importlib.metadata, "version", version)
    with caplog.at_level(logging.WARNING, logger="diffusion-explain"):
        _load_root(monkeypatch)
    lines = [r.getMessage() for r in caplog.records if "missing Python packages" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "matplotlib>=3.7" in lines[0] and "diffusers>=0.27" in lines[0] and "numpy" not in lines[0]
    assert sys.executable in lines[0] and "install.py" in lines[0] and "-m pip install -r requirements.txt" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion-explain"):
        monkeypatch.setattr(environment.importlib.metadata, "version", real_version)
        _load_root(monkeypatch, name="custom_nodes_y_diffusion-explain")
    assert not [r for r in caplog.records if "missing Python packages" in r.getMessage()]


# ---------------------------------------------------------------------------- example workflows
def _maker():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_example_workflows as maker
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return maker


UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))
API_FILES = sorted((REPO / "example_workflows" / "api").glob("*.json"))


def test_example_workflows_exist_in_both_formats():
    names = {p.name for p in UI_FILES}
    assert {"txt2img_explain.json", "sampler_custom_exponential_sigmas.json"} <= names
    assert names == {p.name for p in API_FILES}


def test_example_workflows_are_up_to_date():
    for relative, content in _maker().outputs().items():
        assert json.loads((REPO / relative).read_text()) == content, f"regenerate {relative}: python scripts/make_example_workflows.py"


def _spec(class_type):
    """name -> (type, choices) and the widget names of one of the pack's nodes, in schema order."""
    entries = {i["name"]: i for i in inputs_of(NODES_BY_ID[class_type])}
    widgets = [n for n, e in entries.items() if e["type"] in WIDGETS]
    return entries, widgets


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_a_consistent_graph(path):
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        target = by_id[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == kind == by_id[src]["outputs"][src_slot]["type"]
    for node in workflow["nodes"]:
        if node["type"] not in NODES_BY_ID:
            continue
        entries, widgets = _spec(node["type"])
        # the front end adds a control value after inputs named seed / noise_seed
        assert not [n for n in widgets if n in ("seed", "noise_seed")], f"{node['type']} has seed-like inputs"
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for value, name in zip(node["widgets_values"], widgets):
            if "options" in entries[name]:
                assert value in entries[name]["options"], f"{node['type']}.{name}={value!r}"
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        missing = [n for n, e in entries.items() if e["section"] == "required" and n not in widgets and n not in linked]
        assert not missing, f"{node['type']} has unconnected required inputs {missing}"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_the_ui_workflow_as_a_prompt(path):
    """Same nodes, same widget values by name, every link as [source id, slot]."""
    prompt = json.loads(path.read_text())
    ui = json.loads((path.parent.parent / path.name).read_text())
    assert sorted(prompt, key=int) == [str(n["id"]) for n in ui["nodes"]]
    for node in ui["nodes"]:
        entry = prompt[str(node["id"])]
        assert entry["class_type"] == node["type"]
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = next(li for li in ui["links"] if li[0] == socket["link"])
                assert entry["inputs"][socket["name"]] == [str(link[1]), link[2]]
        if node["type"] in NODES_BY_ID:
            _, widgets = _spec(node["type"])
            linked = {s["name"] for s in node["inputs"] if s["link"] is not None}
            values = dict(zip(widgets, node["widgets_values"]))
            assert {k: v for k, v in entry["inputs"].items() if k in widgets and k not in linked} == {k: v for k, v in values.items() if k not in linked}


# ---------------------------------------------------------------------------- pyproject and install.py
def test_pyproject_has_registry_metadata_and_the_requirements():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == "diffusion-explain" and "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and project["urls"]["Repository"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(data["tool"]["comfy"])
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(project["dependencies"]) == sorted(line for line in lines if line)
    assert not any(d.startswith(("torch", "torchvision", "torchaudio")) for d in project["dependencies"])


def test_registry_files_license_icon_urls_and_the_comfyui_floor():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").read_text().startswith("MIT License")
    repository = project["urls"]["Repository"].rstrip("/")
    owner_repo = repository.removeprefix("https://github.com/")
    assert owner_repo.count("/") == 1 and repository.startswith("https://github.com/")
    for name, url in project["urls"].items():
        assert url.startswith(repository) and not any(w in url.lower() for w in ("example", "todo", "your", "placeholder")), name
    icon = comfy["Icon"]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert icon.startswith(prefix) and (REPO / icon.removeprefix(prefix)).is_file(), icon
    assert comfy["requires-comfyui"] == f">={environment.MIN_COMFYUI}"


def test_publish_workflow_is_the_registry_action_on_pyproject_changes():
    text = (REPO / ".github" / "workflows" / "publish.yml").read_text()
    lines = [line.split("#", 1)[0].rstrip() for line in text.splitlines()]
    code = "\n".join(line for line in lines if line.strip())
    assert "workflow_dispatch:" in code and '- "pyproject.toml"' in code and "branches:\n      - main" in code
    assert "uses: actions/checkout@v4" in code and "uses: Comfy-Org/publish-node-action@v1" in code
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in code
    owner = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"].split("/")[3]
    assert f"if: ${{{{ github.repository_owner == '{owner}' }}}}" in code


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
