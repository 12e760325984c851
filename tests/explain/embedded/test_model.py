import numpy as np
import pytest
import torch

from explain import embedded


@pytest.fixture(scope="module")
def pipe():
    if not embedded.is_available():
        pytest.skip(f"the embedded model's weights are missing from {embedded.MODEL_DIR}")
    return embedded.load_pipeline(device="cpu")


def test_loads_offline_as_a_stable_diffusion_pipeline(pipe, monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    # cross-attention at two or more resolutions, latent grid >= 16x16
    assert sum(1 for b in pipe.unet.down_blocks if hasattr(b, "attentions")) >= 2
    assert pipe.unet.config.sample_size >= 16
    weights = sum(p.stat().st_size for p in embedded.MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 40 * 1024 * 1024
    assert not list(embedded.MODEL_DIR.rglob("*.bin")) and not list(embedded.MODEL_DIR.rglob("*.pt"))


def test_loading_needs_no_network(monkeypatch):
    if not embedded.is_available():
        pytest.skip("embedded weights missing")
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the embedded model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    embedded.load_pipeline(device="cpu")


def test_deterministic_for_a_seed(pipe):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe(embedded.DEFAULT_PROMPT, num_inference_steps=4, generator=g, output_type="np").images

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_check_prompt_names_unknown_words(pipe):
    assert embedded.check_prompt("a red circle above a blue square", pipe.tokenizer) == []
    assert embedded.check_prompt("a red dog", pipe.tokenizer) == ["dog"]


def test_training_record_is_shipped():
    if not embedded.is_available():
        pytest.skip("embedded weights missing")
    info = embedded.training_info()
    assert info["generator_version"]
    assert "seed" in info and info.get("unet_steps_done", 0) > 0


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(embedded.EmbeddedModelMissing, match="train_embedded.py"):
        embedded.load_pipeline(tmp_path)


def test_object_word_heatmaps_point_at_their_objects(pipe):
    """The shipped weights' cross-attention is grounded (trained so, see the README): through the
    tap, each object's words peak inside that object's mask on noised ground-truth images. Guards
    the weights and the whole capture → aggregate → upsample path; the full figure is
    benchmarks/bench_pointing.py."""
    from explain.adapters.diffusers import trace
    from explain.embedded import world
    from explain.methods import heatmaps

    scenes = world.scenes(6, seed=31, split="held_out")
    rendered = [world.render(s) for s in scenes]
    images = torch.from_numpy(np.stack([img for img, _ in rendered])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        x0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    t = 300
    a = float(pipe.scheduler.alphas_cumprod[t])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with trace(pipe, previews=False) as tr:
        pipe([s.caption for s in scenes], latents=a**0.5 * x0 + (1 - a) ** 0.5 * noise, timesteps=[t], output_type="latent")
    hits = objects = 0
    for b, (scene, (_, masks)) in enumerate(zip(scenes, rendered)):
        assert [w.text for w in tr.trace.words[b]] == world.caption_words(scene.caption)
        for k, words in enumerate(world.object_word_indices(scene)):
            heat = heatmaps.word_heatmap(tr.trace, words, item=b, size=(64, 64), normalize="none")
            hits += int(heatmaps.pointing_hit(heat, torch.from_numpy(masks[k])))
            objects += 1
    assert objects >= 8
    assert hits / objects >= 0.8, f"{hits}/{objects} object heatmaps peak inside their object"
