"""The embedded model: a small Stable-Diffusion-shaped pipeline trained on the shapes world.

It is a genuine diffusers ``StableDiffusionPipeline`` (``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTokenizer``, ``UNet2DConditionModel`` with cross-attention at 16×16, 8×8 and 4×4, a
DPM-Solver++ scheduler), so every code path that works on it works unchanged on Stable
Diffusion 1.x/2.x. It makes 64×64 images from 16×16×4 latents, loads from the package folder
with ``local_files_only=True`` and never touches the network.

`build_components` gives the untrained architecture (used by ``scripts/train_embedded.py``);
`load_pipeline` loads the shipped weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-64"
MODEL_ID = "diffusion-explain/shapes-64"
IMAGE_SIZE = 64
DEFAULT_PROMPT = "a large red circle above a small blue square"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 192),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' legacy name: the number of heads
    norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=128,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
)


class EmbeddedModelMissing(FileNotFoundError):
    pass


def vocabulary() -> list[str]:
    from explain.embedded.world import vocabulary as world_vocabulary

    return world_vocabulary()


def build_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """The untrained pipeline components (random weights from ``seed``)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    return dict(
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )


def is_available(model_dir: str | Path = MODEL_DIR) -> bool:
    return (Path(model_dir) / "model_index.json").is_file() and (Path(model_dir) / "unet").is_dir()


def training_info(model_dir: str | Path = MODEL_DIR) -> dict:
    """What ``scripts/train_embedded.py`` wrote next to the weights (config, generator version)."""
    path = Path(model_dir) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pipeline(model_dir: str | Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The embedded ``StableDiffusionPipeline``, loaded offline from the package folder."""
    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
    if not is_available(model_dir):
        raise EmbeddedModelMissing(
            f"the embedded model's weights are not in {model_dir}; "
            "train them with `python scripts/train_embedded.py` or reinstall diffusion-explain"
        )
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*safety_checker.*")
        # dtype is applied with .to() below: the keyword for it changed name across diffusers versions
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir),
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module.dtype != dtype:  # transformers keeps the fp16 the weights are stored in
            module.to(dtype)
    return pipe.to(device)


def check_prompt(prompt: str, tokenizer=None) -> list[str]:
    """Words of ``prompt`` that the embedded model never saw (they become single characters)."""
    from explain.embedded.vocabulary import unknown_words

    if tokenizer is None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"), local_files_only=True)
    return unknown_words(tokenizer, prompt, vocabulary())
