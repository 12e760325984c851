"""Stand-ins for the parts of ComfyUI the node pack touches, so its unit tests run without
ComfyUI: ``comfy.patcher_extension``, ``folder_paths``, a ModelPatcher with ComfyUI's patching
API (clone deep-copies ``model_options``, as ComfyUI's does) and a UNet-shaped module tree."""

from __future__ import annotations

import copy
import importlib.machinery
import os
import sys
import types

import torch


def install_comfy_stubs(monkeypatch) -> None:
    """Put a minimal ``comfy.patcher_extension`` and ``comfy.ldm.modules.attention`` (its
    ``optimized_attention`` as plain SDPA) into ``sys.modules`` for this test."""
    comfy = types.ModuleType("comfy")
    ext = types.ModuleType("comfy.patcher_extension")

    class WrappersMP:
        OUTER_SAMPLE = "outer_sample"
        PREDICT_NOISE = "predict_noise"

    ext.WrappersMP = WrappersMP
    comfy.patcher_extension = ext
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", ext)
    attention = types.ModuleType("comfy.ldm.modules.attention")

    def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        b, _, inner = q.shape
        split = [t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
        return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, -1, inner)

    attention.optimized_attention = optimized_attention
    for name in ("comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", attention)


def install_folder_paths(monkeypatch, root) -> types.ModuleType:
    """A ``folder_paths`` whose output and temp folders live under ``root``."""
    fp = types.ModuleType("folder_paths")
    fp.__spec__ = importlib.machinery.ModuleSpec("folder_paths", None)
    out, tmp = os.path.join(root, "output"), os.path.join(root, "temp")
    os.makedirs(out, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    fp.get_output_directory = lambda: out
    fp.get_temp_directory = lambda: tmp

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [f for f in os.listdir(folder) if f.startswith(name + "_")]
        return folder, name, len(taken) + 1, subfolder, prefix

    fp.get_save_image_path = get_save_image_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


# ---------------------------------------------------------------------------- a UNet-shaped tree
class SpatialTransformer(torch.nn.Module):
    def __init__(self, depth: int = 1):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(TransformerBlock() for _ in range(depth))


class TransformerBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = torch.nn.Identity()


class ResBlock(torch.nn.Module):
    pass


def fake_unet(depths=((1,), (2,), (1,))) -> torch.nn.Module:
    """input_blocks / middle_block / output_blocks with SpatialTransformers of the given depths
    (one per block of each group) beside plain ResBlocks."""
    unet = torch.nn.Module()
    ins, mid, outs = depths
    unet.input_blocks = torch.nn.ModuleList([torch.nn.ModuleList([ResBlock()])] + [torch.nn.ModuleList([ResBlock(), SpatialTransformer(d)]) for d in ins])
    unet.middle_block = torch.nn.ModuleList([ResBlock()] + [SpatialTransformer(d) for d in mid] + [ResBlock()])
    unet.output_blocks = torch.nn.ModuleList([torch.nn.ModuleList([ResBlock(), SpatialTransformer(d)]) for d in outs])
    return unet


class FakeModelPatcher:
    """The slice of ComfyUI's ModelPatcher the tap uses."""

    def __init__(self, diffusion_model=None):
        self.model = types.SimpleNamespace(diffusion_model=diffusion_model if diffusion_model is not None else fake_unet())
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}

    def clone(self):
        n = FakeModelPatcher.__new__(FakeModelPatcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)  # as ComfyUI's clone does
        n.wrappers = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.wrappers.items()}
        return n

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self.model_options.setdefault("transformer_options", {})
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to.setdefault("patches_replace", {}).setdefault(name, {})[key] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def attn2_patches(self) -> dict:
        return self.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


# ---------------------------------------------------------------------------- ComfyUI's V3 node API
def comfy_api_stand_in() -> types.ModuleType:
    """A stand-in for ``comfy_api.v0_0_2`` (``io`` and ``ComfyExtension``) with the parts the pack
    uses: schemas record what they were given, inputs and outputs keep their arguments as
    attributes and ``as_dict()`` (as ComfyUI's do), ``NodeOutput`` keeps ``args`` and ``ui``. It is
    permissive; the integration tests and the unit tests under ``COMFYUI_PATH`` use the real API."""
    io = types.ModuleType("comfy_api.v0_0_2.io")

    class Input:
        def __init__(self, id, display_name=None, optional=False, tooltip=None, **options):
            self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
            for key, value in options.items():
                setattr(self, key, value)
            self._options = options

        def get_io_type(self):
            return self.io_type

        def as_dict(self):
            entries = {"display_name": self.display_name, "optional": self.optional or None, "tooltip": self.tooltip, **self._options}
            renamed = {"force_input": "forceInput", "control_after_generate": "control_after_generate"}
            return {renamed.get(k, k): v for k, v in entries.items() if v is not None}

    class Output:
        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False, **options):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    def comfytype(io_type):
        kind = type(io_type, (), {"io_type": io_type})
        kind.Input = type("Input", (Input,), {"io_type": io_type})
        kind.Output = type("Output", (Output,), {"io_type": io_type})
        return kind

    names = {"Boolean": "BOOLEAN", "Int": "INT", "Float": "FLOAT", "String": "STRING", "Combo": "COMBO", "Image": "IMAGE",
             "Mask": "MASK", "Latent": "LATENT", "Conditioning": "CONDITIONING", "Sigmas": "SIGMAS", "Clip": "CLIP",
             "Vae": "VAE", "Model": "MODEL"}  # fmt: skip
    for name, io_type in names.items():
        setattr(io, name, comfytype(io_type))
    io.Custom = comfytype

    class Hidden:
        unique_id = "UNIQUE_ID"
        prompt = "PROMPT"
        extra_pnginfo = "EXTRA_PNGINFO"

    class Schema:
        def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None, description="", is_output_node=False, **flags):
            self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, description
            self.inputs, self.outputs, self.hidden, self.is_output_node = list(inputs or []), list(outputs or []), list(hidden or []), is_output_node
            for key, value in flags.items():
                setattr(self, key, value)

    class ComfyNode:
        hidden = None

        @classmethod
        def define_schema(cls):
            raise NotImplementedError

        @classmethod
        def execute(cls, **kwargs):
            raise NotImplementedError

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui = args, ui

        @property
        def result(self):
            return self.args if self.args else None

        def __getitem__(self, index):
            return self.args[index]

    io.Hidden, io.Schema, io.ComfyNode, io.NodeOutput, io.Input, io.Output = Hidden, Schema, ComfyNode, NodeOutput, Input, Output

    class ComfyExtension:
        async def on_load(self):
            pass

        async def get_node_list(self):
            raise NotImplementedError

    api = types.ModuleType("comfy_api.v0_0_2")
    api.io, api.ComfyExtension = io, ComfyExtension
    api.STAND_IN = True
    return api


def install_comfy_api_stand_in() -> None:
    """Make ``comfy_api.v0_0_2`` importable without ComfyUI (unless a real one already is).

    The unit tests always use the stand-in: a checkout's ``comfy`` package cannot share a process
    with this repository when pytest imports the repository root as a package (as it does, under
    the checkout folder's name). ComfyUI's own V3 API is checked by the integration tests, in a
    ComfyUI process of their own."""
    if "comfy_api.v0_0_2" in sys.modules:
        return
    api = comfy_api_stand_in()
    package = types.ModuleType("comfy_api")
    package.v0_0_2 = api
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("comfy_api", None, is_package=True)
    api.__spec__ = importlib.machinery.ModuleSpec("comfy_api.v0_0_2", None)
    sys.modules["comfy_api"] = package
    sys.modules["comfy_api.v0_0_2"] = api
