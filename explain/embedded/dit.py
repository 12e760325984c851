"""The embedded DiT: a small SD3-shaped MMDiT pipeline trained on the shapes world.

It is a genuine diffusers ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (joint
attention of image and text tokens in every block), two ``CLIPTextModelWithProjection`` text
encoders on the shapes tokenizer, no T5, a ``FlowMatchEulerDiscreteScheduler`` and the shipped
4-channel ``AutoencoderKL`` of ``shapes-64``. It makes 64×64 images from 16×16×4 latents
(8×8 = 64 image tokens of patch 2) and was trained without any grounding loss, so its attention
maps were never taught to point.

Two details any loader and caller must get right (``load_pipeline`` / `call_kwargs` do):

- the saved pipeline has no T5, so stock diffusers loads it only as
  ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
  local_files_only=True)`` (otherwise: "expected [... 'text_encoder_3' ...] but only ... were passed");
- without T5 the pipeline appends ``max_sequence_length`` zero tokens (256 by default) to the
  text sequence: call it with ``max_sequence_length=0`` so the joint attention sees only the
  CLIP tokens (twice as fast, and no empty tokens soaking up attention).

The block shape (``attention_head_dim`` 64, as many heads as layers) is the one ComfyUI's MMDiT
detection assumes, so the same weights can be exercised there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DIT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-dit-64"
DIT_MODEL_ID = "diffusion-explain/shapes-dit-64"
IMAGE_SIZE = 64
DIT_DEFAULT_STEPS = 20
DIT_DEFAULT_GUIDANCE = 5.0
# The longest world caption is 18 words + BOS/EOS = 20 tokens; 32 leaves room for a user's few
# extra words while keeping the joint sequence at 64 image + 32 text tokens (77 would be 141).
DIT_MAX_TOKENS = 32

DIT_TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,  # latent side
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    num_attention_heads=4,  # == num_layers, head dim 64: the shape ComfyUI's MMDiT detection reads
    attention_head_dim=64,
    caption_projection_dim=256,  # must equal heads * head dim
    joint_attention_dim=256,  # the two CLIP hidden sizes (128 + 128); smaller would silently crop
    pooled_projection_dim=256,  # the two CLIP projection sizes (128 + 128)
    pos_embed_max_size=8,
)
DIT_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def transformer_config(num_layers: int = 4) -> dict:
    """The transformer config at ``num_layers`` blocks (heads follow, as ComfyUI expects)."""
    width = 64 * num_layers
    return {**DIT_TRANSFORMER_CONFIG, "num_layers": num_layers, "num_attention_heads": num_layers, "caption_projection_dim": width}


def write_tokenizer(folder: str | Path, max_tokens: int = DIT_MAX_TOKENS) -> Path:
    """The shapes tokenizer (the same vocabulary and ids as ``shapes-64``'s) with a shorter
    ``model_max_length``: the SD3 pipeline pads every prompt to it."""
    from explain.embedded import world
    from explain.embedded.vocabulary import write_clip_tokenizer

    longest = max(len(world.caption_words(c)) for c in _longest_captions()) + 2
    if max_tokens < longest:
        raise ValueError(f"max_tokens={max_tokens} cuts world captions of {longest} tokens (with BOS/EOS); use at least {longest}")
    return write_clip_tokenizer(world.vocabulary(), folder, model_max_length=max_tokens)


def _longest_captions() -> list[str]:
    """A caption of each layout at its longest wording (prefix, size word and phrase)."""
    return [
        "an image of a large red triangle to the right of a large blue circle",
        "an image of a red circle, a blue square and a green triangle from left to right",
        "an image of a large red triangle in the middle",
    ]


def build_dit_components(
    tokenizer_dir: str | Path,
    text_encoder_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    num_layers: int = 4,
    seed: int = 0,
) -> dict:
    """The ``StableDiffusion3Pipeline`` components, transformer at random weights from ``seed``.

    ``text_encoder_dir`` (a trained ``CLIPTextModel``, e.g. ``shapes-64/text_encoder``) warm-starts
    both text encoders: the weights load unchanged into ``CLIPTextModelWithProjection`` and only its
    ``text_projection`` is new. ``vae_dir`` gives the (frozen) VAE; ``shift_factor=0.0`` is
    registered because SD3 decodes with ``latents / scaling_factor + shift_factor``.
    Without the folders, everything is random (tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from explain.embedded.model import TEXT_CONFIG, VAE_CONFIG

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + 100 + k)  # each encoder's new projection gets its own draw
        if text_encoder_dir is not None:
            with _quiet_transformers():  # it reports the new text_projection as "MISSING": expected
                enc = CLIPTextModelWithProjection.from_pretrained(str(text_encoder_dir), local_files_only=True).float()
        else:
            config = CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **TEXT_CONFIG,
            )
            enc = CLIPTextModelWithProjection(config)
        encoders.append(enc)
    if vae_dir is not None:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).float()
    else:
        vae = AutoencoderKL(**VAE_CONFIG)
    vae.register_to_config(shift_factor=0.0)
    widths = [e.config.hidden_size for e in encoders]
    projections = [e.config.projection_dim for e in encoders]
    config = transformer_config(num_layers)
    config.update(joint_attention_dim=sum(widths), pooled_projection_dim=sum(projections))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config)
    zero_init_modulation(transformer)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**DIT_SCHEDULER_CONFIG),
    )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def zero_init_modulation(transformer) -> None:
    """DiT's adaLN-Zero start (Peebles & Xie, 2023): every block's modulation and the output
    projection begin at zero, so each block starts as the identity and the model as a zero
    velocity; diffusers' default init does not do this, and training from it is slower."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.endswith(("norm1.linear", "norm1_context.linear")) or name in ("norm_out.linear", "proj_out")):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def assemble(components: dict):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sd3_folder(model_dir: str | Path) -> bool:
    import json

    index = Path(model_dir) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"


def load_dit_pipeline(model_dir: str | Path, device=None, dtype: torch.dtype | None = None):
    """A saved SD3 pipeline without T5, loaded offline (``text_encoder_3=None, tokenizer_3=None``)."""
    import warnings

    from diffusers import StableDiffusion3Pipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*text_encoder_3.*")
        pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    dtype = dtype or torch.float32
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if module.dtype != dtype:  # transformers keeps the fp16 the weights are stored in
            module.to(dtype)
    return pipe.to(device)


def call_kwargs(pipe) -> dict:
    """Keyword arguments a caller must add to ``pipe(...)`` for this model family: for an SD3
    pipeline without T5, ``max_sequence_length=0`` (no zero T5 tokens appended); none otherwise."""
    if type(pipe).__name__.startswith("StableDiffusion3") and getattr(pipe, "text_encoder_3", None) is None:
        return {"max_sequence_length": 0}
    return {}


def encode_text(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes from CLIP token ids without T5 and
    with ``max_sequence_length=0``: penultimate hidden states of both encoders concatenated along
    features ``[B, T, 256]``, and their pooled projections concatenated ``[B, 256]``."""
    seqs, pooled = [], []
    for enc in text_encoders:
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        seqs.append(out.hidden_states[-2])
    return torch.cat(seqs, -1), torch.cat(pooled, -1)
