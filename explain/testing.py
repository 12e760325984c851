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
