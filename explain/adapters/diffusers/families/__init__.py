"""One file per model family: what the diffusers adapter needs to know about a denoiser's shape.

A family says which pipelines it serves (`Family.matches`), where their denoiser is, how to
capture its text attention during a run (`install_capture`), how to read the denoiser's
latent and context from its forward arguments (`model_inputs`), and how to run one guided,
stateless probe for DF-RISE, DF-CAM and the games (`probe_functions`). Adding a family is
one new file here, appended to `FAMILIES`, plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from explain.denoiser import ModelFn


class UnsupportedPipelineError(TypeError):
    """A pipeline whose denoiser no family of this adapter understands."""


@dataclass
class ProbeFunctions:
    """A family's ``model_fn`` (and, where it can mask tokens, ``token_model_fn``) for `GuidedDenoiser`."""

    model_fn: ModelFn
    token_model_fn: Callable | None = None
    estimate_item_bytes: Callable[[torch.Tensor], int] | None = None


class Family:
    """Base of the model families; subclasses fill in every method."""

    name: str = ""
    description: str = ""

    def matches(self, pipe) -> bool:
        raise NotImplementedError

    def denoiser(self, pipe) -> torch.nn.Module:
        """The module the pipeline calls once per model evaluation (a UNet or a transformer)."""
        raise NotImplementedError

    def model_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(latent batch, text context) from the denoiser's forward arguments."""
        raise NotImplementedError

    def install_capture(self, pipe, record: Callable) -> list[Callable[[], None]]:
        """Route the denoiser's text attention to ``record(layer_name, probs [B, heads, N, T], grid)``;
        returns the functions that undo it, in installation order."""
        raise NotImplementedError

    def probe_functions(self, pipe, model: torch.nn.Module, prompt: str, negative_prompt: str | None,
                        guided: bool, image_size: tuple[int, int] | None, latent_space: str) -> ProbeFunctions:
        raise NotImplementedError


def _families() -> list[Family]:
    from explain.adapters.diffusers.families import unet

    return [unet.FAMILY]


FAMILIES: list[Family] = _families()


def family_of(pipe) -> Family:
    """The family that serves ``pipe``, or a clear error naming the supported ones."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    supported = "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} is not a pipeline diffusion-explain can trace; supported families are {supported}"
    )
