"""Run the real ComfyUI headlessly on diffusion-explain graphs (used by test_comfyui_integration).

ComfyUI keeps global state (parsed command line, loaded nodes, model management), so it runs
in a subprocess of its own: ``python tests/nodes/comfyui_harness.py --comfyui PATH --work DIR
--out results.json``. The harness

1. starts ComfyUI the way ``main.py`` does, minus the web server: ``--cpu``, output, temp and
   input folders under ``--work``; ComfyUI's own node loading (``init_extra_nodes``) with this
   repository linked into a ``custom_nodes`` folder;
2. builds a tiny SD1-shaped checkpoint once (random weights in ComfyUI's SD1.x state-dict key
   layout, fp16 safetensors, cached beside ``--work``): UNet with ``model_channels`` 320 and
   ``context_dim`` 768 (what ComfyUI's SD15 detection requires) but one ResNet and one
   transformer block per level and two levels, full-size CLIP-L text encoder and SD VAE
   (ComfyUI builds those from fixed configs, so every weight must be present);
3. converts the example workflows (UI format, as the front end saves them) to API prompts with
   the loaded nodes' ``INPUT_TYPES``, validates them with ``execution.validate_prompt`` and runs
   them with ``execution.PromptExecutor``;
4. registers two test-only nodes for the joint-attention (DiT) graphs: a loader of tiny SD3 / Flux /
   Chroma models built with ComfyUI's own classes (``comfyui_dit_models.py``) and a test "speed
   pack" attention override (``comfyui_dit_scenarios.py``);
5. writes what every scenario found to ``--out`` as JSON, for the tests to assert on.

Only torch-free stubs are added: ``torchvision`` (imported by model files ComfyUI never uses
for SD1, and broken from PyPI beside this project's torch) becomes an empty module when it
cannot be imported.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import time
import traceback
import types
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
CHECKPOINT_NAME = "tiny-sd1-explain-test-v1.safetensors"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# ---------------------------------------------------------------------------- ComfyUI start-up
def bootstrap(comfyui: Path, work: Path):
    """Import ComfyUI headlessly and load its nodes plus this repository as a custom node pack."""
    for sub in ("output", "temp", "input", "custom_nodes", "checkpoints"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    link = work / "custom_nodes" / "diffusion-explain"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(comfyui))
    sys.argv = [
        "main.py",
        "--cpu",
        "--output-directory", str(work / "output"),
        "--temp-directory", str(work / "temp"),
        "--input-directory", str(work / "input"),
    ]  # fmt: skip
    import transformers  # noqa: F401 - before the torchvision stub, which transformers would probe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken beside this torch
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.transforms"] = stub.transforms
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    torch.set_num_threads(int(os.environ.get("EXPLAIN_TEST_THREADS", "1")))
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("checkpoints", str(work / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("custom_nodes", str(work / "custom_nodes"), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


def pack_module(name: str):
    """A module of the loaded pack (``nodes.runs``, ``nodes.taps``...) as ComfyUI imported it."""
    suffix = "." + name
    for key, module in list(sys.modules.items()):
        if key.endswith(suffix) and "diffusion-explain" in key:
            return module
    raise KeyError(f"the pack's module {name} was not loaded")


# ---------------------------------------------------------------------------- tiny checkpoint
def _randomize(module, generator) -> None:
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_tiny_sd1(path: Path, comfyui: Path) -> Path:
    """A random-weight SD1.x checkpoint in ComfyUI's (original LDM) key layout."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(0)
    detected = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
        "channel_mult": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
        "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
    }  # fmt: skip
    unet = UNetModel(**comfy.supported_models.SD15(dict(detected)).unet_config, device="cpu", operations=comfy.ops.disable_weight_init)
    _randomize(unet, gen)
    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _randomize(vae, gen)
    config = json.loads((comfyui / "comfy" / "sd1_clip_config.json").read_text())
    config.pop("architectures", None)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**config))
    state: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        state["model.diffusion_model." + k] = v.half()
    for k, v in vae.state_dict().items():
        state["first_stage_model." + k] = v.half()
    for k, v in clip.state_dict().items():
        if v.ndim >= 2:
            t = torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5
        elif k.endswith("bias"):
            t = torch.zeros(v.shape)
        elif "position_ids" in k:
            t = torch.arange(v.shape[-1]).view(v.shape)
        else:
            t = torch.ones(v.shape)
        state["cond_stage_model.transformer." + k] = t.half() if t.is_floating_point() else t
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- workflows
def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def _input_spec(nodes_module, class_type: str) -> list[tuple[str, object, dict]]:
    cls = nodes_module.NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, kind, options))
    return out


def _is_widget(kind, options: dict) -> bool:
    if isinstance(kind, (list, tuple)):
        return True
    return str(kind) in WIDGET_TYPES and not options.get("forceInput", False)


def workflow_to_prompt(nodes_module, workflow: dict, overrides: dict | None = None) -> dict:
    """The API prompt (``{id: {"class_type", "inputs"}}``) of a UI-format workflow.

    Widget values are matched to inputs in ``INPUT_TYPES`` order, as the front end does
    (a seed widget with ``control_after_generate`` is followed by its control value);
    ``overrides`` maps a node id or class type to ``{input: value}``."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        class_type = node["type"]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, kind, options in _input_spec(nodes_module, class_type):
            if _is_widget(kind, options):
                value = values.pop(0) if values else options.get("default")
                if (options.get("control_after_generate") or name in ("seed", "noise_seed")) and values:  # as the front end
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), int(link[2])]
        for key in (str(node["id"]), class_type):
            inputs.update((overrides or {}).get(key, {}))
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------- running prompts
class _Server:
    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


class Runner:
    def __init__(self):
        import execution

        self.execution = execution
        self.executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)

    def run(self, prompt: dict) -> dict:
        prompt = copy.deepcopy(prompt)
        prompt_id = uuid.uuid4().hex
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return {"ok": False, "stage": "validation", "error": valid[1], "node_errors": _jsonable(valid[3])}
        started = time.perf_counter()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        seconds = time.perf_counter() - started
        messages = [(event, data) for event, data in self.executor.status_messages]
        errors = [data for event, data in messages if event == "execution_error"]
        cached = next((data["nodes"] for event, data in messages if event == "execution_cached"), [])
        return {
            "ok": bool(self.executor.success) and not errors,
            "stage": "execution",
            "seconds": round(seconds, 2),
            "outputs": _jsonable(self.executor.history_result.get("outputs", {})),
            "cached": list(cached),
            "error": {k: errors[0].get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")} if errors else None,
        }

    def cached_output(self, node_id: str, slot: int = 0):
        """The Python value of output ``slot`` of ``node_id`` from the last run (e.g. a MODEL)."""
        value = self.executor.caches.outputs.get(str(node_id))
        return None if value is None else value[slot][0]


def _comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _jsonable(value):
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------------------- scenarios
def _load_scenarios():
    """tests/nodes/comfyui_scenarios.py, by file: ComfyUI's own ``tests`` package shadows ours."""
    import importlib.util

    if "comfyui_harness" not in sys.modules:  # run as a script (or under a profiler): expose our globals
        harness = types.ModuleType("comfyui_harness")
        harness.__dict__.update(globals())
        sys.modules["comfyui_harness"] = harness
    modules = []
    for name in ("comfyui_scenarios", "comfyui_dit_models", "comfyui_dit_scenarios"):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the DiT scenarios import the others by these names
        spec.loader.exec_module(module)
        modules.append(module)
    scenarios, _models, dit = modules
    return scenarios.SCENARIOS | dit.SCENARIOS, dit.register


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--checkpoint-cache", type=Path, default=None)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    started = time.perf_counter()
    nodes_module = bootstrap(args.comfyui.resolve(), work)
    results: dict = {"import_seconds": round(time.perf_counter() - started, 1), "comfyui": str(args.comfyui)}
    cache = (args.checkpoint_cache or work).resolve() / CHECKPOINT_NAME
    if not cache.exists():
        t = time.perf_counter()
        build_tiny_sd1(cache, args.comfyui.resolve())
        results["checkpoint_build_seconds"] = round(time.perf_counter() - t, 1)
    target = work / "checkpoints" / CHECKPOINT_NAME
    if not target.exists():
        target.symlink_to(cache)
    results["loaded_pack"] = sorted(k for k in nodes_module.NODE_CLASS_MAPPINGS if k.startswith("DiffusionExplain"))
    scenarios, register_test_nodes = _load_scenarios()
    register_test_nodes(nodes_module)  # the tiny DiT loader and the test speed pack, for the DiT graphs
    results["comfyui_version"] = _comfyui_version()
    runner = Runner()
    only = {s for s in args.only.split(",") if s}
    for name, scenario in scenarios.items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            results[name] = scenario(runner, nodes_module, work)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other scenarios
            results[name] = {"crashed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results.setdefault(name, {})["scenario_seconds"] = round(time.perf_counter() - t, 1)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
