"""Which sampling run an explanation node explains: trace handles and the run registry.

ComfyUI caches node outputs, so the object a Tap node returns can outlive many sampler runs,
and a cached sampler can hand an explanation node a LATENT from a run the current Tap output
never saw. We therefore never ask a handle for "its" trace. Each finished run is filed in a
small registry under the Tap's identity together with the latents it returned; an explanation
node looks up the run *by the LATENT it was given*. A latent the registry does not hold (a
run that failed, one made by an untapped model, one already evicted) gets a clear error instead
of a stale or empty trace, and a trace can never leak into another prompt's run, because two
different runs do not return the same latent.

This module does not import ComfyUI.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from explain.trace import Trace

MAX_RUNS = 8  # finished runs kept in memory, all taps together (oldest evicted first) ...
MAX_BYTES = 2 * 1024**3  # ... and no more than this much tensor memory (the newest run always stays)


class TraceLookupError(ValueError):
    """An explanation node cannot find the run that made the LATENT it was given."""


@dataclass
class Run:
    """One finished sampling run of a tapped model."""

    tap_key: str
    trace: Trace
    outputs: list[torch.Tensor]  # latents the sampler may have returned for this run (CPU, float32)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def nbytes(self) -> int:
        t = self.trace
        tensors = [t.x_t, t.x0, t.attention, t.attention_negative, t.final_latent, *t.attention_layers.values(), *self.outputs]
        return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))

    def describe(self) -> str:
        h, w = self.trace.latent_size
        return f"{self.trace.num_steps} steps, batch {self.trace.batch_size}, latent {h}×{w}"


def latent_samples(latent) -> torch.Tensor:
    """The ``samples`` tensor of a ComfyUI LATENT (a dict), or the tensor itself."""
    if isinstance(latent, dict):
        if "samples" not in latent:
            raise TraceLookupError("the LATENT input has no 'samples'; connect a sampler's LATENT output")
        latent = latent["samples"]
    if not isinstance(latent, torch.Tensor):
        raise TraceLookupError(f"expected a LATENT, got {type(latent).__name__}")
    return latent


def same_latent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two latents are the same sampler output (up to a dtype round trip)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(scale, 1e-3)))


class RunRegistry:
    """The last `MAX_RUNS` finished runs, looked up by the latent they returned."""

    def __init__(self, max_runs: int = MAX_RUNS, max_bytes: int = MAX_BYTES):
        self.max_runs = int(max_runs)
        self.max_bytes = int(max_bytes)
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, run: Run) -> Run:
        with self._lock:
            self._runs[run.run_id] = run
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
            while len(self._runs) > 1 and sum(r.nbytes() for r in self._runs.values()) > self.max_bytes:
                self._runs.popitem(last=False)
        return run

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()

    def runs_of(self, tap_key: str) -> list[Run]:
        with self._lock:
            return [r for r in self._runs.values() if r.tap_key == tap_key]

    def find(self, tap_key: str, latent) -> Run:
        """The newest run of tap ``tap_key`` that returned ``latent``; a `TraceLookupError`
        saying what to change otherwise."""
        samples = latent_samples(latent)
        with self._lock:
            runs = list(self._runs.values())
        for run in reversed(runs):
            if run.tap_key == tap_key and any(same_latent(samples, out) for out in run.outputs):
                return run
        others = [r for r in runs if r.tap_key != tap_key and any(same_latent(samples, o) for o in r.outputs)]
        if others:
            raise TraceLookupError(
                "this LATENT was sampled with a model from a different Explain Tap node than the trace input; "
                "connect the trace output of the Tap whose model output feeds this sampler"
            )
        mine = [r for r in runs if r.tap_key == tap_key]
        shape = "×".join(str(s) for s in samples.shape)
        if not mine:
            raise TraceLookupError(
                f"no sampling run has been recorded for this trace yet (LATENT {shape}). Connect the Tap's MODEL "
                "output to the sampler whose LATENT you connect here. If the sampler was cached from an earlier "
                f"session or its run was evicted (the last {self.max_runs} runs, up to {self.max_bytes // 2**20} MiB, are kept), re-run it, e.g. by "
                "clicking 'Free model and node cache' and queueing again."
            )
        held = "; ".join(r.describe() for r in reversed(mine))
        raise TraceLookupError(
            f"this LATENT ({shape}) was not produced by any run recorded for this trace (held: {held}). Connect "
            "the LATENT output of the sampler that uses the Tap's MODEL. If that sampler was cached and its run "
            f"was evicted (the last {self.max_runs} runs, up to {self.max_bytes // 2**20} MiB, are kept), re-run it, e.g. by clicking "
            "'Free model and node cache' and queueing again."
        )


REGISTRY = RunRegistry()


class TraceHandle:
    """The value of an ``EXPLAIN_TRACE`` socket.

    A *tap* handle names a Tap node's recordings (``tap_key``); explanation nodes resolve it
    with the sampler's LATENT to the run that made that latent. A *loaded* handle wraps one
    `Trace` read from a file and needs no latent."""

    def __init__(self, tap_key: str | None = None, trace: Trace | None = None, source: str = "", registry: RunRegistry | None = None):
        if (tap_key is None) == (trace is None):
            raise ValueError("a trace handle needs either a tap key or a loaded trace")
        self.tap_key = tap_key
        self.loaded = trace
        self.source = source
        self.registry = registry if registry is not None else REGISTRY

    def __repr__(self) -> str:
        what = f"tap {self.tap_key[:8]}" if self.tap_key else f"file {self.source}"
        return f"TraceHandle({what})"

    def __deepcopy__(self, memo):
        return self  # shared state by design: copies of graph values must see the same runs

    def resolve(self, latent=None) -> Trace:
        """The trace to explain. For a tap handle ``latent`` is required and selects the run."""
        if self.loaded is not None:
            if latent is not None:
                _check_loaded_latent(self.loaded, latent_samples(latent), self.source)
            return self.loaded
        if latent is None:
            raise TraceLookupError(
                "connect the sampler's LATENT output to this node's 'latent' input: it makes this node run after "
                "sampling and tells it which run to explain"
            )
        return self.registry.find(self.tap_key, latent).trace


def _check_loaded_latent(trace: Trace, samples: torch.Tensor, source: str) -> None:
    if samples.ndim == 4 and samples.shape[0] != trace.batch_size:
        raise TraceLookupError(
            f"the LATENT has a batch of {samples.shape[0]} but the trace {source or ''} has {trace.batch_size}; "
            "leave 'latent' unconnected for a loaded trace, or connect the matching sampler output"
        )
    if samples.ndim == 4 and tuple(samples.shape[-2:]) != trace.latent_size:
        raise TraceLookupError(
            f"the LATENT is {samples.shape[-2]}×{samples.shape[-1]} but the trace {source or ''} is "
            f"{trace.latent_size[0]}×{trace.latent_size[1]}; leave 'latent' unconnected for a loaded trace"
        )
