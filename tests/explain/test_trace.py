import pytest
import torch
from safetensors.torch import save_file

from explain.trace import Trace, TraceFormatError, Word


def make_trace(steps=3, batch=2, tokens=5, h=4, w=6):
    g = torch.Generator().manual_seed(0)
    att = torch.rand(steps, batch, tokens, h, w, generator=g)
    att = att / att.sum(2, keepdim=True)
    return Trace(
        prompts=["a red circle", "a blue square"][:batch],
        tokens=[["<sot>", "a", "red", "circle", "<eot>"], ["<sot>", "a", "blue", "square", "<eot>"]][:batch],
        words=[[Word("a", [1]), Word("red", [2]), Word("circle", [3])], [Word("a", [1]), Word("blue", [2]), Word("square", [3])]][:batch],
        timesteps=torch.tensor([999.0, 500.0, 1.0][:steps]),
        sigmas=torch.tensor([14.6, 1.0, 0.03][:steps]),
        x_t=torch.randn(steps, batch, 4, h, w, generator=g),
        x0=torch.randn(steps, batch, 4, h, w, generator=g),
        attention=att,
        images=torch.randint(0, 255, (batch, h * 4, w * 4, 3), dtype=torch.uint8, generator=g),
        meta={"model_id": "tiny", "seed": 1, "height": h * 4, "width": w * 4},
    )


def test_round_trip(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "t.safetensors")
    back = Trace.load(path)
    assert back.prompts == trace.prompts
    assert back.words[1][2].text == "square"
    assert torch.equal(back.x_t, trace.x_t)
    assert torch.allclose(back.attention, trace.attention, atol=1e-3)
    assert torch.equal(back.images, trace.images)
    assert back.meta["seed"] == 1
    assert back.image_size == (16, 24)


def test_save_adds_suffix_and_is_atomic(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "run")
    assert path.name == "run.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


def test_word_lookup_error_lists_words():
    trace = make_trace()
    assert trace.word("RED").token_indices == [2]
    with pytest.raises(KeyError, match="'circle'"):
        trace.word("dog")


def test_check_step():
    trace = make_trace()
    assert trace.check_step(-1) == 2
    with pytest.raises(IndexError, match="0..2"):
        trace.check_step(3)


def test_foreign_safetensors_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TraceFormatError, match="not a diffusion-explain trace"):
        Trace.load(path)


def test_garbage_file_rejected(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"hello, this is not safetensors")
    with pytest.raises(TraceFormatError, match="not a readable safetensors"):
        Trace.load(path)
    with pytest.raises(TraceFormatError, match="no trace file"):
        Trace.load(tmp_path / "missing.safetensors")


def test_newer_schema_rejected(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["schema_version"] = "99"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(TraceFormatError, match="newer"):
        Trace.load(path)


def test_validate_catches_shape_mismatch():
    trace = make_trace()
    trace.x0 = trace.x0[:, :1]
    with pytest.raises(TraceFormatError, match="x0 shape"):
        trace.validate()
