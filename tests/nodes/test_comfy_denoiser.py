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


def test_dfcam_asks_comfyui_to_free_room_for_its_weight_clones(monkeypatch):
    ours, other = object(), object()
    loaded = [types.SimpleNamespace(model=other), types.SimpleNamespace(model=ours)]
    mm = fake_model_management(monkeypatch, loaded)
    with torch.inference_mode():  # as ComfyUI loads weights: inference tensors, the ones DF-CAM clones
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, device="meta", dtype=torch.float16), torch.nn.BatchNorm2d(8, device="meta"))
    net.extra = torch.nn.Linear(2, 2, device="meta")  # made outside inference mode: used as it is
    modules = dict(net.named_modules())
    denoiser = GuidedDenoiser(lambda x, lv: (x, x), "sample", 5.0, modules=modules, device=torch.device("meta"))
    clones = (8 * 4 * 3 * 3 + 8) * 2 + (8 + 8 + 8 + 8) * 4 + 8  # conv fp16; norm weight, bias, running stats; step count
    assert comfy_denoiser.make_room_for_weight_clones(denoiser, keep=[ours]) == clones
    assert mm.calls == [(clones + 1000, torch.device("meta"), [loaded[1]])]  # our model stays loaded

    on_cpu = GuidedDenoiser(lambda x, lv: (x, x), "sample", 5.0, modules=modules, device=torch.device("cpu"))
    assert comfy_denoiser.make_room_for_weight_clones(on_cpu, keep=[ours]) == 0
    assert len(mm.calls) == 1  # no GPU to make room on
