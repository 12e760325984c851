"""Tiny random-weight joint-attention (DiT) models built with ComfyUI's own classes, for the
integration scenarios (imported only inside the ComfyUI harness).

* SD3 / SD3.5: ``comfy.supported_models.SD3(unet_config).get_model({})`` (an
  ``OpenAISignatureMMDITWrapper``) with two joint blocks (hidden 128 = 64·depth, two heads of 64,
  as ComfyUI's MMDiT ties them); SD3.5 adds MMDiT-X's image-only self-attention in block 0 and
  RMS q/k norms. Text encoders: ComfyUI's ``SD3ClipModel`` and ``SD3Tokenizer`` with a tiny CLIP-L
  and (optionally) a tiny T5 whose 32 features are zero-padded to the 4096 the MMDiT reads.
* Flux: ``comfy.supported_models.FluxSchnell`` / ``Flux`` (dev, guidance-embedded), two
  double-stream and two single-stream blocks (hidden 64, two heads of 32), ComfyUI's
  ``FluxClipModel`` and ``FluxTokenizer`` with a tiny CLIP-L and T5.
* Chroma: ``comfy.supported_models.Chroma`` at a tiny width, T5 only (``PixArtTokenizer``).
* A random 16-channel ``AutoencoderKL`` VAE (the SD3/Flux latent layout) through ``comfy.sd.VAE``.

ComfyUI's layers skip weight initialisation, so every parameter is filled here (seeded). The
tokenizers are ComfyUI's real ones (CLIP BPE, T5 sentencepiece), so prompts have real words.
"""

from __future__ import annotations

import torch

GEN_SEED = 1234
CLIP_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_hidden_layers": 3, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
    "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1, "projection_dim": 32, "model_type": "clip_text_model",
}  # fmt: skip
T5_CONFIG = {
    "d_ff": 64, "d_kv": 16, "d_model": 32, "num_heads": 2, "num_layers": 1, "dense_act_fn": "gelu_pytorch_tanh",
    "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "t5", "relative_attention_num_buckets": 32,
    "vocab_size": 32128, "pad_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
TEXT_WIDTH = 32  # CLIP-L and T5 width of the tiny encoders


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter and float buffer (ComfyUI's ops leave them uninitialised): matrices
    ~ N(0, 1/fan_in), biases 0, norm scales 1, buffers ~ N(0, 0.01)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in module.named_buffers():
            if b.is_floating_point():  # e.g. MMDiT's pos_embed table, left as torch.empty by ComfyUI
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------------------- text encoders
def _tiny_clip_l(device, dtype, model_options, **kwargs):
    from comfy import sd1_clip

    return sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(CLIP_CONFIG), model_options=model_options, **kwargs)


def _tiny_t5(device, dtype, model_options, pad_to: int | None = None):
    import comfy.text_encoders.t5
    from comfy import sd1_clip

    class TinyT5(sd1_clip.SDClipModel):
        """ComfyUI's T5XXLModel settings on a tiny config; SD3's variant zero-pads its features to
        the 4096 SD3ClipModel concatenates with the CLIP part."""

        def encode_token_weights(self, token_weight_pairs):
            out = super().encode_token_weights(token_weight_pairs)
            if pad_to is None:
                return out
            return (torch.nn.functional.pad(out[0], (0, pad_to - out[0].shape[-1])),) + tuple(out[1:])

    return TinyT5(
        device=device, layer="last", layer_idx=None, textmodel_json_config=dict(T5_CONFIG), dtype=dtype,
        special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
        model_options={**model_options, "model_name": "t5xxl"},
    )  # fmt: skip


def sd3_text_encoder_class(with_t5: bool):
    from comfy.text_encoders.sd3_clip import SD3ClipModel

    class TinySD3Clip(SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = _tiny_clip_l(device, dtype, model_options, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False, return_projected_pooled=False)
            self.clip_g = None
            self.t5xxl = _tiny_t5(device, dtype, model_options, pad_to=4096) if with_t5 else None
            self.t5_attention_mask = False
            self.dtypes = {dtype}

    return TinySD3Clip


def flux_text_encoder_class():
    from comfy.text_encoders.flux import FluxClipModel

    class TinyFluxClip(FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = _tiny_clip_l(device, dtype, model_options, return_projected_pooled=False)
            self.t5xxl = _tiny_t5(device, dtype, model_options)
            self.dtypes = {dtype}

    return TinyFluxClip


def t5_only_text_encoder_class():
    """Chroma's text encoder (ComfyUI's PixArt T5 wrapper) on the tiny T5."""
    from comfy import sd1_clip

    class TinyT5Only(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_name = "t5xxl"
            self.clip = "t5xxl"
            setattr(self, self.clip, _tiny_t5(device, dtype, model_options))
            self.dtypes = {dtype}

    return TinyT5Only


def make_clip(family: str, generator: torch.Generator, with_t5: bool = True):
    """A ``comfy.sd.CLIP`` with ComfyUI's tokenizer of ``family`` and tiny random encoders."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.sd3_clip

    if family.startswith("sd3"):
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer, sd3_text_encoder_class(with_t5))
    elif family.startswith("flux"):
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, flux_text_encoder_class())
    elif family == "chroma":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, t5_only_text_encoder_class())
    else:
        raise ValueError(f"no tiny text encoder for {family!r}")
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    randomize(clip.cond_stage_model, generator)
    return clip


# ---------------------------------------------------------------------------- diffusion models
def sd3_config(sd35: bool = False) -> dict:
    depth = 2
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": TEXT_WIDTH + 1280,  # SD3ClipModel: CLIP-L pooled + zeros for the absent CLIP-G
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * depth}},
        "num_patches": 16 * 16, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [0] if sd35 else [], **({"qk_norm": "rms"} if sd35 else {}),
    }  # fmt: skip


def flux_config(guidance_embed: bool) -> dict:
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TEXT_WIDTH, "context_in_dim": TEXT_WIDTH,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }  # fmt: skip


def chroma_config() -> dict:
    return {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": TEXT_WIDTH, "hidden_size": 64,
        "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 2,
    }  # fmt: skip


def make_model(family: str, generator: torch.Generator):
    """A ComfyUI ``ModelPatcher`` over a tiny ``family`` model (random weights)."""
    import comfy.model_patcher
    import comfy.supported_models

    if family in ("sd3", "sd35"):
        config = comfy.supported_models.SD3(sd3_config(family == "sd35"))
    elif family == "flux-schnell":
        config = comfy.supported_models.FluxSchnell(flux_config(False))
    elif family == "flux-dev":
        config = comfy.supported_models.Flux(flux_config(True))
    elif family == "chroma":
        config = comfy.supported_models.Chroma(chroma_config())
    else:
        raise ValueError(f"no tiny model for {family!r}")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomize(model.diffusion_model, generator)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def make_vae(generator: torch.Generator, channels: int = 16):
    """ComfyUI's VAE over a random AutoencoderKL with ``channels`` latent channels (SD3/Flux: 16)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {
        "double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=channels)
    randomize(vae, generator)
    return comfy.sd.VAE(sd={k: v.float() for k, v in vae.state_dict().items()})


_CACHE: dict = {}


def tiny_dit(family: str, with_t5: bool = True):
    """``(MODEL, CLIP, VAE)`` of a tiny ``family`` model, built once per process (seeded)."""
    key = (family, with_t5)
    if key not in _CACHE:
        gen = torch.Generator().manual_seed(GEN_SEED + sum(map(ord, family)))
        with torch.inference_mode(False):
            model = make_model(family, gen)
            clip = make_clip(family, gen, with_t5=with_t5)
            if "vae" not in _CACHE:
                _CACHE["vae"] = make_vae(torch.Generator().manual_seed(GEN_SEED))
        _CACHE[key] = (model, clip, _CACHE["vae"])
    return _CACHE[key]


class TinyDiTLoader:
    """TEST NODE (registered by the harness only): a tiny DiT as MODEL, CLIP and VAE outputs, so
    graphs with it run through ComfyUI's validation and PromptExecutor like a checkpoint loader's."""

    FAMILIES = ["sd3", "sd35", "flux-schnell", "flux-dev", "chroma"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (cls.FAMILIES,), "with_t5": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, with_t5=True):
        return tiny_dit(family, with_t5)


def register(nodes_module) -> None:
    nodes_module.NODE_CLASS_MAPPINGS["ExplainTestTinyDiT"] = TinyDiTLoader
    nodes_module.NODE_DISPLAY_NAME_MAPPINGS["ExplainTestTinyDiT"] = "TEST: tiny DiT"
