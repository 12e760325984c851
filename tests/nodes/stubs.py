"""Stand-ins for the parts of ComfyUI the node pack touches, so its unit tests run without
ComfyUI: ``comfy.patcher_extension``, ``folder_paths``, a ModelPatcher with ComfyUI's patching
API (clone deep-copies ``model_options``, as ComfyUI's does) and a UNet-shaped module tree."""

from __future__ import annotations

import copy
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
        to = self.model_options.setdefault("transformer_options", {})
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to.setdefault("patches_replace", {}).setdefault("attn2", {})[key] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def attn2_patches(self) -> dict:
        return self.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
