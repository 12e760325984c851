"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT whose text conditioning is
joint attention.

Structure: ``SD3Transformer2DModel`` patchifies the ``[B, C, h, w]`` latent (patch 2) into
(h/2)·(w/2) image tokens; every ``JointTransformerBlock`` runs one attention over the joint
sequence **[image, text]** (diffusers' order; ComfyUI's is the reverse), with separate
projections per stream; the last block is ``context_pre_only`` (no text output projection).
SD3.5's extra image-only attention (``attn2``) is not text attention and keeps its processor.

Text context: the two CLIP encoders' penultimate states side by side in the features
(``tokenizer_max_length`` positions, 77 for SD3), then T5's ``max_sequence_length`` positions
(zeros when the pipeline has no T5). The trace keeps each part through its end token, so a
word has a CLIP and a T5 position (`explain.tokens.concat_prompt_tokens`). Without T5, call the
pipeline with ``max_sequence_length=0`` (`generate` does): otherwise 256 zero tokens take part
in every softmax.

Guidance: classifier-free, the model batch is ``[uncond; cond]`` as for UNets; skip-layer
guidance's extra call is not recorded. Flow matching: the model predicts v = ε - x0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from explain.adapters.diffusers.families import Family, ProbeFunctions, TextSegment
from explain.adapters.diffusers.families.joint import JointCapture, JointOptions, mean_concept_tokens, start_calls, transformer_item_bytes
from explain.denoiser import NoiseLevel

STOCK_PROCESSORS = {"JointAttnProcessor2_0"}


class SD3CaptureProcessor:
    """diffusers' ``JointAttnProcessor2_0``, unchanged for the output, that shows its joint queries,
    keys and values to a `JointCapture` (image-query × text-key maps, concept stream)."""

    def __init__(self, name: str, capture: JointCapture, block: torch.nn.Module):
        self.name = name
        self.capture = capture
        self.block = block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # --- the stock computation (diffusers 0.3x-0.4x JointAttnProcessor2_0), kept verbatim
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        # --- on the side: joint sequence [image, text]
        if encoder_hidden_states is not None:
            n = residual.shape[1]
            self.capture.observe(
                self.name, attn, query, key, value, image=slice(0, n), text=slice(n, key.shape[2]),
                image_out=hidden_states, text_out=None if attn.context_pre_only else encoder_hidden_states, block=self.block,
            )
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3Family(Family):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (MMDiT joint attention, StableDiffusion3Pipeline)"
    joint = True

    def matches(self, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return type(transformer).__name__ == "SD3Transformer2DModel" and getattr(pipe, "scheduler", None) is not None

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def model_inputs(self, args, kwargs):
        sample = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return sample, context

    def token_grid(self, pipe, sample, kwargs) -> tuple[int, int]:
        p = int(pipe.transformer.config.patch_size)
        return int(sample.shape[-2]) // p, int(sample.shape[-1]) // p

    def call_branches(self, pipe, run, rows, context, kwargs):
        if kwargs.get("skip_layers"):
            return None  # skip-layer guidance's extra conditional call: not the step's attention
        return super().call_branches(pipe, run, rows, context, kwargs)

    def text_segments(self, pipe, context_length: int) -> list[TextSegment]:
        clip = min(int(getattr(pipe, "tokenizer_max_length", 77)), context_length)
        segments = [TextSegment(pipe.tokenizer, 0, clip, ("prompt",), ("negative_prompt",), name="clip")]
        if context_length > clip:
            t5 = getattr(pipe, "tokenizer_3", None) if getattr(pipe, "text_encoder_3", None) is not None else None
            pad = getattr(t5, "pad_token", None) or "<pad>"
            segments.append(
                TextSegment(t5, clip, context_length - clip, ("prompt_3", "prompt"), ("negative_prompt_3", "negative_prompt"),
                            pad=pad if t5 is not None else "<empty>", name="t5" if t5 is not None else "t5 (zeros)")
            )
        return segments

    def run_meta(self, pipe, run) -> dict:
        clip = min(int(getattr(pipe, "tokenizer_max_length", 77)), run.context_length)
        return {"max_sequence_length": int(run.context_length - clip), "t5": getattr(pipe, "text_encoder_3", None) is not None}

    def call_kwargs(self, pipe, prompt, negative_prompt, guidance, pipe_kwargs) -> dict:
        kwargs = {"negative_prompt": negative_prompt, "guidance_scale": float(guidance)}
        if "max_sequence_length" not in pipe_kwargs and "prompt_embeds" not in pipe_kwargs:
            kwargs["max_sequence_length"] = short_t5_length(getattr(pipe, "tokenizer_3", None) if pipe.text_encoder_3 is not None else None,
                                                            [prompt, negative_prompt], default=256)
        return kwargs

    def install_capture(self, pipe, record, method: str = "explicit", options: JointOptions | None = None):
        options = options or JointOptions()
        capture = JointCapture(record, options, lambda length: self.encode_concepts(pipe, options.concepts, length))
        undo, skipped = [], []
        transformer = pipe.transformer
        for index, block in enumerate(transformer.transformer_blocks):
            attn = block.attn
            original = attn.processor
            name = f"transformer_blocks.{index}.attn"
            if type(original).__name__ not in STOCK_PROCESSORS:
                skipped.append(f"{name} ({type(original).__name__})")
                continue
            attn.set_processor(SD3CaptureProcessor(name, capture, block))
            undo.append(lambda a=attn, p=original: a.set_processor(p))
            undo.append(block.register_forward_pre_hook(capture.block_hook, with_kwargs=True).remove)
        return start_calls(self, pipe, transformer, capture, undo, skipped, nothing_traced="the SD3 transformer has no joint-attention layer with diffusers' JointAttnProcessor2_0 to trace")

    def layer_grids(self, pipe, latent_size, options=None):
        """Every captured block's maps are on the patch grid; output-space maps skip the last,
        ``context_pre_only`` block (no text output to take dot products with)."""
        p = int(pipe.transformer.config.patch_size)
        grid = (int(latent_size[0]) // p, int(latent_size[1]) // p)
        output = options is not None and options.maps == "output"
        return {
            f"transformer_blocks.{i}.attn": grid
            for i, block in enumerate(pipe.transformer.transformer_blocks)
            if isinstance(block.attn.processor, SD3CaptureProcessor) and not (output and block.attn.context_pre_only)
        }

    def encode_concepts(self, pipe, concepts: list[str], text_length: int) -> torch.Tensor:
        """Each concept through the pipeline's own text path (CLIP + T5 as for the prompt), one
        token each: the mean over its word's CLIP and T5 positions."""
        from explain.tokens import concat_prompt_tokens, tokenize_prompt

        segments = self.text_segments(pipe, text_length)
        device = next(pipe.transformer.parameters()).device
        with torch.no_grad():
            embeds = type(pipe).encode_prompt(
                pipe, prompt=list(concepts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=text_length - segments[0].length,
            )[0]
        positions = []
        for concept in concepts:
            parts = [tokenize_prompt(s.tokenizer, concept, max_length=s.length, warn=False) if s.tokenizer is not None else None for s in segments]
            named = [p for p in parts if p is not None]
            joined = concat_prompt_tokens(named, [len(p.tokens) for p in named])
            offsets = []
            for s, p in zip(segments, parts):  # positions in the joined list -> context positions
                if p is not None:
                    offsets += [s.start + i for i in range(len(p.tokens))]
            positions.append(sorted({offsets[i] for w in joined.words for i in w.token_indices}))
        return mean_concept_tokens(embeds, positions)

    def probe_functions(self, pipe, model, prompt, negative_prompt, guided, image_size, latent_space, settings=None) -> ProbeFunctions:
        settings = settings or {}
        transformer = model
        device = next(transformer.parameters()).device
        dtype = next(transformer.parameters()).dtype
        length = int(settings.get("max_sequence_length", 0 if getattr(pipe, "text_encoder_3", None) is None else 256))
        with torch.no_grad():
            cond, neg, pooled, neg_pooled = type(pipe).encode_prompt(
                pipe, prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=True,  # the negative context also stands in for dropped tokens
                negative_prompt=negative_prompt or None, max_sequence_length=length,
            )
        positions = settings.get("text_positions")

        def run(x: torch.Tensor, level: NoiseLevel, cond_context: torch.Tensor):
            n = x.shape[0]
            x_in = x.to(device=device, dtype=dtype)
            contexts = [neg.expand(n, *neg.shape[1:]), cond_context.expand(n, *cond_context.shape[1:])] if guided else [cond_context.expand(n, *cond_context.shape[1:])]
            pools = [neg_pooled.expand(n, -1), pooled.expand(n, -1)] if guided else [pooled.expand(n, -1)]
            latent_in = torch.cat([x_in] * len(contexts))
            t = torch.full((latent_in.shape[0],), float(level.timestep), device=device)  # float32, as the pipeline's
            out = transformer(
                hidden_states=latent_in, timestep=t, encoder_hidden_states=torch.cat(contexts).to(dtype),
                pooled_projections=torch.cat(pools).to(dtype), return_dict=False,
            )[0]
            if guided:
                u, c = out.chunk(2)
                return u, c
            return None, out

        def model_fn(x, level):
            return run(x, level, cond)

        def token_model_fn(x, level, keep):
            return run(x, level, masked_context(cond, neg, keep, positions, x.shape[0]))

        grid = lambda x: (x.shape[-2] // transformer.config.patch_size) * (x.shape[-1] // transformer.config.patch_size)  # noqa: E731

        def estimate(x):
            return transformer_item_bytes(transformer, grid(x), cond.shape[1], 2 if guided else 1, model_fn, x)

        return ProbeFunctions(model_fn=model_fn, token_model_fn=token_model_fn, estimate_item_bytes=estimate)


def masked_context(cond: torch.Tensor, neg: torch.Tensor, keep: torch.Tensor, positions: list[int] | None, items: int) -> torch.Tensor:
    """The conditional context with the trace's token positions dropped where ``keep`` is 0: a
    dropped position takes the negative context's value there (as for UNets). ``positions`` maps
    the trace's token axis to context positions (None: the first positions)."""
    n, t = keep.shape
    if n != items:
        raise ValueError(f"token mask must have one row per latent ({items}), got {tuple(keep.shape)}")
    where = list(range(t)) if positions is None else [int(p) for p in positions]
    if t > len(where) or (where and max(where[:t]) >= cond.shape[1]):
        raise ValueError(f"token mask must be [{items}, <= {len(where)}], got {tuple(keep.shape)}")
    k = torch.ones(n, cond.shape[1], 1, device=cond.device, dtype=cond.dtype)
    k[:, torch.tensor(where[:t], device=cond.device), 0] = keep.to(device=cond.device, dtype=cond.dtype)
    return k * cond + (1 - k) * neg


def short_t5_length(tokenizer, prompts, default: int, multiple: int = 8) -> int:
    """A T5 ``max_sequence_length`` that fits the prompts, rounded up to ``multiple`` (0 without T5):
    fewer padding tokens to soak up attention and dilute the maps than the pipelines' 256 / 512."""
    if tokenizer is None:
        return 0
    texts = [t for item in prompts for t in ([item] if isinstance(item, str) else list(item or []))]
    lengths = [len(tokenizer(t).input_ids) for t in texts]
    need = max(lengths, default=1)
    return int(min(default, -(-need // multiple) * multiple))


FAMILY = SD3Family()
