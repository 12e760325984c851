"""The Explain Tap node: MODEL in, tapped MODEL clone and a trace handle out."""

from __future__ import annotations

import hashlib
import json

from .api import io
from .runs import TraceHandle
from .taps import PromptInfo, TapRecorder, install_tap, prompt_info_from_clip

CATEGORY = "diffusion-explain"
TRACE_TYPE = "EXPLAIN_TRACE"
TraceSocket = io.Custom(TRACE_TYPE)  # the pack's own socket type: a trace handle (nodes.runs.TraceHandle)


def tap_key(unique_id, prompt: str, negative_prompt: str, record_negative: bool, per_resolution: bool) -> str:
    """The Tap's identity: the same node with the same settings keeps its key when ComfyUI
    re-executes it, so a cached sampler's run can still be found (runs are matched by latent,
    so sharing a key never mixes runs)."""
    payload = json.dumps([str(unique_id), prompt, negative_prompt, bool(record_negative), bool(per_resolution)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class ExplainTap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainTap",
            display_name="Explain Tap (attention + x0 per step)",
            category=CATEGORY,
            description=(
                "Records what the model does while a stock sampler runs: per-token text attention (UNets: every "
                "cross-attention block; SD3/3.5, Flux, Chroma: the image × text part of every joint attention, from "
                "ComfyUI 0.3.60) and the predicted clean latent (x0) at every step. Put it between the model loader "
                "and the sampler; connect CLIP and the prompt text to name the prompt's words. The model you loaded "
                "stays unpatched (the Tap patches a clone)."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="A UNet model (SD1.x, SD2.x, SDXL) or a joint-attention one (SD3/3.5, Flux, Chroma; "
                    "ComfyUI 0.3.60 or newer), e.g. from Load Checkpoint or Load Diffusion Model.",
                ),  # fmt: skip
                io.Clip.Input("clip", optional=True, tooltip="The CLIP the prompt was encoded with; names the prompt's words."),
                io.String.Input(
                    "prompt", optional=True, multiline=True, default="",
                    tooltip="The positive prompt text (link the same text node as the CLIP Text Encode). "
                    "Empty: tokens are shown by position only.",
                ),  # fmt: skip
                io.String.Input("negative_prompt", optional=True, multiline=True, default="", tooltip="The negative prompt text."),
                io.Boolean.Input(
                    "record_negative", optional=True, default=True, tooltip="Also record the negative (unconditional) branch's attention."
                ),
                io.Boolean.Input(
                    "per_resolution_maps", optional=True, default=False,
                    tooltip="Also keep the attention of each UNet resolution separately (a DiT's blocks share one: its token grid).",
                ),
            ],
            outputs=[
                io.Model.Output("tapped_model", display_name="model", tooltip="The tapped model: connect it to the sampler."),
                TraceSocket.Output(
                    "trace", display_name="trace",
                    tooltip="The recordings: connect it to explanation or Save Trace nodes, together with the sampler's LATENT.",
                ),  # fmt: skip
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip=None, prompt="", negative_prompt="", record_negative=True, per_resolution_maps=False):
        unique_id = cls.hidden.unique_id if cls.hidden is not None else None
        return io.NodeOutput(*tap(model, clip, prompt, negative_prompt, record_negative, per_resolution_maps, unique_id))


def tap(model, clip=None, prompt="", negative_prompt="", record_negative=True, per_resolution_maps=False, unique_id=None):
    """``(tapped model clone, trace handle)``: what the Tap node returns."""
    prompt = prompt or ""
    negative_prompt = negative_prompt or ""
    if (prompt.strip() or negative_prompt.strip()) and clip is None:
        raise ValueError(
            "the Tap got prompt text but no CLIP: connect the CLIP output of your loader (the one your CLIP Text "
            "Encode uses) so the prompt's words can be named, or clear the prompt fields"
        )
    positive = prompt_info_from_clip(clip, prompt) if prompt.strip() else None
    negative = prompt_info_from_clip(clip, negative_prompt, verify=False) if negative_prompt.strip() else None
    if positive is None and prompt:
        positive = PromptInfo(text=prompt)
    key = tap_key(unique_id, prompt, negative_prompt, record_negative, per_resolution_maps)
    recorder = TapRecorder(
        tap_key=key,
        positive=positive,
        negative=negative,
        record_negative=bool(record_negative),
        keep_resolutions=bool(per_resolution_maps),
    )
    return install_tap(model, recorder), TraceHandle(tap_key=key)
