"""Stable Diffusion 1.x/2.x and SDXL: a UNet whose text conditioning is cross-attention (``attn2``).

Capture: each ``attn2`` layer gets a processor that computes the softmax explicitly
(`explain.attention.attention_with_probs`), reuses the probabilities for the layer's output and
reports them; self-attention (``attn1``) keeps its fast path. Layers whose processor is not one
of diffusers' plain ones (IP-Adapter, say) are left alone, with a warning.

Probes: the prompt and negative prompt are encoded once; the UNet runs on ``[uncond; cond]`` as
the pipeline does, with SDXL's pooled embeddings and time ids.
"""

from __future__ import annotations

import math
import warnings

import torch

from explain.adapters.diffusers.families import Family, ProbeFunctions
from explain.attention import attention_with_probs
from explain.denoiser import NoiseLevel

# Processors whose computation the capture processor reproduces exactly (up to float rounding).
PLAIN_PROCESSORS = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}


class CaptureCrossAttnProcessor:
    """diffusers attention processor with an explicit softmax that reports the probabilities.

    Computes exactly what ``AttnProcessor2_0`` computes (projections, norms, mask, output
    projection, residual, rescale) but with `attention_probs` in place of SDPA."""

    def __init__(self, name: str, record, method: str = "explicit"):
        self.name = name
        self.record = record
        self.method = method

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        # Half-precision models keep half-precision scores unless the layer asks for upcasting,
        # exactly like diffusers' own explicit path (the softmax accumulates in float32 anyway).
        upcast = bool(getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False))
        hidden_states, probs = attention_with_probs(
            query, key, value, scale=attn.scale, mask=attention_mask, method=self.method, upcast=upcast
        )  # probs: [B, heads, N, T]
        self.record(self.name, probs, grid)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(value.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class UNetFamily(Family):
    name = "unet"
    description = "Stable Diffusion 1.x/2.x and SDXL (UNet with cross-attention)"

    def matches(self, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "scheduler", None) is not None

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.unet

    def model_inputs(self, args: tuple, kwargs: dict):
        sample = args[0] if args else kwargs.get("sample")
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return sample, context

    def install_capture(self, pipe, record, method: str = "explicit", options=None):
        undo, skipped = [], []
        for name, module in pipe.unet.named_modules():
            if not name.endswith("attn2") or not getattr(module, "is_cross_attention", False):
                continue
            original = module.processor
            if type(original).__name__ not in PLAIN_PROCESSORS:
                skipped.append(f"{name} ({type(original).__name__})")
                continue
            undo.append(lambda m=module, p=original: m.set_processor(p))
            module.set_processor(CaptureCrossAttnProcessor(name, record, method))
        if skipped:
            warnings.warn(
                "these cross-attention layers use custom processors and are not traced (their attention is "
                "missing from the maps): " + ", ".join(skipped),
                stacklevel=5,
            )
        if not undo:
            raise RuntimeError(
                "the UNet has no cross-attention layer with a standard diffusers processor to trace"
                + (f" (custom processors: {', '.join(skipped)})" if skipped else "")
            )
        return undo

    def layer_grids(self, pipe, latent_size, options=None):
        # Each down block but those without a down-sampler halves the grid, rounding up (stride-2
        # convolutions with padding 1); the mid block runs at the last one's grid and up block j
        # at down block (n-1-j)'s, since every up-sampler restores its skip connection's size.
        unet = pipe.unet
        h, w = int(latent_size[0]), int(latent_size[1])
        down = []
        for block in unet.down_blocks:
            down.append((h, w))
            if getattr(block, "downsamplers", None):
                h, w = -(-h // 2), -(-w // 2)
        grids = {}
        for name, module in unet.named_modules():
            if not isinstance(getattr(module, "processor", None), CaptureCrossAttnProcessor):
                continue
            parts = name.split(".")
            if parts[0] == "down_blocks":
                grids[name] = down[int(parts[1])]
            elif parts[0] == "up_blocks":
                grids[name] = down[len(down) - 1 - int(parts[1])]
            elif parts[0] == "mid_block":
                grids[name] = (h, w)
            else:  # a layer outside the usual blocks: at most the latent's grid
                grids[name] = (int(latent_size[0]), int(latent_size[1]))
        return grids

    def probe_functions(self, pipe, model, prompt, negative_prompt, guided, image_size, latent_space, settings=None) -> ProbeFunctions:
        return unet_probe_functions(pipe, model, prompt, negative_prompt, guided, image_size, latent_space)


def unet_probe_functions(pipe, model, prompt, negative_prompt, guided, image_size, latent_space) -> ProbeFunctions:
    unet = model
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    if guided and getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("this UNet embeds the guidance scale itself (an LCM-style model); it is not supported yet")
    is_xl = getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "_get_add_time_ids")

    with torch.no_grad():
        if is_xl:
            cond, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,  # the negative context also stands in for dropped tokens
                negative_prompt=negative_prompt or None,
            )
        else:
            cond, neg = pipe.encode_prompt(
                prompt=prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,  # the negative context also stands in for dropped tokens
                negative_prompt=negative_prompt or None,
            )
            pooled = neg_pooled = None
    added: dict[str, torch.Tensor] = {}
    if is_xl:
        h, w = image_size if image_size is not None else (unet.config.sample_size * pipe.vae_scale_factor,) * 2
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim if getattr(pipe, "text_encoder_2", None) is not None else int(pooled.shape[-1])
        )
        time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=cond.dtype, text_encoder_projection_dim=projection_dim).to(device)
        added = {"time_ids": time_ids, "pooled": pooled, "neg_pooled": neg_pooled}

    space = latent_space

    def run(x: torch.Tensor, level: NoiseLevel, cond_context: torch.Tensor):
        n = x.shape[0]
        x_in = x / math.sqrt(1.0 + level.sigma**2) if space == "sigma" else x
        x_in = x_in.to(device=device, dtype=dtype)
        halves = 2 if guided else 1
        latent_in = torch.cat([x_in] * halves)
        cond_context = cond_context.expand(n, *cond_context.shape[1:])
        context = torch.cat([neg.expand(n, *neg.shape[1:]), cond_context]) if guided else cond_context
        kwargs = {}
        if is_xl:
            pools = [added["neg_pooled"], added["pooled"]] if guided else [added["pooled"]]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([p.expand(n, *p.shape[1:]) for p in pools]).to(dtype),
                "time_ids": added["time_ids"].expand(n * halves, -1),
            }
        t = torch.tensor(level.timestep, device=device)
        out = unet(latent_in, t, encoder_hidden_states=context.to(dtype), return_dict=False, **kwargs)[0]
        if guided:
            u, c = out.chunk(2)
            return u, c
        return None, out

    def model_fn(x: torch.Tensor, level: NoiseLevel):
        return run(x, level, cond)

    def token_model_fn(x: torch.Tensor, level: NoiseLevel, keep: torch.Tensor):
        n, t = keep.shape
        if keep.shape[0] != x.shape[0] or t > cond.shape[1]:
            raise ValueError(f"token mask must be [{x.shape[0]}, <= {cond.shape[1]}], got {tuple(keep.shape)}")
        k = torch.ones(n, cond.shape[1], 1, device=device, dtype=cond.dtype)
        k[:, :t, 0] = keep.to(device=device, dtype=cond.dtype)
        context = k * cond + (1 - k) * neg
        return run(x, level, context)

    def estimate(x: torch.Tensor) -> int:
        return unet_item_bytes(unet, x, 2 if guided else 1, model_fn)

    return ProbeFunctions(model_fn=model_fn, token_model_fn=token_model_fn, estimate_item_bytes=estimate)


def unet_item_bytes(unet, x: torch.Tensor, branches: int, model_fn) -> int:
    """Bytes one latent costs in a no-grad UNet forward: measured on CUDA, estimated elsewhere."""
    device = next(unet.parameters()).device
    elem = next(unet.parameters()).element_size()
    if device.type == "cuda":
        key = (tuple(x.shape[1:]), branches, str(next(unet.parameters()).dtype))
        cache = unet.__dict__.setdefault("_explain_item_bytes", {})
        if key not in cache:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                model_fn(x[:1].to(device), NoiseLevel(timestep=500.0, sigma=1.0))
            torch.cuda.synchronize(device)
            cache[key] = int((torch.cuda.max_memory_allocated(device) - base) * 1.25) + 1
        return cache[key]
    # CPU: the feature maps of every resolution level (skip connections keep them alive), plus
    # the self-attention matrices where the backend materialises them. diffusers' default
    # (SDPA) runs a fused kernel that never holds the N×N scores, so it adds nothing beyond the
    # features; the classic processors hold about three N×N copies per head. Calibrated on an
    # SD1.5-shaped UNet at 512 px (benchmarks/bench_probe_memory.py measures both).
    cfg = unet.config
    h, w = x.shape[-2:]
    feats = 0
    for level, ch in enumerate(cfg.block_out_channels):
        feats += 32 * ch * max(1, h >> level) * max(1, w >> level)
    heads = cfg.attention_head_dim if isinstance(cfg.attention_head_dim, int) else max(cfg.attention_head_dim)
    attention = 3 * heads * (h * w) ** 2 if materialises_self_attention(unet) else 0
    return int(branches * (feats + attention) * max(elem, 4))


# Processors that compute attention in a fused kernel without materialising the scores.
FUSED_PROCESSORS = {"AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU"}


def materialises_self_attention(unet) -> bool:
    """Whether any self-attention layer holds its full N×N score matrix (a classic processor)."""
    processors = getattr(unet, "attn_processors", {})
    return any(type(p).__name__ not in FUSED_PROCESSORS for name, p in processors.items() if "attn1" in name)

FAMILY = UNetFamily()
