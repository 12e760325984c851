"""Flux.1 (``FluxPipeline``): double-stream and single-stream transformer blocks over packed latents.

Structure: the ``[B, C, h, w]`` latent is **packed** into (h/2)·(w/2) tokens of 4·C features
(``[B, N, 4C]``); image-token positions come from ``img_ids`` (row, column), text positions are
zeros. The double-stream blocks (``FluxTransformerBlock``) run one attention over **[text,
image]** with separate projections per stream; the single-stream blocks
(``FluxSingleTransformerBlock``) get the concatenated [text, image] sequence and no
``encoder_hidden_states``, so the text length comes from a pre-hook on the transformer. RoPE is
applied inside the processor after the q/k RMSNorm, to all tokens: maps use the **rotated**
queries and keys (the unrotated ones give other maps: 41 % relative L1 on a layer-0 map of a
random model). The text context is T5's ``max_sequence_length`` positions (512 by default, all
padding after the prompt, no mask): `generate` shortens it to fit the prompt.

Guidance, two kinds:

* **true CFG** (``negative_prompt`` and ``true_cfg_scale > 1``): the pipeline encodes the
  negative prompt in a second ``encode_prompt`` call and runs two batch-1 forwards per step,
  conditional first; the tap tells them apart by the context tensor each gets;
* **guidance-distilled** models (``guidance_embeds``, FLUX.1-dev): ``guidance_scale`` is an input
  of the transformer and there is no unconditional branch; the trace says
  ``meta["embedded_guidance"]`` and its probes pass the same value.

The tap reads ``true_cfg_scale`` from the pipeline call's own arguments (the pipeline keeps it
nowhere else).
"""

from __future__ import annotations

import torch

from explain.adapters.diffusers.families import Encoding, Family, ProbeFunctions, TextSegment
from explain.adapters.diffusers.families.joint import JointCapture, JointOptions, mean_concept_tokens, start_calls, transformer_item_bytes
from explain.adapters.diffusers.families.sd3 import masked_context, short_t5_length
from explain.attention import COND, UNCOND
from explain.denoiser import NoiseLevel

STOCK_PROCESSORS = {"FluxAttnProcessor", "FluxAttnProcessor2_0"}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]``, row-major 2×2 patches (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even sides, got {h}×{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, 4C]`` packed tokens on a ``grid`` of (h/2, w/2) → ``[B, C, h, w]`` (diffusers' ``_unpack_latents``)."""
    b, n, f = x.shape
    gh, gw = int(grid[0]), int(grid[1])
    if gh * gw != n or f % 4:
        raise ValueError(f"{n} packed tokens of {f} features do not fill a {gh}×{gw} grid of 2×2 patches")
    return x.view(b, gh, gw, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, gh * 2, gw * 2)


def _flux_processor_parts():
    from diffusers.models.transformers import transformer_flux as tf

    return tf._get_qkv_projections, tf.dispatch_attention_fn, tf.apply_rotary_emb


class FluxCaptureProcessor:
    """diffusers' ``FluxAttnProcessor``, unchanged for the output, that shows its rotated joint
    queries and keys to a `JointCapture` (sequence order [text, image])."""

    def __init__(self, name: str, capture: JointCapture, stock, block: torch.nn.Module | None):
        self.name = name
        self.capture = capture
        self.block = block  # double-stream blocks only: the concept stream runs through them
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)
        self._projections, self._attend, self._rotate = _flux_processor_parts()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # --- the stock computation (diffusers 0.35-0.4x FluxAttnProcessor), kept verbatim
        query, key, value, encoder_query, encoder_key, encoder_value = self._projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = self._rotate(query, image_rotary_emb, sequence_dim=1)
            key = self._rotate(key, image_rotary_emb, sequence_dim=1)
        hidden_states = self._attend(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        # --- on the side: [B, S, H, D] -> [B, H, S, D] views of what the kernel got
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([t, hidden_states.shape[1] - t], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            self.capture.observe(
                self.name, attn, q, k, v, image=slice(t, k.shape[2]), text=slice(0, t),
                image_out=hidden_states, text_out=encoder_hidden_states, block=self.block,
            )
            return hidden_states, encoder_hidden_states
        t = self.capture.text_length
        if t is not None and 0 < t < k.shape[2]:
            self.capture.observe(self.name, attn, q, k, v, image=slice(t, k.shape[2]), text=slice(0, t))
        return hidden_states


class FluxFamily(Family):
    name = "flux"
    description = "Flux.1 (double- and single-stream transformer, FluxPipeline; true CFG or guidance-distilled)"
    joint = True
    separate_negative_encoding = True
    pipeline_arguments = ("true_cfg_scale", "guidance_scale")

    def matches(self, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return type(transformer).__name__ == "FluxTransformer2DModel" and getattr(pipe, "scheduler", None) is not None

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def model_inputs(self, args, kwargs):
        sample = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return sample, context

    # ------------------------------------------------------------------ packed latents
    def token_grid(self, pipe, sample, kwargs) -> tuple[int, int]:
        ids = kwargs.get("img_ids")
        if ids is None:
            raise RuntimeError("the Flux transformer was called without img_ids; the tap cannot place its image tokens")
        # img_ids is one tensor for a whole run: read its extent once (reading it is a device sync)
        cache = self.__dict__.setdefault("_grids", {})
        key = (ids.data_ptr(), tuple(ids.shape), ids.device)
        if key not in cache:
            cache.clear()
            flat = ids[0] if ids.ndim == 3 else ids
            cache[key] = (int(flat[:, 1].max()) + 1, int(flat[:, 2].max()) + 1)
        grid = cache[key]
        if grid[0] * grid[1] != sample.shape[1]:
            raise RuntimeError(f"img_ids span a {grid[0]}×{grid[1]} grid but the transformer got {sample.shape[1]} image tokens")
        return grid

    def latent_size(self, pipe, sample, kwargs) -> tuple[int, int]:
        gh, gw = self.token_grid(pipe, sample, kwargs)
        return 2 * gh, 2 * gw

    def unpack(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return unpack_latents(latents, (latent_size[0] // 2, latent_size[1] // 2))

    # ------------------------------------------------------------------ prompts and branches
    def read_encoding(self, pipe, arguments: dict, outputs) -> Encoding:
        embeds = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        return Encoding(embeds=embeds, negative_embeds=None, guided=False)

    def call_branches(self, pipe, run, rows, context, kwargs):
        if rows != run.batch:
            raise RuntimeError(f"the Flux transformer got {rows} latents for {run.batch} images; only one branch per call is understood")
        if run.negative_embeds is not None and context is run.negative_embeds:
            return [UNCOND]
        if run.positive_embeds is not None and context is run.positive_embeds:
            return [COND]
        # A callback replaced the embeddings: the pipeline calls the conditional branch first.
        return [UNCOND] if run.guided and run.calls_this_step % 2 == 1 else [COND]

    def text_segments(self, pipe, context_length: int) -> list[TextSegment]:
        t5 = pipe.tokenizer_2
        return [TextSegment(t5, 0, context_length, ("prompt_2", "prompt"), ("prompt_2", "prompt"), pad=getattr(t5, "pad_token", None) or "<pad>", name="t5")]

    def run_meta(self, pipe, run) -> dict:
        args = run.call_arguments
        meta: dict = {"max_sequence_length": int(run.context_length)}
        true_cfg = args.get("true_cfg_scale")
        if run.guided and true_cfg is not None:
            meta["guidance_scale"] = meta["guidance"] = float(true_cfg)
        elif not run.guided:
            meta["guidance_scale"] = meta["guidance"] = 1.0
        else:
            meta.pop("guidance_scale", None)
        meta["true_cfg_scale"] = float(true_cfg) if true_cfg is not None else None
        if pipe.transformer.config.guidance_embeds:
            embedded = args.get("guidance_scale", getattr(pipe, "_guidance_scale", None))
            if embedded is not None:
                meta["embedded_guidance"] = float(embedded)
        if meta["true_cfg_scale"] is None:
            del meta["true_cfg_scale"]
        return meta

    def call_kwargs(self, pipe, prompt, negative_prompt, guidance, pipe_kwargs) -> dict:
        """`generate`'s ``guidance`` is the embedded guidance of a guidance-distilled model, else
        the true-CFG scale (with an empty negative prompt if none is given, so CFG runs at > 1)."""
        kwargs: dict = {}
        if pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = float(guidance)
            if negative_prompt is not None:
                kwargs["negative_prompt"] = negative_prompt
        else:
            kwargs["true_cfg_scale"] = float(guidance)
            if float(guidance) > 1.0:
                kwargs["negative_prompt"] = negative_prompt or ""
        if "max_sequence_length" not in pipe_kwargs and "prompt_embeds" not in pipe_kwargs:
            kwargs["max_sequence_length"] = max(1, short_t5_length(pipe.tokenizer_2, [prompt, negative_prompt], default=512))
        return kwargs

    # ------------------------------------------------------------------ capture
    def install_capture(self, pipe, record, method: str = "explicit", options: JointOptions | None = None):
        options = options or JointOptions()
        capture = JointCapture(record, options, lambda length: self.encode_concepts(pipe, options.concepts, length))
        transformer = pipe.transformer
        undo, skipped = [], []
        blocks = [(f"transformer_blocks.{i}", b, True) for i, b in enumerate(transformer.transformer_blocks)]
        blocks += [(f"single_transformer_blocks.{i}", b, False) for i, b in enumerate(transformer.single_transformer_blocks)]
        for prefix, block, double in blocks:
            attn = block.attn
            original = attn.processor
            if type(original).__name__ not in STOCK_PROCESSORS:
                skipped.append(f"{prefix}.attn ({type(original).__name__})")
                continue
            attn.set_processor(FluxCaptureProcessor(f"{prefix}.attn", capture, original, block if double else None))
            undo.append(lambda a=attn, p=original: a.set_processor(p))
            if double:
                undo.append(block.register_forward_pre_hook(capture.block_hook, with_kwargs=True).remove)
        return start_calls(self, pipe, transformer, capture, undo, skipped, nothing_traced="the Flux transformer has no attention layer with diffusers' FluxAttnProcessor to trace")

    def layer_grids(self, pipe, latent_size, options=None):
        """Every captured block's maps are on the packed grid (h/2, w/2); output-space maps come
        from the double-stream blocks only (single-stream blocks have no separate text output)."""
        grid = (int(latent_size[0]) // 2, int(latent_size[1]) // 2)
        output = options is not None and options.maps == "output"
        transformer = pipe.transformer
        blocks = [(f"transformer_blocks.{i}", b, True) for i, b in enumerate(transformer.transformer_blocks)]
        blocks += [(f"single_transformer_blocks.{i}", b, False) for i, b in enumerate(transformer.single_transformer_blocks)]
        return {
            f"{prefix}.attn": grid for prefix, block, double in blocks
            if isinstance(block.attn.processor, FluxCaptureProcessor) and (double or not output)
        }

    def encode_concepts(self, pipe, concepts: list[str], text_length: int) -> torch.Tensor:
        """Each concept through T5 as the prompt is (same ``max_sequence_length``), one token each:
        the mean over its word's positions."""
        from explain.tokens import tokenize_prompt

        device = next(pipe.transformer.parameters()).device
        with torch.no_grad():
            embeds = type(pipe).encode_prompt(pipe, prompt=list(concepts), prompt_2=None, device=device, num_images_per_prompt=1,
                                              max_sequence_length=text_length)[0]
        positions = []
        for concept in concepts:
            parts = tokenize_prompt(pipe.tokenizer_2, concept, max_length=text_length, warn=False)
            positions.append(sorted({i for w in parts.words for i in w.token_indices}))
        return mean_concept_tokens(embeds, positions)

    # ------------------------------------------------------------------ probes
    def probe_functions(self, pipe, model, prompt, negative_prompt, guided, image_size, latent_space, settings=None) -> ProbeFunctions:
        settings = settings or {}
        transformer = model
        device = next(transformer.parameters()).device
        dtype = next(transformer.parameters()).dtype
        length = int(settings.get("max_sequence_length", 512))
        encode = lambda text: type(pipe).encode_prompt(pipe, prompt=text, prompt_2=None, device=device, num_images_per_prompt=1,  # noqa: E731
                                                      max_sequence_length=length)
        with torch.no_grad():
            cond, pooled, text_ids = encode(prompt)
            # the negative context also stands in for dropped tokens (per-token DF-RISE)
            neg, neg_pooled, _ = encode(negative_prompt or "")
        embedded = settings.get("embedded_guidance")
        if transformer.config.guidance_embeds and embedded is None:
            embedded = float(getattr(pipe, "_guidance_scale", None) or 3.5)
        positions = settings.get("text_positions")

        def run(x: torch.Tensor, level: NoiseLevel, cond_context: torch.Tensor):
            n, _, h, w = x.shape
            latents = pack_latents(x.to(device=device, dtype=dtype))
            img_ids = type(pipe)._prepare_latent_image_ids(n, h // 2, w // 2, device, dtype)
            contexts = [neg.expand(n, *neg.shape[1:]), cond_context.expand(n, *cond_context.shape[1:])] if guided else [cond_context.expand(n, *cond_context.shape[1:])]
            pools = [neg_pooled.expand(n, -1), pooled.expand(n, -1)] if guided else [pooled.expand(n, -1)]
            rows = n * len(contexts)
            t = torch.full((rows,), float(level.timestep), device=device, dtype=dtype) / 1000  # as the pipeline: t / 1000
            guidance = torch.full((rows,), float(embedded), device=device, dtype=torch.float32) if transformer.config.guidance_embeds else None
            out = transformer(
                hidden_states=torch.cat([latents] * len(contexts)), timestep=t, guidance=guidance,
                pooled_projections=torch.cat(pools).to(dtype), encoder_hidden_states=torch.cat(contexts).to(dtype),
                txt_ids=text_ids, img_ids=img_ids, return_dict=False,
            )[0]
            out = unpack_latents(out, (h // 2, w // 2))
            if guided:
                u, c = out.chunk(2)
                return u, c
            return None, out

        def model_fn(x, level):
            return run(x, level, cond)

        def token_model_fn(x, level, keep):
            return run(x, level, masked_context(cond, neg, keep, positions, x.shape[0]))

        def estimate(x):
            return transformer_item_bytes(transformer, x.shape[-2] * x.shape[-1] // 4, cond.shape[1], 2 if guided else 1, model_fn, x)

        return ProbeFunctions(model_fn=model_fn, token_model_fn=token_model_fn, estimate_item_bytes=estimate)


FAMILY = FluxFamily()
