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


MODEL_NAMES = ("unet", "dit")


def model_dir_for(model: str | Path | None = None) -> Path:
    """The folder of an embedded model: ``None`` or ``"unet"`` is the shipped UNet model
    (``shapes-64``), ``"dit"`` the shipped MMDiT (``shapes-dit-64``); anything else is a path."""
    if model is None or model == "unet":
        return MODEL_DIR
    if model == "dit":
        from explain.embedded.dit import DIT_MODEL_DIR

        return DIT_MODEL_DIR
    return Path(model)


def _pipeline_class(model_dir: Path) -> str | None:
    index = model_dir / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError:
        return None


def is_available(model_dir: str | Path | None = MODEL_DIR) -> bool:
    model_dir = model_dir_for(model_dir)
    denoiser = "transformer" if _pipeline_class(model_dir) == "StableDiffusion3Pipeline" else "unet"
    return (model_dir / "model_index.json").is_file() and (model_dir / denoiser).is_dir()


def training_info(model_dir: str | Path | None = MODEL_DIR) -> dict:
    """What the training script wrote next to the weights (config, generator version)."""
    path = model_dir_for(model_dir) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pipeline(model_dir: str | Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """An embedded pipeline, loaded offline: ``None``/``"unet"`` the shipped
    ``StableDiffusionPipeline`` (the default), ``"dit"`` the shipped ``StableDiffusion3Pipeline``,
    or a folder, loaded by the class its ``model_index.json`` names. Call an SD3 one with
    `call_kwargs` (``max_sequence_length=0``)."""
    name = model_dir if model_dir in MODEL_NAMES else None
    if isinstance(model_dir, str) and name is None and not _looks_like_path(model_dir):
        raise ValueError(
            f"{model_dir!r} is not an embedded model; use one of {', '.join(repr(n) for n in MODEL_NAMES)} "
            "(None is 'unet'), or a model folder"
        )
    model_dir = model_dir_for(model_dir)
    kind = _pipeline_class(model_dir)
    if not is_available(model_dir):
        script = "train_embedded_dit.py" if name == "dit" or kind == "StableDiffusion3Pipeline" else "train_embedded.py"
        raise EmbeddedModelMissing(
            f"the embedded model's weights are not in {model_dir}; "
            f"train them with `python scripts/{script}` or reinstall diffusion-explain"
        )
    if kind not in ("StableDiffusionPipeline", "StableDiffusion3Pipeline"):
        raise ValueError(
            f"{model_dir} holds a {kind}; the embedded loader reads a StableDiffusionPipeline (UNet) or a "
            "StableDiffusion3Pipeline (DiT) folder"
        )
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    if kind == "StableDiffusion3Pipeline":
        from explain.embedded.dit import load_dit_pipeline

        return load_dit_pipeline(model_dir, device=device, dtype=dtype)
    from diffusers import StableDiffusionPipeline

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


def _looks_like_path(text: str) -> bool:
    import os

    return Path(text).expanduser().exists() or any(sep in text for sep in ("/", "\\", os.sep)) or text.startswith((".", "~"))


def check_prompt(prompt: str, tokenizer=None) -> list[str]:
    """Words of ``prompt`` that the embedded model never saw (they become single characters)."""
    from explain.embedded.vocabulary import unknown_words

    if tokenizer is None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"), local_files_only=True)
    return unknown_words(tokenizer, prompt, vocabulary())
