import pytest
import torch

from explain import precision


@pytest.fixture
def cpu(monkeypatch):
    def set_native(value):
        monkeypatch.setattr(precision, "native_cpu_bf16", lambda: value)

    return set_native


def test_auto_picks_bf16_only_on_cpus_with_native_bf16(cpu):
    cpu("AVX512-BF16")
    choice = precision.choose_dtype("auto", "cpu", external=True)
    assert choice.dtype == torch.bfloat16 and "AVX512-BF16" in choice.reason and "--dtype float32" in choice.reason
    cpu(None)
    choice = precision.choose_dtype("auto", "cpu", external=True)
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


def test_auto_on_cuda_and_explicit_choices(cpu):
    cpu("AMX")
    assert precision.choose_dtype("auto", "cuda", external=True).dtype == torch.float16
    assert precision.choose_dtype("auto", "cuda:1", external=False).dtype == torch.float32
    for name, dtype in precision.DTYPES.items():
        assert precision.choose_dtype(name, "cpu", external=True).dtype == dtype  # fp32 stays one flag away
    with pytest.raises(ValueError, match="unknown dtype 'half'; use auto, float32"):
        precision.choose_dtype("half", "cpu", external=True)


def test_native_detection_answers_on_this_machine():
    assert precision.native_cpu_bf16() in (None, "AMX", "AVX512-BF16")


def test_load_model_announces_its_choice_and_uses_it(cpu):
    from explain.adapters.diffusers.loading import load_model

    cpu("AVX512-BF16")
    said = []
    pipe, _ = load_model("tiny", device="cpu", dtype="auto", announce=said.append)
    assert pipe.unet.dtype == torch.bfloat16 and said == [f"dtype: {precision.choose_dtype('auto', 'cpu', False).reason}"]
    pipe, _ = load_model("tiny", device="cpu", dtype="float32", announce=said.append)
    assert pipe.unet.dtype == torch.float32 and said[-1] == "dtype: float32, as asked"


def test_a_bf16_pipeline_traces_and_explains(cpu):
    """Generation, DF-RISE, DF-CAM and the games all run in bf16 (maps in float32)."""
    from explain.adapters.diffusers import from_pipeline, generate, vae_decoder
    from explain.methods.cam import df_cam
    from explain.methods.faithfulness import insertion_deletion
    from explain.methods.rise import df_rise
    from explain.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline().to(torch.bfloat16)
    trace, _ = generate(pipe, "a red circle", steps=3, guidance=4.0, previews=False)
    assert trace.attention.dtype == torch.float32 and torch.isfinite(trace.x0).all()
    den = from_pipeline(pipe, trace)
    rise = df_rise(den, trace, 1, n_masks=8)
    cam = df_cam(den, trace, 1)
    games = insertion_deletion(den, trace, 1, rise.saliency, decode=vae_decoder(pipe.vae), stride=64)
    assert torch.isfinite(rise.saliency).all() and torch.isfinite(cam.latent).all()
    assert all(torch.isfinite(g.latent_curve).all() for g in games.values())
