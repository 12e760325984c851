"""One file per model family: what the diffusers adapter needs to know about a denoiser's shape.

A family says which pipelines it serves (`Family.matches`), where their denoiser is, how to
capture its text attention during a run (`install_capture`), how to read the denoiser's
latent and context from its forward arguments (`model_inputs`), and how to run one guided,
stateless probe for DF-RISE, DF-CAM and the games (`probe_functions`). Where a family differs
from a UNet's conventions it overrides the hooks below whose defaults are the UNet's:

* latents: `latent_size` (the unpacked ``[h, w]``) and `unpack` (Flux packs 2×2 patches into
  tokens; the trace always stores ``[B, C, h, w]``);
* prompts: `read_encoding` (what one ``encode_prompt`` call returned), `text_segments` (which
  tokenizer names which run of the context: SD3's is CLIP then T5), ``separate_negative_encoding``
  (Flux encodes the negative prompt in a second call), ``pipeline_arguments`` (arguments of the
  pipeline call the tap reads because the pipeline keeps them nowhere, Flux's ``true_cfg_scale``);
* branches: `call_branches` (which rows of one denoiser call are conditional / unconditional;
  None = a call the tap does not record);
* `layer_grids` (each captured layer's map grid, for the memory estimate before the run);
* `run_meta` (family-specific facts for ``trace.meta``: guidance kinds, T5 length) and
  `call_kwargs` (how `generate`'s prompt, negative prompt and guidance become pipeline arguments).

Adding a family is one new file here, appended to `FAMILIES`, plus its tests (joint-attention
families reuse `families.joint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from explain.attention import COND, UNCOND
from explain.denoiser import ModelFn
from explain.tokens import END_TOKEN


class UnsupportedPipelineError(TypeError):
    """A pipeline whose denoiser no family of this adapter understands."""


@dataclass
class ProbeFunctions:
    """A family's ``model_fn`` (and, where it can mask tokens, ``token_model_fn``) for `GuidedDenoiser`."""

    model_fn: ModelFn
    token_model_fn: Callable | None = None
    estimate_item_bytes: Callable[[torch.Tensor], int] | None = None


@dataclass
class TextSegment:
    """A run of the denoiser's text context that one tokenizer names (None: nobody does, e.g.
    SD3's zero stand-in for a missing T5). ``prompt_arguments`` / ``negative_arguments`` are the
    ``encode_prompt`` arguments holding its text, the first one set wins; ``pad`` names the
    positions after the prompt's end token."""

    tokenizer: Any
    start: int
    length: int
    prompt_arguments: tuple[str, ...] = ("prompt",)
    negative_arguments: tuple[str, ...] = ("negative_prompt",)
    pad: str = END_TOKEN
    name: str = "clip"


@dataclass
class Encoding:
    """What one ``encode_prompt`` call returned, as the tap reads it: the conditional context, the
    negative one (None when not computed there) and whether guidance runs (None: unknown)."""

    embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    guided: bool | None


class Family:
    """Base of the model families; subclasses fill in the first five methods and override the
    rest where their pipelines differ from a UNet's."""

    name: str = ""
    description: str = ""
    joint: bool = False  # text attention is joint attention (ConceptAttention maps, concept streams)
    separate_negative_encoding: bool = False
    pipeline_arguments: tuple[str, ...] = ()

    def matches(self, pipe) -> bool:
        raise NotImplementedError

    def denoiser(self, pipe) -> torch.nn.Module:
        """The module the pipeline calls once per model evaluation (a UNet or a transformer)."""
        raise NotImplementedError

    def model_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(latent batch, text context) from the denoiser's forward arguments."""
        raise NotImplementedError

    def install_capture(self, pipe, record: Callable, method: str = "explicit", options=None) -> list[Callable[[], None]]:
        """Route the denoiser's text attention to ``record(layer_name, probs [B, heads, N, T], grid)``
        (joint families: ``record(name, maps [B, N, T], grid, kind)``); returns the functions that
        undo it, in installation order. ``options``: a joint family's `families.joint.JointOptions`."""
        raise NotImplementedError

    def layer_grids(self, pipe, latent_size: tuple[int, int], options=None) -> dict[str, tuple[int, int]]:
        """Per text-attention layer the tap captures (while installed), the grid of its maps for an
        unpacked latent of ``latent_size``: what the per-layer maps will hold, known before the
        first step (`explain.memory`)."""
        raise NotImplementedError

    def probe_functions(self, pipe, model: torch.nn.Module, prompt: str, negative_prompt: str | None,
                        guided: bool, image_size: tuple[int, int] | None, latent_space: str,
                        settings: dict | None = None) -> ProbeFunctions:
        """``settings``: the trace's meta (T5 length, embedded guidance, token positions)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ UNet conventions, overridable
    def latent_size(self, pipe, sample: torch.Tensor, kwargs: dict) -> tuple[int, int]:
        """(h, w) of the unpacked latent the denoiser got."""
        return int(sample.shape[-2]), int(sample.shape[-1])

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """The pipeline's latents (as ``scheduler.step`` sees them) as ``[B, C, h, w]``."""
        return latents

    def read_encoding(self, pipe, arguments: dict, outputs) -> Encoding:
        embeds = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        negative = outputs[1] if isinstance(outputs, (tuple, list)) and len(outputs) > 1 else None
        guided = arguments.get("do_classifier_free_guidance")
        return Encoding(embeds, negative, bool(guided) if guided is not None else negative is not None)

    def call_branches(self, pipe, run, rows: int, context: torch.Tensor, kwargs: dict) -> list[int] | None:
        """cond_or_uncond of one denoiser call: diffusers batches classifier-free guidance as
        ``[uncond, cond]``, so twice the images means guidance, as many means none."""
        if rows == 2 * run.batch:
            return [UNCOND, COND]
        if rows == run.batch:
            return [COND]
        raise RuntimeError(
            f"the denoiser got a batch of {rows} latents for {run.batch} images; the tap understands "
            "[uncond, cond] (guidance) or [cond] (no guidance) batches only (edit pipelines such as "
            "InstructPix2Pix are not supported)"
        )

    def text_segments(self, pipe, context_length: int) -> list[TextSegment]:
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        return [TextSegment(tokenizer, 0, context_length)]

    def run_meta(self, pipe, run) -> dict:
        return {}

    def call_kwargs(self, pipe, prompt, negative_prompt, guidance: float, pipe_kwargs: dict) -> dict:
        return {"negative_prompt": negative_prompt, "guidance_scale": float(guidance)}

    def encode_concepts(self, pipe, concepts: list[str], text_length: int) -> torch.Tensor:
        raise ValueError(f"concept maps need a joint-attention model (SD3, Flux); {self.description} has none")


def _families() -> list[Family]:
    from explain.adapters.diffusers.families import flux, sd3, unet

    # each pipeline matches one family at most: UNets need pipe.unet, SD3 and Flux their transformer class
    return [unet.FAMILY, sd3.FAMILY, flux.FAMILY]


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
