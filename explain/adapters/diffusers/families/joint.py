"""What the joint-attention families (SD3's MMDiT, Flux) share: reading the image × text slice
of joint attention on the side, ConceptAttention's output-space maps and concept stream, and
the probes' memory estimate.

A family's capture processor is a copy of diffusers' stock processor that keeps the stock
attention call for the layer's output (so a traced image equals an untraced one bit for bit) and
hands the joint queries and keys it computed (after q/k norms, and for Flux after RoPE) to
`JointCapture.observe`, which computes, in float32 and without touching the model's tensors:

* ``maps="attention"``: the image-query × text-key slice of softmax(q kᵀ/√d) over the **joint**
  key set, heads averaged (`explain.attention.joint_image_text_probs`), rows renormalised over the
  text (``joint_rows="renormalized"``, the default) or left as the raw share (``"raw"``);
* ``maps="output"``: ConceptAttention's output-space maps, the softmax over text tokens of image
  outputs (after ``to_out``) · text outputs (after ``to_add_out``), in the blocks that have both
  (SD3: all but the last, ``context_pre_only``, block; Flux: the double-stream blocks);
* with ``concepts``: a **concept stream**. Each concept is encoded alone by the pipeline's own text
  path and becomes one token (the mean of its word's positions), embedded by the transformer's
  ``context_embedder``. In every double-stream block it goes through the block's text-side
  weights (modulation, q/k/v projections and norms, ``to_add_out``, feed-forward) and attends over
  [image keys, concept keys]; the image never attends to it, so the image is unchanged. Its maps
  are per image token: the softmax over concepts of image outputs · concept outputs (``"output"``),
  or of image queries · concept keys (``"attention"``). Flux's single-stream blocks carry no
  concept stream (it would need the blocks' fused MLP path) and SD3's last block gives concept
  attention maps only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from explain.attention import joint_image_text_probs, output_space_maps

JOINT_ROWS = ("renormalized", "raw")
MAP_KINDS = ("attention", "output")


@dataclass
class JointOptions:
    """What a joint-attention capture records (see the module doc)."""

    maps: str = "attention"
    joint_rows: str = "renormalized"
    concepts: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.maps not in MAP_KINDS:
            raise ValueError(f"maps must be one of {MAP_KINDS}, got {self.maps!r}")
        if self.joint_rows not in JOINT_ROWS:
            raise ValueError(f"joint_rows must be one of {JOINT_ROWS}, got {self.joint_rows!r}")
        concepts = [str(c).strip() for c in self.concepts]
        if any(not c for c in concepts):
            raise ValueError("concepts must be non-empty words or phrases, e.g. concepts=['circle', 'square']")
        if len(set(concepts)) != len(concepts):
            raise ValueError(f"concepts must be distinct, got {self.concepts}")
        self.concepts = concepts


class JointCapture:
    """Per-model-call state of one tap's capture processors, and the side computations.

    ``record(name, maps [B, N, T], grid, kind)`` receives head-averaged maps over image tokens
    (kind ``"attention"``: the trace's word maps; ``"concepts"``: the concept maps). The family
    sets ``text_length`` (single-stream blocks see the joint sequence only) and ``grid`` (the
    image-token grid) from a pre-hook on the transformer, and starts the concept stream there."""

    def __init__(self, record: Callable, options: JointOptions, encode_concepts: Callable[[int], torch.Tensor] | None = None):
        self.record = record
        self.options = options
        self.encode_concepts = encode_concepts  # text length -> concept embeddings [K, D_text]
        self.text_length: int | None = None
        self.grid: tuple[int, int] | None = None
        self.concept_states: torch.Tensor | None = None  # [B, K, D] the concept stream between blocks
        self.temb: torch.Tensor | None = None  # the running block's conditioning embedding
        self._concept_cache: dict = {}

    # ------------------------------------------------------------------ per model call
    def start_call(self, transformer: torch.nn.Module, context: torch.Tensor, grid: tuple[int, int]) -> None:
        self.text_length = int(context.shape[1])
        self.grid = (int(grid[0]), int(grid[1]))
        self.concept_states = None
        if self.options.concepts and self.encode_concepts is not None:
            key = (self.text_length, context.device, context.dtype)
            embeds = self._concept_cache.get(key)
            if embeds is None:
                self._concept_cache.clear()
                embeds = self._concept_cache[key] = self.encode_concepts(self.text_length).to(context.device, context.dtype)
            tokens = transformer.context_embedder(embeds)  # [K, D]
            self.concept_states = tokens.unsqueeze(0).expand(context.shape[0], *tokens.shape).contiguous()

    def block_hook(self, module, args, kwargs):
        """Forward pre-hook of a joint block: keep its conditioning embedding for the concept stream."""
        self.temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        return None

    # ------------------------------------------------------------------ side computations
    def observe(
        self,
        name: str,
        attn,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        image: slice,
        text: slice,
        image_out: torch.Tensor | None = None,
        text_out: torch.Tensor | None = None,
        block: torch.nn.Module | None = None,
    ) -> None:
        """One joint attention layer's maps, from its joint ``query``/``key``/``value``
        ``[B, H, S, D]`` (as the attention kernel got them) and, where the block projects both
        streams, the image and text outputs ``[B, N, D_model]``, ``[B, T, D_model]``."""
        grid = self.grid
        if grid is None:
            return
        if self.options.maps == "attention":
            probs = joint_image_text_probs(
                query, key, image, text, scale=getattr(attn, "scale", None),
                renormalize=self.options.joint_rows == "renormalized", mean_heads=True,
            )
            self.record(name, probs, grid, "attention")
        elif image_out is not None and text_out is not None:
            self.record(name, output_space_maps(image_out, text_out), grid, "attention")
        if self.concept_states is not None and block is not None:
            self._concept_step(name, attn, block, query[:, :, image], key[:, :, image], value[:, :, image], image_out)

    @torch.no_grad()
    def _concept_step(self, name, attn, block, img_q, img_k, img_v, image_out) -> None:
        """Advance the concept stream through one double-stream block and record its maps."""
        c = self.concept_states
        temb = self.temb
        if temb is None:
            return
        pre_only = bool(getattr(attn, "context_pre_only", False)) or getattr(attn, "to_add_out", None) is None
        if pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
        heads, head_dim = img_q.shape[1], img_q.shape[-1]
        split = lambda x: x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        cq, ck, cv = split(attn.add_q_proj(norm_c)), split(attn.add_k_proj(norm_c)), split(attn.add_v_proj(norm_c))
        if getattr(attn, "norm_added_q", None) is not None:
            cq = attn.norm_added_q(cq)
        if getattr(attn, "norm_added_k", None) is not None:
            ck = attn.norm_added_k(ck)
        # Concept tokens sit at text position 0 (Flux's text ids are zeros): RoPE is the identity.
        if self.options.maps == "attention" or pre_only:
            if self.options.maps == "attention":
                maps = joint_image_text_probs(
                    torch.cat([img_q, cq], 2), torch.cat([img_k, ck], 2),
                    slice(0, img_q.shape[2]), slice(img_k.shape[2], img_k.shape[2] + ck.shape[2]),
                    scale=getattr(attn, "scale", None), renormalize=True, mean_heads=True,
                )
                self.record(name, maps, self.grid, "concepts")
            if pre_only:
                self.concept_states = None  # the stream ends with the text stream
                return
        out = F.scaled_dot_product_attention(cq, torch.cat([img_k, ck], 2), torch.cat([img_v, cv], 2))
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * head_dim).to(cq.dtype)
        concept_out = attn.to_add_out(out)
        if self.options.maps == "output" and image_out is not None:
            self.record(name, output_space_maps(image_out, concept_out), self.grid, "concepts")
        c = c + c_gate_msa.unsqueeze(1) * concept_out
        norm = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(norm)
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        self.concept_states = c


def start_calls(family, pipe, transformer: torch.nn.Module, capture: JointCapture, undo: list, skipped: list[str], nothing_traced: str) -> list:
    """The end of every joint family's install: name the layers left untraced, refuse a model
    with none traced, and start the capture at each transformer call (its context and token grid)."""
    if skipped:
        warnings.warn("these joint-attention layers use custom processors and are not traced: " + ", ".join(skipped), stacklevel=6)
    if not undo:
        raise RuntimeError(nothing_traced)

    def start(module, args, kwargs):
        sample, context = family.model_inputs(args, kwargs)
        if sample is not None and context is not None:
            capture.start_call(module, context, family.token_grid(pipe, sample, kwargs))
        return None

    undo.append(transformer.register_forward_pre_hook(start, with_kwargs=True).remove)
    return undo

def mean_concept_tokens(embeds: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """One token per concept: the mean of ``embeds[k]`` ``[K, T, D]`` over concept k's positions."""
    rows = []
    for k, pos in enumerate(positions):
        if not pos:
            raise ValueError(f"concept {k} has no tokens in the text encoder's context")
        rows.append(embeds[k, pos].float().mean(0))
    return torch.stack(rows).to(embeds.dtype)


def transformer_item_bytes(transformer: torch.nn.Module, tokens: int, text: int, branches: int, model_fn, x: torch.Tensor) -> int:
    """Bytes one latent costs in a no-grad transformer forward: measured on CUDA, estimated elsewhere
    (the live activations of one block over the joint sequence; SDPA holds no S × S scores)."""
    param = next(transformer.parameters())
    if param.device.type == "cuda":
        from explain.denoiser import NoiseLevel

        key = (tuple(x.shape[1:]), branches, str(param.dtype))
        cache = transformer.__dict__.setdefault("_explain_item_bytes", {})
        if key not in cache:
            torch.cuda.synchronize(param.device)
            base = torch.cuda.memory_allocated(param.device)
            torch.cuda.reset_peak_memory_stats(param.device)
            with torch.no_grad():
                model_fn(x[:1].to(param.device), NoiseLevel(timestep=500.0, sigma=0.5))
            torch.cuda.synchronize(param.device)
            cache[key] = int((torch.cuda.max_memory_allocated(param.device) - base) * 1.25) + 1
        return cache[key]
    width = int(getattr(transformer, "inner_dim", 0) or transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    # q, k, v, the attention output, the residual stream and a 4× MLP: about 16 widths per token
    return int(branches * 16 * (tokens + text) * width * max(param.element_size(), 4))
