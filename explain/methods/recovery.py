"""The R1 recovery view: at each step, where the model's prediction of the clean image changes
and where it already matches the final result.

The paper asks (R1) which regions the model recovers at each step and answers with DF-RISE;
this view is the cheap, model-free companion that needs only the per-step x0 predictions of
a trace:

* **change** ``[S-1, B, h, w]``: ``mean_c |x0_s - x0_{s-1}|`` for steps ``s >= 1`` (what step
  ``s`` changed in the prediction; step 0 has nothing to compare with);
* **distance** ``[S, B, h, w]``: ``mean_c |x0_s - final|``, how far the prediction at step
  ``s`` still is from the final result;
* **recovered** ``[S, B, h, w]``: ``distance <= tolerance`` with ``tolerance = tol * std(final)``
  per batch item (std over channels and pixels), so the same ``tol`` fits latents of any
  scale and decoded images;
* **recovered_fraction** ``[S, B]``: the share of pixels already recovered at each step;
* **recovery_step** ``[B, h, w]``: the first step from which a pixel stays recovered to the
  end of the run (``S`` when it never settles), a single map of what was recovered early
  (semantic layout, per the paper's claim) and what late (details).

``space="latent"`` works on the latents (channel mean); ``space="preview"`` on the decoded
x0 previews (RGB mean, 0..1), whose final is the trace's final image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from explain.trace import Trace

SPACES = ("latent", "preview")


@dataclass
class RecoveryView:
    space: str
    tol: float
    tolerance: torch.Tensor  # [B], absolute, in the units of the space
    change: torch.Tensor  # [S-1, B, h, w]
    distance: torch.Tensor  # [S, B, h, w]
    recovered: torch.Tensor  # [S, B, h, w] bool
    recovered_fraction: torch.Tensor  # [S, B]
    mean_change: torch.Tensor  # [S-1, B]
    recovery_step: torch.Tensor  # [B, h, w], long, S = never

    @property
    def num_steps(self) -> int:
        return int(self.distance.shape[0])

    def to_json(self) -> dict:
        """The summary curves (not the maps)."""
        return {
            "space": self.space,
            "tol": self.tol,
            "tolerance": self.tolerance.tolist(),
            "recovered_fraction": self.recovered_fraction.T.tolist(),  # per item, per step
            "mean_change": self.mean_change.T.tolist(),
            "median_recovery_step": [float(r.float().median()) for r in self.recovery_step],
            "definitions": {
                "change": "mean over channels of |x0_s - x0_(s-1)|, for steps s >= 1",
                "distance": "mean over channels of |x0_s - final|",
                "recovered": f"distance <= {self.tol} x std(final)",
                "recovery_step": "first step from which a pixel stays recovered to the end (num_steps = never)",
            },
        }


# ---------------------------------------------------------------------------- pure pieces
def change_maps(x0: torch.Tensor) -> torch.Tensor:
    """``[S, B, C, h, w]`` -> ``[S-1, B, h, w]``: channel-mean absolute change between steps."""
    return (x0[1:] - x0[:-1]).abs().mean(2)


def distance_maps(x0: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """``[S, B, C, h, w]`` and ``[B, C, h, w]`` -> ``[S, B, h, w]``."""
    return (x0 - final.unsqueeze(0)).abs().mean(2)


def first_settled_step(recovered: torch.Tensor) -> torch.Tensor:
    """``[S, ...]`` bool -> ``[...]``: first step from which every later entry is True (S if none)."""
    s = recovered.shape[0]
    # a suffix-AND: settled[s] is True when recovered[s:] are all True
    settled = recovered.flip(0).int().cumprod(0).flip(0).bool()
    any_settled = settled.any(0)
    first = settled.float().argmax(0)
    return torch.where(any_settled, first, torch.full_like(first, s))


def recovery_view(x0: torch.Tensor, final: torch.Tensor, tol: float = 0.25, space: str = "latent") -> RecoveryView:
    """The recovery view of predictions ``x0 [S, B, C, h, w]`` against ``final [B, C, h, w]``."""
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if x0.ndim != 5 or final.ndim != 4 or tuple(x0.shape[1:]) != tuple(final.shape):
        raise ValueError(f"x0 must be [steps, B, C, h, w] and final [B, C, h, w] of the same size; got {tuple(x0.shape)} and {tuple(final.shape)}")
    x0, final = x0.float(), final.float()
    tolerance = tol * final.flatten(1).std(1).clamp_min(1e-6)  # [B]
    distance = distance_maps(x0, final)
    recovered = distance <= tolerance.view(1, -1, 1, 1)
    change = change_maps(x0)
    return RecoveryView(
        space=space,
        tol=tol,
        tolerance=tolerance,
        change=change,
        distance=distance,
        recovered=recovered,
        recovered_fraction=recovered.float().mean(dim=(-2, -1)),
        mean_change=change.mean(dim=(-2, -1)),
        recovery_step=first_settled_step(recovered),
    )


# ---------------------------------------------------------------------------- from a trace
def trace_recovery(trace: Trace, space: str = "latent", tol: float = 0.25) -> RecoveryView:
    """The recovery view of a trace, in latent space or on its decoded x0 previews."""
    if space == "latent":
        final = trace.final_latent if trace.final_latent is not None else trace.x0[-1]
        return recovery_view(trace.x0, final, tol, "latent")
    if space == "preview":
        if trace.x0_previews is None:
            raise ValueError("this trace has no decoded x0 previews; record it with previews=True or use space='latent'")
        previews = trace.x0_previews.float().div(255).permute(0, 1, 4, 2, 3)  # [S, B, 3, H, W]
        if trace.images is not None:
            final = trace.images.float().div(255).permute(0, 3, 1, 2)
            if tuple(final.shape[-2:]) != tuple(previews.shape[-2:]):
                final = F.interpolate(final, size=tuple(previews.shape[-2:]), mode="area")
        else:
            final = previews[-1]
        return recovery_view(previews, final, tol, "preview")
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")


# ---------------------------------------------------------------------------- R1 as a measurement
@dataclass
class RegionRecovery:
    """R1 measured: how the per-step x0 change and the recovered share split between a region
    (objects, or a saliency map's top positions) and the rest of the image.

    * ``change_inside`` / ``change_outside`` ``[S-1]``: mean change per step inside / outside;
    * ``cumulative_inside`` / ``cumulative_outside``: the share of the run's total change done by
      each step;
    * ``half_step_inside`` / ``half_step_outside``: the first step by which half of it is done;
    * ``recovered_inside`` / ``recovered_outside`` ``[S]``: the recovered share (`recovery_view`);
    * ``lead`` (the number): mean over steps of recovered_inside - recovered_outside, in [-1, 1];
      positive means the region is recovered before the rest, as the paper's R1 claim has it for
      semantic regions.
    """

    change_inside: torch.Tensor
    change_outside: torch.Tensor
    cumulative_inside: torch.Tensor
    cumulative_outside: torch.Tensor
    half_step_inside: int
    half_step_outside: int
    recovered_inside: torch.Tensor
    recovered_outside: torch.Tensor
    lead: float
    region_share: float

    def to_json(self) -> dict:
        return {
            "change_inside": self.change_inside.tolist(),
            "change_outside": self.change_outside.tolist(),
            "cumulative_inside": self.cumulative_inside.tolist(),
            "cumulative_outside": self.cumulative_outside.tolist(),
            "half_step_inside": self.half_step_inside,
            "half_step_outside": self.half_step_outside,
            "recovered_inside": self.recovered_inside.tolist(),
            "recovered_outside": self.recovered_outside.tolist(),
            "lead": self.lead,
            "region_share": self.region_share,
            "definitions": {
                "change": "mean over the region of mean_c |x0_s - x0_(s-1)|, step s >= 1",
                "half_step": "first step s >= 1 by which half of the region's summed change is done",
                "recovered": "share of the region's pixels within tol x std(final) of the final result",
                "lead": "mean over steps of recovered_inside - recovered_outside (positive: the region is recovered first)",
            },
        }


def region_mask(region, size: tuple[int, int], top: float = 0.2) -> torch.Tensor:
    """A boolean region ``[h, w]`` on the latent grid from a boolean mask at any size (resized by
    area, a latent pixel counts when half of it is covered) or a saliency map (its ``top`` share of
    positions)."""
    r = torch.as_tensor(region)
    if r.dtype == torch.bool:
        f = r.float()
        if tuple(f.shape) != tuple(size):
            f = F.interpolate(f[None, None], size=size, mode="area")[0, 0]
        return f >= 0.5
    m = r.float()
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=size, mode="area" if m.shape[0] >= size[0] else "bilinear")[0, 0]
    if not 0 < top < 1:
        raise ValueError(f"top must be a share between 0 and 1, got {top}")
    k = max(1, int(round(top * m.numel())))
    cut = torch.topk(m.flatten(), k).values[-1]
    return m >= cut


def region_recovery(view: RecoveryView, region, item: int = 0, top: float = 0.2) -> RegionRecovery:
    """R1 inside vs outside ``region`` (a boolean mask, e.g. the objects the checker found, or a
    saliency map whose ``top`` share of positions counts) for item ``item`` of a recovery view."""
    size = tuple(view.distance.shape[-2:])
    inside = region_mask(region, size, top)
    outside = ~inside
    if not bool(inside.any()) or not bool(outside.any()):
        raise ValueError("the region covers none or all of the image; R1 compares a region with the rest")
    change = view.change[:, item]  # [S-1, h, w]
    c_in = change[:, inside].mean(-1)
    c_out = change[:, outside].mean(-1)

    def cumulative(c):
        total = float(c.sum())
        return c.cumsum(0) / total if total > 0 else torch.ones_like(c)

    cum_in, cum_out = cumulative(c_in), cumulative(c_out)

    def half(cum):
        return int((cum >= 0.5).float().argmax()) + 1  # change index k is step k + 1

    rec = view.recovered[:, item].float()
    r_in, r_out = rec[:, inside].mean(-1), rec[:, outside].mean(-1)
    return RegionRecovery(c_in, c_out, cum_in, cum_out, half(cum_in), half(cum_out), r_in, r_out, float((r_in - r_out).mean()), float(inside.float().mean()))
