"""How many bytes a trace's attention maps take, known before the run, and a budget for them.

Pure arithmetic over shapes: the latent grid, each traced layer's map grid, the token axis,
the number of steps and images, which branches are stored and the dtypes. The diffusers tap
(`explain.adapters.diffusers.tap`) fills in a `MapShapes` at the model's first call, before any
denoising step, prints `MemoryEstimate.describe` when per-layer maps are kept, and refuses to
run (`MemoryBudgetError`) when the estimate is over the caller's ``memory_budget_mb``.

What the trace holds (bytes, exact for a run of ``steps`` recorded steps):

* ``maps``: ``attention`` ``[S, B, T, h, w]`` plus ``attention_negative`` ``[S, B, T_neg, h, w]``
  (when stored) in ``store_dtype``;
* ``layers``: ``attention_layers``, one ``[S, B, T, h_l, w_l]`` per layer (``keep_layers=True``)
  or per distinct layer grid (``"resolution"``) in ``layer_dtype``, conditional rows only.

What the model's device holds on top while the run goes (``*_device``): the per-step sums the
mean maps are made from (``[R, N_r, T_kept]`` float32 per resolution, R = the rows kept, until the
trace is built) and one step's per-layer maps in float32 (conditional rows), which move to the
CPU as ``layer_dtype`` when the step ends.

`legacy_layer_bytes` is the storage per-layer maps had before (every row of the model batch, in
float32, on the device until the trace was built, then copied), kept for the benchmark's
before/after.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

MB = 10**6  # decimal megabytes, as memory figures are usually quoted


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MapShapes:
    """What decides the size of one run's maps (see the module doc)."""

    latent_size: tuple[int, int]
    layer_grids: dict[str, tuple[int, int]]  # per traced layer, the grid of its maps
    steps: int
    images: int  # B, the images of the run (conditional rows)
    tokens: int  # the conditional maps' token axis (the trace's T)
    negative_tokens: int = 0  # the negative maps' token axis; 0 = no negative maps stored
    kept_tokens: int | None = None  # positions the per-step sums keep (both branches' union); None = tokens
    keep_layers: bool | str = False  # False, True (per layer) or "resolution"
    store_dtype: torch.dtype = torch.float32
    layer_dtype: torch.dtype = torch.float16
    notes: dict = field(default_factory=dict, compare=False)  # e.g. {"full_context": True} for the advice

    @property
    def kept(self) -> int:
        return self.tokens if self.kept_tokens is None else self.kept_tokens

    @property
    def rows(self) -> int:
        """Rows of the per-step sums: the conditional images, and the negative ones when stored."""
        return self.images * (2 if self.negative_tokens else 1)

    def layer_positions(self, keep_layers: bool | str | None = None) -> int:
        """Σ h_l·w_l over the maps ``keep_layers`` keeps (one per layer, or one per distinct grid)."""
        mode = self.keep_layers if keep_layers is None else keep_layers
        if mode is True:
            return sum(h * w for h, w in self.layer_grids.values())
        if mode == "resolution":
            return sum(h * w for h, w in set(self.layer_grids.values()))
        return 0


@dataclass(frozen=True)
class MemoryEstimate:
    shapes: MapShapes
    maps: int  # attention (+ attention_negative) in the trace
    layers: int  # attention_layers in the trace
    maps_device: int  # per-step sums held on the model's device until the trace is built
    layers_device: int  # one step's per-layer maps on the device before they move to the CPU
    layers_per_step: int  # attention_layers bytes one step adds

    @property
    def total(self) -> int:
        """What the trace's maps hold once built (the budget is checked against this)."""
        return self.maps + self.layers

    def describe(self) -> str:
        s = self.shapes
        what = {True: f"{len(s.layer_grids)} layers", "resolution": f"{len(set(s.layer_grids.values()))} resolutions"}
        line = (
            f"trace maps: about {mb(self.total)} MB ({mb(self.maps)} MB mean maps"
            + (f" + {mb(self.layers)} MB per-layer maps: {what.get(s.keep_layers, '')} × {s.steps} steps × "
               f"{s.tokens} tokens × {s.images} image{'s' if s.images != 1 else ''} as {_name(s.layer_dtype)}" if s.keep_layers else "")
            + f"); on the model's device during the run: {mb(self.maps_device + self.layers_device)} MB"
        )
        return line


def mb(n: int) -> str:
    value = n / MB
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def estimate_memory(shapes: MapShapes) -> MemoryEstimate:
    h, w = shapes.latent_size
    store = element_size(shapes.store_dtype)
    maps = shapes.steps * shapes.images * (shapes.tokens + shapes.negative_tokens) * h * w * store
    resolutions = sum(a * b for a, b in set(shapes.layer_grids.values()))
    maps_device = shapes.steps * shapes.rows * resolutions * shapes.kept * 4
    per_step = shapes.images * shapes.tokens * shapes.layer_positions() * element_size(shapes.layer_dtype)
    if shapes.keep_layers is True:
        layers_device = shapes.images * shapes.kept * shapes.layer_positions() * 4
    elif shapes.keep_layers == "resolution":
        layers_device = shapes.images * shapes.tokens * shapes.layer_positions() * 4  # finished, before the move
    else:
        layers_device = 0
    return MemoryEstimate(shapes, maps, shapes.steps * per_step, maps_device, layers_device, per_step)


def legacy_layer_bytes(shapes: MapShapes, guided: bool) -> dict[str, int]:
    """Per-layer maps as they were stored before: every row of the model batch (both branches
    under guidance, whether or not negative maps were asked for) in float32 on the device for
    the whole run, then the conditional rows copied into the trace as ``store_dtype``."""
    rows = shapes.images * (2 if guided else 1)
    positions = shapes.layer_positions()
    device = shapes.steps * rows * shapes.kept * positions * 4 if shapes.keep_layers is True else 0
    trace = shapes.steps * shapes.images * shapes.tokens * positions * element_size(shapes.store_dtype)
    return {"device": device, "trace": trace}


class MemoryBudgetError(ValueError):
    """The run's maps would not fit the memory budget the caller set; raised before any step."""


def check_budget(estimate: MemoryEstimate, budget_mb: float | None) -> None:
    """Raise `MemoryBudgetError` naming the estimate, the budget and what would fit, when the
    trace's maps (`MemoryEstimate.total`) are over ``budget_mb`` megabytes (None: no budget)."""
    if budget_mb is None:
        return
    budget = float(budget_mb) * MB
    if not budget > 0:
        raise ValueError(f"memory_budget_mb must be a positive number of megabytes, got {budget_mb!r}")
    if estimate.total <= budget:
        return
    s = estimate.shapes
    per_step = estimate.total / max(s.steps, 1)
    options = []
    fitting = int(budget // per_step) if per_step else s.steps
    options.append(f"fewer steps ({fitting} fit)" if fitting >= 1 else "fewer steps (not even one fits)")
    if s.keep_layers is True:
        coarse = estimate_memory(replace(s, keep_layers="resolution"))
        options.append(f"keep_layers='resolution' ({mb(coarse.total)} MB)")
    if s.keep_layers:
        options.append(f"keep_layers=False ({mb(estimate.maps)} MB)")
    if s.negative_tokens:
        options.append(f"negative=False ({mb(estimate_memory(replace(s, negative_tokens=0)).total)} MB)")
    context = "a shorter context"
    if s.notes.get("full_context"):
        context += " (full_context=False keeps the prompt's own tokens)"
    elif s.notes.get("t5"):
        context += " (a smaller max_sequence_length for T5)"
    options.append(f"{context}: {s.tokens} tokens now, the maps grow with them")
    if s.keep_layers and _name(s.layer_dtype) in ("float32", "float64"):
        options.append("layer_dtype=torch.float16 (half the per-layer bytes)")
    options.append(f"a larger memory_budget_mb (at least {int(-(-estimate.total // MB))})")
    raise MemoryBudgetError(
        f"this run's attention maps would take about {mb(estimate.total)} MB ({mb(estimate.maps)} MB mean maps, "
        f"{mb(estimate.layers)} MB per-layer maps), over the memory budget of {float(budget_mb):g} MB; "
        f"nothing was generated. To fit, use " + ", or ".join(options)
    )
