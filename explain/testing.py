"""Tiny random-weight diffusers pipelines, built offline, for tests of code that must also run on
Stable Diffusion 1.x/2.x and SDXL.

They have the real component classes and the real block structure (down / mid / up blocks
with cross-attention at two resolutions), only far smaller, so every code path of a full
model runs in milliseconds on a CPU.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SCHEDULERS = ("dpm++", "ddim", "ddpm", "euler", "euler_a", "pndm", "heun")

# Stable Diffusion's published noise schedule and offset.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def make_scheduler(name: str = "dpm++", prediction_type: str = "epsilon", **overrides):
    """A diffusers scheduler by short name, with Stable Diffusion's noise schedule."""
    import diffusers

    classes = {
        "dpm++": diffusers.DPMSolverMultistepScheduler,
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(classes)}")
    kwargs = dict(_SD_SCHEDULE, prediction_type=prediction_type)
    if name == "dpm++":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2)
    if name in ("ddim", "ddpm"):
        kwargs.update(clip_sample=False)
    if name == "ddim":
        kwargs.update(set_alpha_to_one=False)
    if name == "pndm":
        kwargs.update(skip_prk_steps=True)
    kwargs.update(overrides)
    return classes[name](**kwargs)


@lru_cache(maxsize=1)
def tokenizer_folder() -> Path:
    """An offline CLIP tokenizer over the shapes world's words (written once per process)."""
    from explain.embedded.vocabulary import write_clip_tokenizer
    from explain.embedded.world import vocabulary

    return write_clip_tokenizer(vocabulary(), Path(tempfile.mkdtemp(prefix="explain-tok-")))


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_folder()), local_files_only=True)


def _text_encoder(vocab_size: int, hidden: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def tiny_sd_pipeline(scheduler: str = "dpm++", prediction_type: str = "epsilon", seed: int = 0):
    """A random-weight ``StableDiffusionPipeline``: 32×32 images, 16×16 latents, cross-attention
    at 16×16 and 8×8 (plus the mid block at 8×8)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(len(tokenizer), 16),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(scheduler: str = "euler", seed: int = 0):
    """A random-weight ``StableDiffusionXLPipeline`` with two text encoders (SDXL's structure)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(len(tokenizer), 16),
        text_encoder_2=_text_encoder(len(tokenizer), 16, with_projection=True, projection_dim=16),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- joint-attention transformers
T5_WIDTH = 32  # the tiny T5's d_model; SD3's joint_attention_dim and Flux's text width follow it


def t5_vocabulary() -> list[tuple[str, float]]:
    """A Unigram vocabulary (piece, score) for `tiny_t5_tokenizer`: T5's three special tokens, one
    "▁word" piece per shapes-world word, and single-character fallbacks for any other word."""
    import string

    from explain.embedded.world import vocabulary

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("▁" + w, -1.0) for w in vocabulary()]
    chars = [("▁", -5.0)] + [(c, -10.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    seen, out = set(), []
    for piece, score in specials + words + chars:
        if piece not in seen:
            seen.add(piece)
            out.append((piece, score))
    return out


def tiny_t5_tokenizer():
    """An offline ``T5TokenizerFast`` (sentencepiece-style Unigram) over the shapes world's words."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0)


def _t5_encoder(vocab_size: int, width: int = T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=width * 2, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _flow_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0, **overrides})


def _dit_vae():
    vae = _vae()
    vae.register_to_config(shift_factor=0.0)  # SD3/Flux decode latents / scaling_factor + shift_factor
    return vae


def tiny_sd3_pipeline(t5: bool = True, seed: int = 0, num_layers: int = 3, qk_norm: str | None = None):
    """A random-weight ``StableDiffusion3Pipeline``: MMDiT (``SD3Transformer2DModel``, patch 2,
    ``num_layers`` joint blocks, the last one ``context_pre_only``), two CLIP encoders with
    projection, a tiny T5 (or none: ``t5=False``, as the embedded DiT), a flow-matching scheduler.
    32×32 images, 16×16×4 latents, 8×8 image tokens; ``qk_norm="rms_norm"`` as SD3.5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    encoders = [_text_encoder(len(tokenizer), 16, with_projection=True, projection_dim=16) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=16,
        caption_projection_dim=32,  # must equal heads × head dim
        joint_attention_dim=T5_WIDTH,  # ≥ the two CLIP widths together (16 + 16), = T5's width
        pooled_projection_dim=32,  # the two projection sizes together
        pos_embed_max_size=8,
        qk_norm=qk_norm,
    ).eval()
    t5_tokenizer = tiny_t5_tokenizer() if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=_dit_vae(),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5_tokenizer)) if t5 else None,
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(guidance_embeds: bool = False, seed: int = 0, num_layers: int = 2, num_single_layers: int = 2):
    """A random-weight ``FluxPipeline``: ``FluxTransformer2DModel`` with ``num_layers`` double- and
    ``num_single_layers`` single-stream blocks, RoPE over (8, 4, 4) of each 16-wide head, a CLIP
    encoder (pooled) and a tiny T5 (the sequence), a flow-matching scheduler with Flux's
    resolution-dependent shift. ``guidance_embeds=True`` is a guidance-distilled model
    (FLUX.1-dev style: the guidance scale is an input, there is no unconditional branch).
    32×32 images, 16×16×4 latents packed as 8×8 tokens of 16 features."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 packing
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=16,  # the CLIP encoder's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(8, 4, 4),  # must sum to the head dim
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                  base_shift=0.5, max_shift=1.15),
        vae=_dit_vae(),
        text_encoder=_text_encoder(len(tokenizer), 16),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
