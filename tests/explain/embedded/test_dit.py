"""The embedded DiT: its builder, the offline loaders (project and stock diffusers) and the
shipped weights (tests on those skip, saying why, until they are in explain/models/shapes-dit-64)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from explain import embedded
from explain.embedded import dit, world


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return dit.write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def components(tokenizer_dir):
    return dit.build_dit_components(tokenizer_dir, embedded.MODEL_DIR / "text_encoder", embedded.MODEL_DIR / "vae", num_layers=2, seed=0)


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    """A built pipeline (random transformer) saved as the training script saves it."""
    folder = tmp_path_factory.mktemp("dit")
    torch.manual_seed(1)
    with torch.no_grad():  # off the zero init, so outputs depend on the prompt and the seed
        for p in components["transformer"].parameters():
            p.add_(0.02 * torch.randn_like(p))
    dit.assemble(components).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_block_shape_is_the_one_comfyui_detects():
    config = dit.DIT_TRANSFORMER_CONFIG
    assert config["attention_head_dim"] == 64
    assert config["num_attention_heads"] == config["num_layers"]
    assert config["caption_projection_dim"] == 64 * config["num_layers"]
    wider = dit.transformer_config(6)
    assert (wider["num_layers"], wider["num_attention_heads"], wider["caption_projection_dim"]) == (6, 6, 384)


def test_components_fit_together(components):
    tr, te, te2, vae = components["transformer"], components["text_encoder"], components["text_encoder_2"], components["vae"]
    # joint_attention_dim below the CLIP widths combined would crop the second encoder silently
    assert tr.config.joint_attention_dim == te.config.hidden_size + te2.config.hidden_size
    assert tr.config.pooled_projection_dim == te.config.projection_dim + te2.config.projection_dim
    assert tr.config.in_channels == vae.config.latent_channels == 4
    assert vae.config.shift_factor == 0.0  # SD3 decodes latents / scaling_factor + shift_factor
    assert components["text_encoder_3"] is None and components["tokenizer_3"] is None


def test_text_encoders_start_from_the_shipped_one(components):
    from transformers import CLIPTextModel

    shipped = CLIPTextModel.from_pretrained(str(embedded.MODEL_DIR / "text_encoder"), local_files_only=True).float().state_dict()
    for enc in (components["text_encoder"], components["text_encoder_2"]):
        own = enc.text_model.state_dict()
        assert set(own) == set(shipped)
        assert all(torch.equal(own[k], shipped[k]) for k in shipped)
        assert set(enc.state_dict()) - {"text_model." + k for k in shipped} == {"text_projection.weight"}
    # the two new projections are separate draws
    assert not torch.equal(components["text_encoder"].text_projection.weight, components["text_encoder_2"].text_projection.weight)


def test_tokenizer_keeps_the_shipped_ids_and_fits_every_caption(tokenizer_dir):
    from transformers import CLIPTokenizer

    short = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    shipped = CLIPTokenizer.from_pretrained(str(embedded.MODEL_DIR / "tokenizer"), local_files_only=True)
    assert short.model_max_length == dit.DIT_MAX_TOKENS
    captions = [s.caption for s in world.scenes(3000, seed=5, split="any")]
    lengths = [len(ids) for ids in short(captions).input_ids]
    assert max(lengths) <= dit.DIT_MAX_TOKENS
    # the hand-written longest wordings really are the longest
    assert max(lengths) <= max(len(world.caption_words(c)) + 2 for c in dit._longest_captions())
    assert short(captions[:50]).input_ids == shipped(captions[:50]).input_ids
    with pytest.raises(ValueError, match="at least 20"):
        dit.write_tokenizer(tokenizer_dir.parent / "too-short", max_tokens=12)


def test_fresh_transformer_starts_at_zero_velocity(tokenizer_dir):
    comps = dit.build_dit_components(tokenizer_dir, num_layers=1, seed=3)
    out = comps["transformer"](
        hidden_states=torch.randn(2, 4, 16, 16),
        encoder_hidden_states=torch.randn(2, 32, 256),
        pooled_projections=torch.randn(2, 256),
        timestep=torch.tensor([100.0, 900.0]),
    ).sample
    assert out.shape == (2, 4, 16, 16) and torch.count_nonzero(out) == 0


def test_project_loader_dispatches_on_the_pipeline_class(saved):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = embedded.load_pipeline(saved, device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.transformer.dtype == torch.float32


def test_stock_diffusers_loads_it_with_the_t5_slots_set_to_none(saved):
    """The documented way (README / dit.py): without text_encoder_3=None, tokenizer_3=None stock
    diffusers refuses a saved SD3 pipeline that has no T5."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(saved), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    assert pipe.text_encoder_3 is None
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(str(saved), local_files_only=True)


def test_loading_opens_no_socket(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the embedded DiT tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pipe = embedded.load_pipeline(saved, device="cpu")
    pipe("a red circle", num_inference_steps=2, output_type="latent", **embedded.call_kwargs(pipe))


def test_call_kwargs_add_no_t5_padding_and_match_the_training_encoder(saved):
    pipe = embedded.load_pipeline(saved, device="cpu")
    assert embedded.call_kwargs(pipe) == {"max_sequence_length": 0}
    prompt = "a large red circle above a small blue square"
    with torch.no_grad():
        seq, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False, **embedded.call_kwargs(pipe))
        padded, *_ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=dit.DIT_MAX_TOKENS, return_tensors="pt").input_ids
        own_seq, own_pooled = dit.encode_text((pipe.text_encoder, pipe.text_encoder_2), ids)
    assert seq.shape == (1, dit.DIT_MAX_TOKENS, 256)
    assert padded.shape[1] == dit.DIT_MAX_TOKENS + 256  # the default appends 256 zero "T5" tokens
    # what the training script conditions on is what the pipeline feeds the transformer
    assert torch.allclose(seq, own_seq) and torch.allclose(pooled, own_pooled)


def test_deterministic_for_a_seed(saved):
    pipe = embedded.load_pipeline(saved, device="cpu")

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red circle on the left", num_inference_steps=3, generator=g, output_type="np", **embedded.call_kwargs(pipe)).images

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_names_and_bad_folders(tmp_path):
    assert embedded.model_dir_for("dit") == embedded.DIT_MODEL_DIR
    assert embedded.model_dir_for(None) == embedded.model_dir_for("unet") == embedded.MODEL_DIR
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert embedded.is_available(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        embedded.load_pipeline(tmp_path, device="cpu")
    with pytest.raises(embedded.EmbeddedModelMissing, match="train_embedded_dit.py"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        embedded.load_pipeline(empty)


# ---------------------------------------------------------------------------- the shipped weights
shipped = pytest.mark.skipif(
    not embedded.is_available("dit"), reason=f"the DiT's weights are not shipped yet in {embedded.DIT_MODEL_DIR}"
)


@shipped
def test_shipped_dit_loads_by_name_within_the_size_budget():
    from diffusers import StableDiffusion3Pipeline

    pipe = embedded.load_pipeline("dit", device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.tokenizer.model_max_length == dit.DIT_MAX_TOKENS
    files = list(embedded.DIT_MODEL_DIR.rglob("*"))
    assert sum(p.stat().st_size for p in files if p.is_file()) <= 40 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert not (embedded.DIT_MODEL_DIR / "train_state").exists()  # resume state is not shipped


@shipped
def test_shipped_dit_generates_the_same_image_through_stock_diffusers():
    """As a diffusers user would load it: the T5 slots set to None, nothing else of ours."""
    from diffusers import StableDiffusion3Pipeline

    stock = StableDiffusion3Pipeline.from_pretrained(
        str(embedded.DIT_MODEL_DIR), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    stock.set_progress_bar_config(disable=True)
    assert {m.dtype for m in (stock.transformer, stock.vae, stock.text_encoder, stock.text_encoder_2)} == {torch.float32}
    ours = embedded.load_pipeline("dit", device="cpu")

    def image(pipe):
        g = torch.Generator().manual_seed(3)
        return pipe(embedded.DEFAULT_PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=g, output_type="np", max_sequence_length=0).images

    a = image(stock)
    assert np.isfinite(a).all() and a.std() > 0.01
    np.testing.assert_allclose(a, image(ours), rtol=0, atol=1e-6)


@shipped
def test_shipped_dit_record_says_no_grounding_loss():
    info = embedded.training_info("dit")
    assert info["generator_version"] == world.GENERATOR_VERSION
    assert info["grounding_loss"] is None and info["samples_seen"] > 0


def test_a_name_that_is_no_model_gets_the_names():
    for bad in ("ditt", "DiT", "embedded-dit"):  # the CLI's names are not the library's
        with pytest.raises(ValueError, match=r"not an embedded model; use one of 'unet', 'dit'"):
            embedded.load_pipeline(bad)
    with pytest.raises(embedded.EmbeddedModelMissing):  # a path stays a path, named as missing
        embedded.load_pipeline("./no/such/folder")


@shipped
def test_shipped_dit_traces_through_the_joint_attention_tap():
    """The shipped DiT through the diffusers adapter's SD3 family: the image is the untraced one,
    and every block's map, the output-space maps and a concept stream come back."""
    from explain.adapters.diffusers import generate

    pipe = embedded.load_pipeline("dit", device="cpu")
    prompt = "a large red circle above a small blue square"

    def plain():
        g = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=3, guidance_scale=5.0, generator=g, output_type="np", **embedded.call_kwargs(pipe)).images

    trace, images = generate(pipe, prompt, steps=3, guidance=5.0, seed=0, previews=False, keep_layers=True, output_type="np")
    assert np.array_equal(images, plain())
    assert trace.meta["family"] == "sd3" and trace.meta["max_sequence_length"] == 0 and not trace.meta["t5"]
    assert [w.text for w in trace.words[0]] == prompt.split()
    assert list(trace.attention_layers) == [f"transformer_blocks.{i}.attn" for i in range(4)]
    assert trace.attention_layers["transformer_blocks.0.attn"].shape == (3, 1, len(trace.tokens[0]), 8, 8)  # 8×8 patch tokens
    assert torch.isfinite(trace.attention).all()
    # rows are renormalised over the whole 32-token CLIP context; the trace keeps it through the end
    # token, so the kept share is below 1 (the padding after it takes the rest)
    rows = trace.attention[:, 0].sum(1)
    assert float(rows.min()) > 0.05 and float(rows.max()) < 1.0
    out, _ = generate(pipe, prompt, steps=3, guidance=5.0, seed=0, previews=False, keep_layers=True, maps="output",
                      concepts=["red circle", "blue square"], output_type="np")
    assert list(out.attention_layers) == [f"transformer_blocks.{i}.attn" for i in range(3)]  # the last block has no text output
    assert out.concepts == ["red circle", "blue square"] and out.concept_maps.shape == (3, 1, 2, 16, 16)
    assert not torch.allclose(out.attention, trace.attention)
    assert type(pipe.transformer.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"  # restored
