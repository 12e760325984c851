"""The shipped folder loads as any diffusers user would load it, with nothing of ours in between.

``embedded.load_pipeline()`` casts every module to one dtype; a user who calls
``StableDiffusionPipeline.from_pretrained(folder)`` gets whatever the libraries pick. transformers
≥ 5 loads a model in its config's dtype and diffusers loads UNet and VAE in fp32, so the shipped
text encoder's config must say float32 (its weights are stored in fp16 to keep the folder small).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explain import embedded

PROMPT = "a large red circle above a small blue square"


def _image(pipe, seed: int = 3) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def stock():
    if not embedded.is_available():
        pytest.skip(f"the embedded model's weights are missing from {embedded.MODEL_DIR}")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(embedded.MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_from_pretrained_generates_on_the_cpu(stock):
    assert stock.device.type == "cpu"
    assert {stock.text_encoder.dtype, stock.unet.dtype, stock.vae.dtype} == {torch.float32}
    image = _image(stock)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_stock_loading_gives_the_image_load_pipeline_gives(stock):
    ours = embedded.load_pipeline(device="cpu")
    np.testing.assert_allclose(_image(stock), _image(ours), rtol=0, atol=1e-6)


def test_shipped_text_encoder_stays_small_and_loads_as_float32():
    if not embedded.is_available():
        pytest.skip("embedded weights missing")
    from safetensors import safe_open

    folder = embedded.MODEL_DIR / "text_encoder"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}, "the weights are stored in fp16; only the config's load dtype is float32"
