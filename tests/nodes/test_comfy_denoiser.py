"""The ComfyUI adapter's memory helpers against a stand-in ``comfy.model_management`` (the
probes themselves run in the real ComfyUI in the integration tests)."""

from __future__ import annotations

import sys
import types

import torch

from explain.denoiser import GuidedDenoiser
from nodes import comfy_denoiser


def fake_model_management(monkeypatch, loaded=(), free=8 * 1024**3) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = list(loaded)
    mm.calls = []
    mm.get_free_memory = lambda device: free
    mm.minimum_inference_memory = lambda: 1000
    mm.free_memory = lambda memory_required, device, keep_loaded=[]: mm.calls.append((memory_required, device, keep_loaded))
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


def test_probe_batches_are_sized_by_comfyuis_own_estimate():
    inner = types.SimpleNamespace(memory_required=lambda shape: 1000.0 * shape[0] * shape[2] * shape[3])
    estimate = comfy_denoiser.item_bytes_estimate(inner, branches=2)
    assert estimate(torch.zeros(1, 4, 8, 8)) == int(1000 * 64 * 2 * comfy_denoiser.MEMORY_SAFETY) + 1
    denoiser = GuidedDenoiser(lambda x, lv: (x, x), "sample", 5.0, latent_space="sigma", estimate_item_bytes=estimate)
    assert denoiser.batch_size_for(torch.zeros(4, 8, 8), memory_budget=10 * estimate(torch.zeros(1, 4, 8, 8))) == 10


def test_the_budget_is_a_share_of_what_comfyui_counts_as_free(monkeypatch):
    fake_model_management(monkeypatch, free=1000)
    assert comfy_denoiser.memory_budget(torch.device("cuda")) == 500
    assert comfy_denoiser.memory_budget(torch.device("cpu")) is None  # the denoiser's CPU default
    assert comfy_denoiser.memory_budget(None) is None

