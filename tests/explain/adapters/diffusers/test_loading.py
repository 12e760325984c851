"""Loading local diffusers folders of the supported families (SD3 saved without T5, Flux), the
tiny test pipelines by name, and the error for a family the adapter does not serve."""

import json

import numpy as np
import pytest
import torch

from explain import embedded
from explain.adapters.diffusers import ModelLoadError, load_model
from explain.adapters.diffusers.loading import folder_kwargs
from explain.testing import tiny_flux_pipeline, tiny_sd3_pipeline

torch.set_num_threads(1)


def _image(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_an_sd3_folder_saved_without_t5_loads_and_generates_the_same_image(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = tiny_sd3_pipeline(t5=False)
    pipe.save_pretrained(tmp_path / "sd3")
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    with pytest.raises(ValueError, match="text_encoder_3"):  # what stock diffusers does without the two Nones
        StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd3"), local_files_only=True)
    assert folder_kwargs(tmp_path / "sd3") == {"text_encoder_3": None, "tokenizer_3": None}
    loaded, name = load_model(str(tmp_path / "sd3"), device="cpu", dtype="float32", announce=lambda m: None)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None and name == "sd3"
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_image(loaded, max_sequence_length=0), _image(pipe, max_sequence_length=0))


def test_a_flux_folder_loads_and_a_missing_t5_folder_of_sd3_counts_as_none(tmp_path):
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    assert folder_kwargs(tmp_path / "flux") == {}
    loaded, _ = load_model(str(tmp_path / "flux"), device="cpu", dtype="float32", announce=lambda m: None)
    assert type(loaded).__name__ == "FluxPipeline"
    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    assert folder_kwargs(tmp_path / "sd3") == {}  # T5 saved: nothing to pass
    import shutil

    shutil.rmtree(tmp_path / "sd3" / "text_encoder_3")
    assert folder_kwargs(tmp_path / "sd3") == {"text_encoder_3": None}


@pytest.mark.parametrize("name,cls", [("tiny-sd3", "StableDiffusion3Pipeline"), ("tiny-flux", "FluxPipeline")])
def test_tiny_names(name, cls):
    pipe, label = load_model(name, device="cpu", dtype="float32", announce=lambda m: None)
    assert type(pipe).__name__ == cls and label.startswith(name)


def test_an_unsupported_family_is_refused_with_the_supported_ones(tmp_path, monkeypatch):
    from explain.adapters.diffusers import loading

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "SomeVideoPipeline"}))

    class Loader:
        @staticmethod
        def from_pretrained(source, **kwargs):
            return type("SomeVideoPipeline", (), {"transformer": torch.nn.Linear(1, 1), "scheduler": object()})()

    monkeypatch.setattr(loading, "pipeline_class", lambda: Loader)
    with pytest.raises(ModelLoadError, match="supported families are unet: .*sd3: .*flux: "):
        load_model(str(tmp_path / "other"), device="cpu", dtype="float32", announce=lambda m: None)
    (tmp_path / "other" / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a diffusers model index"):
        folder_kwargs(tmp_path / "other")


@pytest.mark.skipif(not embedded.is_available("dit"), reason="the embedded DiT's weights are not shipped")
def test_the_shipped_models_by_name_and_their_geometry():
    from explain import sizes
    from explain.adapters.diffusers.loading import EMBEDDED_NAMES, is_embedded

    assert EMBEDDED_NAMES == ("embedded", "embedded-dit")
    pipe, name = load_model("embedded-dit", device="cpu", dtype="float32", announce=lambda m: None)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert name == "embedded-dit (diffusion-explain/shapes-dit-64)" and is_embedded(name)
    assert pipe.transformer.dtype == torch.float32
    # the sizes are read from the folder before loading: 64 px from 16×16 latents, VAE factor 4
    assert sizes.spec_geometry("embedded-dit") == sizes.Geometry(4, 64) == sizes.spec_geometry("embedded")
    with pytest.raises(sizes.SizeError, match="trained at 64 px"):
        sizes.check_side("--height", 512, sizes.spec_geometry("embedded-dit"), model="embedded-dit")


def test_an_unknown_name_is_answered_with_the_names():
    with pytest.raises(ModelLoadError) as exc:
        load_model("embedded_dit", device="cpu", dtype="float32", announce=lambda m: None)
    message = str(exc.value)
    assert "did you mean embedded-dit?" in message
    assert "embedded (the shapes UNet model, default), embedded-dit (the shapes MMDiT model, SD3-style)" in message
    assert "tiny, tiny-sd3, tiny-flux" in message
