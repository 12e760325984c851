"""One set of defaults for every front end (library, CLI, Gradio app, ComfyUI nodes).

Front ends read their DF-RISE, DF-CAM and game settings from here instead of writing their own,
so a default changed by measurement changes everywhere at once. `PAPER_RISE` is the published
algorithm exactly, kept for reproduction; `RISE` is what the project shows by default.

Status: the values below are the library's settings before the sanity-check work (issue 12);
that work replaces them with measured choices and records, per preset, what the checks found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RiseSettings:
    n_masks: int = 256
    quantity: str = "x0"
    masks: str = "bernoulli"
    p: float = 0.5
    cells: int = 8
    similarity: str = "structure"
    centered: bool = True
    seed: int = 0

    def kwargs(self) -> dict:
        """The keyword arguments of `explain.methods.rise.df_rise`."""
        return asdict(self)


@dataclass(frozen=True)
class CamSettings:
    layers: str = "paper"
    target: str = "sum"
    quantity: str = "epsilon"

    def kwargs(self) -> dict:
        return asdict(self)


# The paper's DF-RISE: SSIM structure of x0, Bernoulli masks, uncentered, 500 masks.
PAPER_RISE = RiseSettings(n_masks=500, similarity="structure", centered=False)
RISE = RiseSettings()
CAM = CamSettings()
PRESETS = {"default": RISE, "paper": PAPER_RISE}
