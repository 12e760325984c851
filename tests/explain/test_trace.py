import json

import pytest
import torch
from safetensors import safe_open
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


def make_full_trace():
    """`make_trace` plus a negative prompt, one attention layer and a final latent."""
    trace = make_trace()
    g = torch.Generator().manual_seed(1)
    trace.negative_prompts = ["green", "green"]
    trace.negative_tokens = [["<sot>", "green", "<eot>"] for _ in range(2)]
    trace.negative_words = [[Word("green", [1])] for _ in range(2)]
    trace.attention_negative = torch.rand(3, 2, 3, 4, 6, generator=g)
    trace.attention_layers = {"mid": torch.rand(3, 2, 5, 2, 3, generator=g)}
    trace.final_latent = torch.randn(2, 4, 4, 6, generator=g)
    return trace.validate()


def rewrite(path, edit):
    """Rewrite the saved trace at ``path`` after ``edit(tensors, header, metadata)`` changed its parts."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["trace"])
    edit(tensors, header, metadata)
    metadata["trace"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


def test_full_trace_round_trip(tmp_path):
    back = Trace.load(make_full_trace().save(tmp_path / "t.safetensors"))
    assert back.negative_words[1][0].token_indices == [1]
    assert back.attention_layers["mid"].shape == (3, 2, 5, 2, 3) and back.final_latent.shape == (2, 4, 4, 6)


def _no_steps(tensors, header, metadata):
    for k in list(tensors):
        if k not in ("final_latent", "images"):
            tensors[k] = tensors[k][:0]


FILE_DAMAGE = {
    "missing schema": (lambda t, h, m: m.pop("schema_version"), "no trace schema version"),
    "schema 0": (lambda t, h, m: m.update(schema_version="0"), "claims trace schema 0, which diffusion-explain never wrote"),
    "negative schema": (lambda t, h, m: m.update(schema_version="-1"), "claims trace schema -1"),
    "negative word index": (
        lambda t, h, m: h["negative_words"][1][0].update(token_indices=[3]),
        r"negative prompt word 'green' points at token positions \[3\], outside the 3 positions of attention_negative",
    ),
    "negative tokens per item": (
        lambda t, h, m: h.update(negative_tokens=h["negative_tokens"][:1]),
        r"negative_tokens/negative_words must be empty or have one entry per batch item \(2\), got 1 and 2",
    ),
    "negative words per item": (
        lambda t, h, m: h["negative_words"].append([]),
        r"one entry per batch item \(2\), got 2 and 3",
    ),
    "layer token count": (
        lambda t, h, m: t.update({"attention_layers/mid": t["attention_layers/mid"][:, :, :4].contiguous()}),
        "attention layer 'mid' has 4 token positions but attention has 5",
    ),
    "final latent shape": (
        lambda t, h, m: t.update(final_latent=t["final_latent"][..., :5].contiguous()),
        r"final_latent must be one step of x_t \(2, 4, 4, 6\), got \(2, 4, 4, 5\)",
    ),
    "no steps": (_no_steps, "the trace has no steps"),
    "float images": (
        lambda t, h, m: t.update(images=t["images"].float() / 255),
        "images must be uint8 RGB .*got torch.float32",
    ),
}


@pytest.mark.parametrize("damage", FILE_DAMAGE, ids=list(FILE_DAMAGE))
def test_damaged_file_rejected_at_load(tmp_path, damage):
    edit, message = FILE_DAMAGE[damage]
    path = make_full_trace().save(tmp_path / "t.safetensors")
    rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        Trace.load(path)


def _set(name, value):
    return lambda trace: setattr(trace, name, value(trace))


OBJECT_DAMAGE = {
    "negative word index": (
        lambda tr: tr.negative_words[0][0].token_indices.append(7),
        r"negative prompt word 'green' points at token positions \[1, 7\]",
    ),
    "negative tokens per item": (_set("negative_tokens", lambda tr: tr.negative_tokens * 2), "got 4 and 2"),
    "layer token count": (
        lambda tr: tr.attention_layers.update(mid=tr.attention_layers["mid"][:, :, :3]),
        "attention layer 'mid' has 3 token positions but attention has 5",
    ),
    "final latent shape": (_set("final_latent", lambda tr: tr.final_latent[:1]), "final_latent must be one step of x_t"),
    "no steps": (
        lambda tr: [setattr(tr, k, getattr(tr, k)[:0]) for k in ("timesteps", "sigmas", "x_t", "x0")],
        "the trace has no steps",
    ),
    "float images": (_set("images", lambda tr: tr.images.float()), "images must be uint8"),
    "float previews": (
        _set("x0_previews", lambda tr: torch.rand(3, 2, 8, 8, 3)),
        "x0_previews must be uint8 RGB",
    ),
}


@pytest.mark.parametrize("damage", OBJECT_DAMAGE, ids=list(OBJECT_DAMAGE))
def test_damaged_trace_rejected_by_validate_and_save(tmp_path, damage):
    corrupt, message = OBJECT_DAMAGE[damage]
    trace = make_full_trace()
    corrupt(trace)
    with pytest.raises(ValueError, match=message):
        trace.validate()
    with pytest.raises(ValueError, match=message):
        trace.save(tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())
