"""The run registry and trace handles: a LATENT selects its own run, or a clear error."""

from __future__ import annotations

import pytest
import torch

from nodes.runs import Run, RunRegistry, TraceHandle, TraceLookupError, same_latent
from tests.explain.synthetic import synthetic_trace


def _run(registry, key, seed, batch=1):
    latent = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return registry.add(Run(key, synthetic_trace(batch=batch, seed=seed), [latent])), latent


def test_same_latent_tolerates_a_dtype_round_trip_only():
    a = torch.randn(1, 4, 8, 8)
    assert same_latent(a, a.half().float())
    assert not same_latent(a, a + 0.1)
    assert not same_latent(a, a[:, :, :4])


def test_find_returns_the_run_that_made_the_latent():
    registry = RunRegistry()
    first, la = _run(registry, "tap", 1)
    second, lb = _run(registry, "tap", 2)
    assert registry.find("tap", {"samples": la}) is first
    assert registry.find("tap", lb) is second


def test_a_latent_from_another_tap_or_no_run_is_refused_with_a_reason():
    registry = RunRegistry()
    _, la = _run(registry, "tap-a", 1)
    with pytest.raises(TraceLookupError, match="different Explain Tap"):
        registry.find("tap-b", la)
    with pytest.raises(TraceLookupError, match="no sampling run has been recorded"):
        registry.find("tap-c", torch.randn(1, 4, 8, 8))
    with pytest.raises(TraceLookupError, match="was not produced by any run"):
        registry.find("tap-a", torch.randn(1, 4, 8, 8))
    with pytest.raises(TraceLookupError, match="samples"):
        registry.find("tap-a", {"noise_mask": la})


def test_old_runs_are_evicted():
    registry = RunRegistry(max_runs=2)
    _, la = _run(registry, "tap", 1)
    _run(registry, "tap", 2)
    _run(registry, "tap", 3)
    assert len(registry) == 2
    with pytest.raises(TraceLookupError, match="re-run"):
        registry.find("tap", la)


def test_runs_are_evicted_by_memory_but_the_newest_stays():
    registry = RunRegistry(max_runs=8, max_bytes=1)
    _, la = _run(registry, "tap", 1)
    newest, lb = _run(registry, "tap", 2)
    assert len(registry) == 1 and registry.find("tap", lb) is newest and newest.nbytes() > 1
    with pytest.raises(TraceLookupError, match="evicted"):
        registry.find("tap", la)


def test_handles():
    registry = RunRegistry()
    run, latent = _run(registry, "tap", 1)
    handle = TraceHandle(tap_key="tap", registry=registry)
    assert handle.resolve({"samples": latent}) is run.trace
    with pytest.raises(TraceLookupError, match="connect the sampler's LATENT"):
        handle.resolve(None)
    trace = synthetic_trace(batch=2)
    loaded = TraceHandle(trace=trace, source="t.safetensors")
    assert loaded.resolve() is trace and loaded.resolve({"samples": torch.zeros(2, 4, 8, 8)}) is trace
    with pytest.raises(TraceLookupError, match="batch of 1"):
        loaded.resolve({"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(TraceLookupError, match="16×16"):
        loaded.resolve({"samples": torch.zeros(2, 4, 16, 16)})
    with pytest.raises(ValueError):
        TraceHandle()
